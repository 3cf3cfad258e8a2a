"""ASE calculator: a drop-in for fairchem's `FAIRChemCalculator`."""

import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, cast

import equinox as eqx
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ._graph import AtomicGraph, PaddingSpec, pad_graph
from ._potential import UMA, energy_forces_stress, merge_experts_for
from ._settings import DEFAULT_SETTINGS, ExecutionSettings

if TYPE_CHECKING:
    from jaxlib._jax import Device  # the class `jax.Device` names (pyright refuses the alias as a type)

    from .parallel import ExchangeVolume, PartitionCapacity

#: `atoms.info` keys that change the result (read by `AtomicGraph.from_atoms`): a change
#: to any of them invalidates the calculator's cached results, as fairchem's calculator adds
#: `"info"` to the system changes when `atoms.info` changed.
RESULT_INFO_KEYS = ("charge", "spin")
#: A structure runs in a padded size this calculator has already run (compiled) when that size
#: is at most this many times the structure's own bucketed size, in atoms and in edges (our
#: choice). Padded edges cost no message passing (only live edges enter the edge chunks) and
#: padded atoms only atom-wise work, while a new size costs a compilation (~15-20 s at uma-s
#: size): at uma-s size and 64 atoms, twice the edges cost 9 % more per call (median; 22 % by
#: best times), so at most 1.5 times costs a few per cent (`benchmarks/performance_notes.md`).
SIZE_REUSE_FACTOR = 1.5
#: The task whose defaults fairchem warns about (`UMATask.OMOL.value`); its default spin is 1.
_OMOL_TASK = "omol"


@eqx.filter_jit
def _efs_merging_per_call(model: UMA, graph: AtomicGraph, settings: ExecutionSettings) -> dict:
    # The calculator's graph holds one real system (system 0; the others are padding): merge
    # its experts inside the call, as fairchem's MOLE does for a single system when
    # `merge_mole` is off. One matmul per layer and chunk, like a merged model; nothing is cached.
    return energy_forces_stress(merge_experts_for(model, graph), graph, settings=settings)


class UMACalculator(Calculator):
    """Energy, forces and stress of a [`uma_eqx.UMA`][] model for ASE.

    Mirrors `fairchem.core.calculate.ase_calculator.FAIRChemCalculator`: `task_name` is required
    when the model has several tasks; `charge` and `spin` are read from `atoms.info` (defaults
    0, and spin 1 for `omol`, 0 otherwise; for `omol` a missing charge or spin gives one
    warning per calculator, as fairchem warns); positions are wrapped along periodic axes; the
    graph uses the model's cutoff and fairchem's neighbour cap; stress (ASE Voigt order, eV/Å³)
    is reported for every system, as fairchem does (for a non-periodic system the "volume" is
    fairchem's identity cell, 1 Å³).

    Results are cached as ASE does, and also invalidated when `atoms.info["charge"]` or
    `["spin"]` change (ASE's own check ignores `info`). One calculator may be shared by
    threads: calls are serialised by a lock (the model itself is stateless).

    With `settings.merge_experts` (default) the MoLE experts are merged for the current
    composition, charge, spin and task (fairchem's `merge_mole`), and re-merged automatically
    when any of them changes. Graphs are padded to bucketed sizes (`uma_eqx.bucket_size`), and a
    structure that fits a padded size this calculator has already run (at most
    `SIZE_REUSE_FACTOR` times its own bucket in atoms and edges) runs in that size, so that MD,
    relaxations and a stream of structures compile only a handful of times.

    **Arguments:**

    - `model`: the model.
    - `task_name`: one of `model.config.task_names` (optional when there is only one).
    - `settings`: how to execute (see [`uma_eqx.ExecutionSettings`][]); default
      `ExecutionSettings()`.
    - `merge_experts`: shorthand overriding `settings.merge_experts`: merge MoLE experts per
      composition and keep the merged model until it changes (faster; same energies up to
      round-off). `False`: merge inside every call (fairchem's `merge_mole=False`), nothing cached.
    - `devices`: evaluate each structure over these devices, its atoms partitioned spatially
      (graph parallelism, see `uma_eqx.parallel` and the docs page `parallel.md`); `None`
      (default): one device. The per-device capacities only grow (bucketed), so a moving
      structure reuses one compiled program until its partition outgrows them.
    - `exchange`: with `devices`, how halo rows are refreshed each layer: `"halo"` (only
      the rows needed, ppermute rounds) or `"all_gather"`.
    - `partition`: with `devices`, `"morton"` (compact blocks) or `"slab"` (slabs along the
      widest direction).
    - `**kwargs`: passed to `ase.calculators.calculator.Calculator`.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: UMA,
        task_name: str | None = None,
        *,
        settings: ExecutionSettings | None = None,
        merge_experts: bool | None = None,
        devices: "Sequence[Device] | None" = None,
        exchange: str = "halo",
        partition: str = "morton",
        **kwargs,
    ):
        super().__init__(**kwargs)
        tasks = model.config.task_names
        if task_name is None:
            if len(tasks) != 1:
                raise ValueError(f"task_name is required for a model with several tasks; choose one of {list(tasks)}")
            task_name = tasks[0]
        model.config.dataset_index(task_name)  # raises with the list of tasks
        settings = DEFAULT_SETTINGS if settings is None else settings
        if merge_experts is not None:
            settings = settings.replace(merge_experts=merge_experts)
        self.model = model
        self.task_name = task_name
        self.settings = settings
        self._lock = threading.RLock()
        self._merged: tuple[tuple, UMA] | None = None
        self._warned_defaults = False
        self._mesh = None
        if devices is not None:
            from .parallel import make_mesh

            if exchange not in ("halo", "all_gather"):
                raise ValueError(f"unknown exchange {exchange!r}: use 'halo' or 'all_gather'")
            if partition not in ("morton", "slab"):
                raise ValueError(f"unknown partition {partition!r}: use 'morton' or 'slab'")
            self._mesh = make_mesh(devices)
        self.exchange = exchange
        self.partition = partition
        self._capacity: PartitionCapacity | None = None
        self._volume: ExchangeVolume | None = None
        self._sizes: set[tuple[int, int, int]] = set()
        self._last_sizes: tuple[int, int, int] | None = None

    @property
    def padded_sizes(self) -> tuple[int, int, int] | None:
        """`(atoms, edges, systems)` of the last structure's padded graph: the compiled shape
        it ran in (with `devices`, the whole graph before each part is padded to the capacities
        of `uma_eqx.parallel`); `None` before the first calculation."""
        return self._last_sizes

    @property
    def exchange_volume(self) -> "ExchangeVolume | None":
        """With `devices`: rows and bytes one layer's halo refresh moved for the last structure
        (see `uma_eqx.parallel.ExchangeVolume`); `None` before the first calculation or without
        `devices`."""
        return self._volume

    def _sharded(self, model: UMA, graph: AtomicGraph, atoms: Atoms) -> dict:
        """Energy, forces and stress over `devices`; capacities grow (bucketed) as needed."""
        from .parallel import ShardedStructure, energy_forces_stress_sharded, feature_row_bytes

        assert self._mesh is not None
        method = cast("Literal['morton', 'slab']", self.partition)
        structure = ShardedStructure.build(graph, self._mesh, method, pbc=atoms.pbc)
        needed = structure.partition.capacity
        if self._capacity is None or not self._capacity.fits(needed):
            grown = needed if self._capacity is None else self._capacity.union(needed)
            self._capacity = grown.bucketed()
        if needed != self._capacity:
            structure = ShardedStructure.build(graph, self._mesh, method, self._capacity, pbc=atoms.pbc)
        self._volume = structure.partition.exchange_volume(feature_row_bytes(model.config, model.dtype))
        exchange = cast("Literal['all_gather', 'halo']", self.exchange)
        return energy_forces_stress_sharded(model, structure, exchange=exchange, settings=self.settings)

    @property
    def merges_experts(self) -> bool:
        """Whether this calculator merges MoLE experts per composition (and caches them)."""
        return self.settings.merge_experts and self.model.backbone.router is not None

    def model_for(self, atoms) -> UMA:
        """The model this calculator evaluates for `atoms`: merged for its composition, charge,
        spin and task when [`merges_experts`][uma_eqx.calculator.UMACalculator.merges_experts],
        else `self.model`.

        **Arguments:**

        - `atoms`: an `ase.Atoms`.

        **Returns:**

        The model (cached: the same object while composition, charge, spin and task stay).
        """
        with self._lock:
            return self._model_for(self._graph(atoms), atoms)

    def _graph(self, atoms) -> AtomicGraph:
        # checked on the host: the compiled program then has no host callback (eqx.error_if),
        # so enable_compilation_cache can keep it for the next process
        config = self.model.config
        graph = AtomicGraph.for_model(self.model, atoms, self.task_name)
        # the partitioned path pads each part itself (capacities that only grow)
        sizes = self._padding(graph) if self._mesh is None else PaddingSpec().sizes(graph)
        return pad_graph(graph, *sizes).host_checked(config.max_num_elements, len(config.datasets))

    def _padding(self, graph: AtomicGraph) -> tuple[int, int, int]:
        # the smallest size already run that fits `graph` and costs at most SIZE_REUSE_FACTOR
        # times its own bucket, else that bucket
        own = PaddingSpec().sizes(graph)
        have = (graph.num_atoms, graph.num_edges, graph.num_systems)

        def fits(sizes) -> bool:
            atoms, edges, systems = sizes
            return (
                all(h <= c for h, c in zip(have, sizes))
                and (edges == have[1] or atoms > have[0])  # padded edges need a padded atom
                and (atoms == have[0] or systems > have[2])  # padded atoms need a padded system
                and all(c <= SIZE_REUSE_FACTOR * o for c, o in zip(sizes, own))
            )

        return min((s for s in self._sizes if fits(s)), key=lambda s: (s[1], s[0], s[2]), default=own)

    def _model_for(self, graph: AtomicGraph, atoms) -> UMA:
        if not self.merges_experts:
            return self.model
        z = atoms.get_atomic_numbers()
        counts = np.bincount(z, minlength=self.model.config.max_num_elements)
        reduced = tuple(np.round(counts / counts.sum(), 12))
        key = (reduced, int(np.asarray(graph.charge)[0]), int(np.asarray(graph.spin)[0]), self.task_name)
        if self._merged is None or self._merged[0] != key:
            self._merged = (key, merge_experts_for(self.model, graph))
        return self._merged[1]

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """ASE's changes since the last calculation, plus `"info"` when a result-changing
        `atoms.info` key (`RESULT_INFO_KEYS`) changed."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and "info" not in changes:
            old, new = self.atoms.info, atoms.info
            if any(_differs(old.get(key), new.get(key)) for key in RESULT_INFO_KEYS):
                changes.append("info")
        return changes

    def get_property(self, name, atoms=None, allow_calculation: bool = True):
        """ASE's `get_property`, serialised by the calculator's lock (safe to share by threads)."""
        with self._lock:
            return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Compute energy, forces and stress of `atoms` (ASE's calculator protocol)."""
        with self._lock:
            super().calculate(atoms, properties, system_changes)
            atoms = cast(Atoms, self.atoms)  # set by Calculator.calculate: the given atoms, or the last call's
            graph = self._graph(atoms)
            self._warn_omol_defaults(atoms)
            if self._mesh is not None:
                model = self._model_for(graph, atoms) if self.merges_experts else self.model
                out = self._sharded(model, graph, atoms)
            elif self.merges_experts or self.model.backbone.router is None:
                out = energy_forces_stress(self._model_for(graph, atoms), graph, settings=self.settings)
            else:
                out = _efs_merging_per_call(self.model, graph, self.settings)
            self._last_sizes = (graph.num_atoms, graph.num_edges, graph.num_systems)
            if self._mesh is None:  # a size this calculator has compiled: later structures may reuse it
                self._sizes.add(self._last_sizes)
            n = len(atoms)
            # results indexed on the host: eager indexing of device arrays compiles per shape
            energy = float(np.asarray(out["energy"])[0])
            self.results["energy"] = energy
            self.results["free_energy"] = energy
            self.results["forces"] = np.asarray(out["forces"], dtype=np.float64)[:n]
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"], dtype=np.float64)[0])

    def _warn_omol_defaults(self, atoms) -> None:
        if self.task_name != _OMOL_TASK or self._warned_defaults:
            return
        missing = [key for key in ("charge", "spin") if key not in atoms.info]
        if missing:
            self._warned_defaults = True
            warnings.warn(
                f"task 'omol' without atoms.info[{missing[0]!r}]"
                + (f" and [{missing[1]!r}]" if len(missing) > 1 else "")
                + ": using the defaults charge=0, spin=1 (as fairchem); set atoms.info['charge'] and "
                "atoms.info['spin'] (multiplicity) for charged or open-shell molecules",
                UserWarning,
                stacklevel=3,
            )


def _differs(a, b) -> bool:
    """Whether two `atoms.info` values differ (arrays compared element-wise)."""
    if a is None or b is None:
        return (a is None) != (b is None)
    try:
        return not bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except (TypeError, ValueError):
        return a != b
