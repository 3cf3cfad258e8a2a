"""`AtomicGraph`: a batch of atomic systems with their radius graph, and its padding."""

import dataclasses
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int

from ._constants import CHARGE_RANGE, MAX_NEIGHBORS, MIN_ATOM_DISTANCE, SPIN_RANGE
from .neighbors import radius_graph
from .neighbors._host import import_vesin

if TYPE_CHECKING:
    import ase


#: Defaults of `units/mlip_unit/api/inference.py:validate_uma_atoms_data`
#: (`DEFAULT_CHARGE`, `DEFAULT_SPIN_OMOL`, `DEFAULT_SPIN`;
#: `UMATask.OMOL.value == "omol"`).
_DEFAULT_CHARGE = 0
_DEFAULT_SPIN_OMOL = 1
_DEFAULT_SPIN = 0
_OMOL_TASK = "omol"
#: Mixed pbc needs a cell at least this large, in Å³
#: (`datasets/atomic_data.py:AtomicData.from_ase`).
_MIXED_PBC_MIN_VOLUME = 0.1
#: All-periodic systems need a cell larger than this, in Å³. fairchem's calculator
#: rejects an all-zero cell (`calculate/ase_calculator.py:AllZeroUnitCellError`); any
#: degenerate cell would make its image search divide by zero.
_PBC_MIN_VOLUME = 1e-6


class AtomicGraph(eqx.Module):
    """A batch of atomic systems and their directed radius graph, as arrays.

    Port of the graph half of fairchem's input pipeline
    (`fairchem.core.datasets.atomic_data.AtomicData.from_ase` followed by
    `fairchem.core.graph.compute.generate_graph` with `radius_pbc_version=2`).

    Edge `e` carries a message from source `j = edge_index[0, e]` to target
    `i = edge_index[1, e]`; its vector points from the target to the source image:

    $$\\mathbf{r}_e = \\mathbf{r}_j - \\mathbf{r}_i + \\mathbf{S}_e H_{s(i)},$$

    with `S_e = edge_shift[e]` and `H_s = cell[s]` (lattice vectors as rows). Real edges
    are sorted by target, so they are also grouped by system.

    Padding (see [`uma_eqx.pad_graph`][]) appends masked entries: padded atoms sit at
    the origin with atomic number 0 in a padded system; padded edges are self-loops on
    a padded atom with zero shift; padded systems have an identity cell, charge 0,
    spin 0, dataset 0. A batch with no edge at all holds one masked self-loop on atom 0,
    as fairchem's `escn_md.py:add_n_empty_edges` adds one fake edge.

    Fields: `positions` (wrapped into the cell along periodic axes, as fairchem does),
    `atomic_numbers`, `system_index` (system of each atom), `edge_index`, `edge_shift`
    (integer image offsets stored as floats), `cell` (for a non-periodic system with a
    zero cell, the identity, as `ase.Atoms.get_cell(complete=True)`), `charge`, `spin`,
    `dataset_index` (index into the model's dataset list), and the masks `atom_mask`,
    `edge_mask`, `system_mask` (`True` for real entries).
    """

    positions: Float[Array, "*batch atoms 3"]
    atomic_numbers: Int[Array, "*batch atoms"]
    system_index: Int[Array, "*batch atoms"]
    edge_index: Int[Array, "*batch 2 edges"]
    edge_shift: Float[Array, "*batch edges 3"]
    cell: Float[Array, "*batch systems 3 3"]
    charge: Int[Array, "*batch systems"]
    spin: Int[Array, "*batch systems"]
    dataset_index: Int[Array, "*batch systems"]
    atom_mask: Bool[Array, "*batch atoms"]
    edge_mask: Bool[Array, "*batch edges"]
    system_mask: Bool[Array, "*batch systems"]
    #: `(max_num_elements, num_datasets)` of a model whose run-time checks the host has
    #: already made ([`uma_eqx.AtomicGraph.host_checked`][]); `None`: checked on device.
    checked_for: tuple[int, int] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        atoms, edges, systems = self.num_atoms, self.num_edges, self.num_systems
        batch = self.batch_shape
        expected = {
            "positions": (atoms, 3),
            "atomic_numbers": (atoms,),
            "system_index": (atoms,),
            "edge_index": (2, edges),
            "edge_shift": (edges, 3),
            "cell": (systems, 3, 3),
            "charge": (systems,),
            "spin": (systems,),
            "dataset_index": (systems,),
            "atom_mask": (atoms,),
            "edge_mask": (edges,),
            "system_mask": (systems,),
        }
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != batch + shape:
                raise ValueError(
                    f"AtomicGraph.{name} has shape {actual}, expected {batch + shape} for "
                    f"{atoms} atoms, {edges} edges and {systems} systems with leading axes {batch} "
                    "(sizes taken from positions, edge_index and cell)."
                )

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading axes of a stack of graphs (see [`uma_eqx.stack_graphs`][]); `()` for one graph."""
        return tuple(self.positions.shape[:-2])

    @property
    def num_atoms(self) -> int:
        """Number of atoms, padding included (static)."""
        return self.positions.shape[-2]

    @property
    def num_edges(self) -> int:
        """Number of edges, padding included (static)."""
        return self.edge_index.shape[-1]

    @property
    def num_systems(self) -> int:
        """Number of systems, padding included (static)."""
        return self.cell.shape[-3]

    def _require_single(self, what: str) -> None:
        if self.batch_shape:
            raise ValueError(
                f"AtomicGraph.{what} takes one graph, got a stack with leading axes {self.batch_shape}: "
                "use jax.vmap over the leading axis"
            )

    def checked(self, max_num_elements: int, num_datasets: int) -> "AtomicGraph":
        """The graph, with a run-time error (`eqx.error_if`) if a model cannot evaluate it.

        A graph built by [`uma_eqx.AtomicGraph.from_atoms`][] always passes; a hand-built one
        (or one assembled inside `jit`, e.g. by a neighbour list) may not, and would otherwise
        be clamped silently by the embedding lookups. Checked, once per call, on device (unless
        [`uma_eqx.AtomicGraph.host_checked`][] marked the graph for a model of these sizes):

        - real atoms' atomic numbers in `1 .. max_num_elements - 1` (padded atoms may be 0);
        - edge endpoints in `0 .. atoms - 1`, atoms' systems in `0 .. systems - 1`;
        - charge and spin within the embedding tables (fairchem's ranges), dataset indices in
          `0 .. num_datasets - 1`.

        **Arguments:**

        - `max_num_elements`: rows of the model's element embedding.
        - `num_datasets`: number of the model's datasets.

        **Returns:**

        The same graph (its positions carry the check, so it cannot be optimised away).
        """
        self._require_single("checked")
        if self.checked_for == (max_num_elements, num_datasets):
            return self  # checked on the host (host_checked) for a model of these sizes
        checks = jnp.stack(self._violations(jnp, max_num_elements, num_datasets))
        messages = _violation_messages(max_num_elements, num_datasets)
        positions = eqx.branched_error_if(self.positions, jnp.any(checks), jnp.argmax(checks), messages)
        return eqx.tree_at(lambda g: g.positions, self, positions)

    def host_checked(self, max_num_elements: int, num_datasets: int) -> "AtomicGraph":
        """The graph, checked now on the host, marked so that the model skips its run-time check.

        The same checks as [`uma_eqx.AtomicGraph.checked`][], made with numpy. A marked graph
        compiles a program without `eqx.error_if`'s host callback, and JAX writes no program
        with a host callback to the on-disk compilation cache
        ([`uma_eqx.enable_compilation_cache`][]): engines that build a graph and hand it
        straight to the model (the ASE calculator) mark it, so a new process loads their
        programs instead of compiling them. The mark is static and survives edits such as
        `eqx.tree_at`: mark a graph only after its last edit.

        **Arguments:**

        - `max_num_elements`: rows of the model's element embedding.
        - `num_datasets`: number of the model's datasets.

        **Returns:**

        The same graph with `checked_for=(max_num_elements, num_datasets)`.

        **Raises:**

        `ValueError` with `checked`'s message for the first check that fails, or when the
        graph is traced (inside `jit`; use `checked` there).
        """
        self._require_single("host_checked")
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(self)):
            raise ValueError("AtomicGraph.host_checked needs concrete arrays, got a traced graph; use checked() in jit")
        violations = self._violations(np, max_num_elements, num_datasets)
        for bad, message in zip(violations, _violation_messages(max_num_elements, num_datasets)):
            if bad:
                raise ValueError(message)
        return dataclasses.replace(self, checked_for=(max_num_elements, num_datasets))

    def _violations(self, xp, max_num_elements: int, num_datasets: int) -> list:
        """`checked`'s six conditions (`True`: violated), with `xp` = `jnp` or `np`."""
        names = ("atomic_numbers", "atom_mask", "system_mask", "edge_index", "system_index", "charge", "spin")
        g = {name: xp.asarray(getattr(self, name)) for name in (*names, "dataset_index")}
        z, real, real_s = g["atomic_numbers"], g["atom_mask"], g["system_mask"]
        return [
            xp.any((real & ((z < 1) | (z >= max_num_elements))) | (z < 0) | (z >= max_num_elements)),
            xp.any((g["edge_index"] < 0) | (g["edge_index"] >= self.num_atoms)),
            xp.any((g["system_index"] < 0) | (g["system_index"] >= self.num_systems)),
            xp.any(real_s & ((g["charge"] < CHARGE_RANGE[0]) | (g["charge"] > CHARGE_RANGE[1]))),
            xp.any(real_s & ((g["spin"] < SPIN_RANGE[0]) | (g["spin"] > SPIN_RANGE[1]))),
            xp.any((g["dataset_index"] < 0) | (g["dataset_index"] >= num_datasets)),
        ]

    @property
    def num_atoms_per_system(self) -> Int[Array, " systems"]:
        """Number of real (unmasked) atoms in each system; 0 for padded systems."""
        return jax.ops.segment_sum(
            self.atom_mask.astype(jnp.int32),
            self.system_index,
            num_segments=self.num_systems,
        )

    def edge_vectors(self, far: float) -> Float[Array, "edges 3"]:
        """Edge vectors `r_j - r_i + S H`, with padded edges sent far away.

        Masked edges get the constant vector `(far, far, far)`; with `far` beyond the
        cutoff (fairchem's fake edge uses `cutoff + 1`) their envelope is exactly 0, and
        their length is never 0, so norms and directions stay finite (the masked branch
        has zero gradient).

        **Arguments:**

        - `far`: the component of the stand-in vector of masked edges.

        **Returns:**

        The edge vectors, in the dtype of `positions`.
        """
        self._require_single("edge_vectors")
        source, target = self.edge_index[0], self.edge_index[1]
        cell = self.cell[self.system_index[target]]
        shift = jnp.einsum("ek,ekd->ed", self.edge_shift.astype(cell.dtype), cell)
        vectors = self.positions[source] - self.positions[target] + shift
        far_vectors = jnp.full_like(vectors, far)
        return jnp.where(self.edge_mask[:, None], vectors, far_vectors)

    @classmethod
    def for_model(
        cls,
        model,
        atoms: "ase.Atoms | Sequence[ase.Atoms]",
        task_name: str | Sequence[str | None] | None = None,
        *,
        pad: "bool | PaddingSpec" = False,
        dtype: DTypeLike | None = None,
        min_distance: float | None = MIN_ATOM_DISTANCE,
    ) -> "AtomicGraph":
        """This model's graph of these structures: the one constructor every engine uses.

        Resolves each structure's task (`task_name`, else `atoms.info["task"]`, else the
        model's only task; see `UMAConfig.resolve_task`), checks each structure against the
        model (elements it covers, isolated atoms; `UMAConfig.check_atoms`), and builds the
        graph with the model's cutoff, datasets, neighbour cap and dtype
        ([`uma_eqx.AtomicGraph.from_atoms`][]).

        **Arguments:**

        - `model`: a [`uma_eqx.UMA`][] (anything with its `config` and `dtype`), or a
          `UMAConfig` (then the graph's float dtype is `dtype`, default float32).
        - `atoms`: one `ase.Atoms` or a sequence of them (one system each).
        - `task_name`: the task of every structure, one per structure (`None` entries fall
          back as above), or `None`.
        - `pad`, `min_distance`: as for `from_atoms`.
        - `dtype`: float dtype of the graph; default the model's.

        **Returns:**

        The `AtomicGraph`.

        **Raises:**

        `ValueError` naming the structure (`structure #k`) and the fix, for everything
        `from_atoms` refuses, an unknown or missing task, elements outside the model, and a
        lone non-periodic atom for a model without isolated-atom support.
        """
        import ase

        from ._config import UMAConfig

        if isinstance(model, UMAConfig):
            config, model_dtype = model, jnp.float32
        else:
            config, model_dtype = model.config, model.dtype
        structures = [atoms] if isinstance(atoms, ase.Atoms) else list(atoms)
        if task_name is None or isinstance(task_name, str):
            given = [task_name] * len(structures)
        else:
            given = list(task_name)
            if len(given) != len(structures):
                raise ValueError(
                    f"task_name has {len(given)} entries for {len(structures)} structures; give one per structure "
                    "or a single name"
                )
        tasks = []
        for k, (system, task) in enumerate(zip(structures, given)):
            if not isinstance(system, ase.Atoms):
                raise ValueError(f"structure #{k} is a {type(system).__name__}, not an ase.Atoms.")
            try:
                tasks.append(config.resolve_task(task, system))
            except ValueError as e:
                raise ValueError(f"structure #{k}: {e}") from None
            config.check_atoms(system, f"structure #{k}")
        graph = cls.from_atoms(
            structures,
            cutoff=config.cutoff,
            datasets=config.datasets,
            task_name=tasks,
            max_neighbors=config.max_neighbors,
            dtype=model_dtype if dtype is None else dtype,
            pad=pad,
            min_distance=min_distance,
        )
        return graph

    @classmethod
    def from_atoms(
        cls,
        atoms: "ase.Atoms | Sequence[ase.Atoms]",
        *,
        cutoff: float,
        datasets: Sequence[str],
        task_name: str | Sequence[str],
        max_neighbors: int | None = MAX_NEIGHBORS,
        dtype: DTypeLike | None = jnp.float32,
        pad: "bool | PaddingSpec" = False,
        min_distance: float | None = MIN_ATOM_DISTANCE,
    ) -> "AtomicGraph":
        """Build a batch from ASE structures, exactly as fairchem prepares them.

        Engines and workflows use [`uma_eqx.AtomicGraph.for_model`][], which takes the
        cutoff, datasets, neighbour cap and dtype from a model and checks the structures
        against it; this is the model-independent step below it.

        Port of `fairchem.core.calculate.ase_calculator.FAIRChemCalculator.calculate`'s
        checks, `validate_uma_atoms_data`, `AtomicData.from_ase` and the model's
        on-the-fly `radius_graph_pbc_v2` graph
        (see [`uma_eqx.neighbors.radius_graph`][]). Runs on the host with numpy; the
        graph is computed in float64 on the wrapped positions, then everything is
        converted to jax arrays. Unlike fairchem, `atoms.info` is not modified.

        Per system: positions are wrapped into the cell along periodic axes
        (`ase.geometry.wrap_positions(..., eps=0)`); the cell is
        `atoms.get_cell(complete=True)`; `charge` and `spin` come from `atoms.info`,
        defaulting to 0 and to 1 for task `"omol"` (0 otherwise).

        **Arguments:**

        - `atoms`: one `ase.Atoms` or a sequence of them (one system each).
        - `cutoff`: graph radius in Å (inclusive), the model's `cutoff`.
        - `datasets`: the model's dataset (task) names, in order.
        - `task_name`: the dataset of every system, or one per system.
        - `max_neighbors`: fairchem's neighbour cap (`None`: no cap).
        - `dtype`: float dtype of positions, shifts and cells; `None` for JAX's default.
        - `pad`: `False` for exact sizes, `True` for bucketed sizes (`PaddingSpec()`),
            or a [`uma_eqx.PaddingSpec`][] (then [`uma_eqx.pad_graph`][] is applied).
        - `min_distance`: refuse structures with two atoms (or an atom and a periodic image
            of another) closer than this, in Å (default 0.1 Å; fairchem silently drops a
            zero-length edge); `None` turns the check off.

        **Returns:**

        The `AtomicGraph` of the batch.

        **Raises:**

        `ValueError` for an empty batch or structure, non-finite positions or cell, atoms
        closer than `min_distance`, an unknown task name, charge/spin of the wrong type or
        out of range, an all-periodic system with a zero-volume cell, or a partly periodic
        one with a cell under 0.1 Å³.
        """
        import ase
        from ase.geometry import wrap_positions

        if isinstance(atoms, ase.Atoms):
            structures = [atoms]
        elif isinstance(atoms, Sequence):
            structures = list(atoms)
        else:
            raise ValueError(
                f"AtomicGraph.from_atoms needs an ase.Atoms or a sequence of them, got {type(atoms).__name__}."
            )
        if len(structures) == 0:
            raise ValueError("AtomicGraph.from_atoms got an empty sequence of structures; pass at least one ase.Atoms.")
        tasks = _task_names(task_name, len(structures))
        datasets = list(datasets)

        positions, numbers, system_index, cells = [], [], [], []
        charges, spins, dataset_index = [], [], []
        edge_index, edge_shift = [], []
        offset = 0
        for k, (system, task) in enumerate(zip(structures, tasks)):
            if not isinstance(system, ase.Atoms):
                raise ValueError(f"Structure #{k} is a {type(system).__name__}, not an ase.Atoms.")
            if task not in datasets:
                raise ValueError(
                    f"task_name {task!r} (structure #{k}) is not one of the model's "
                    f"datasets {datasets}; pass one of those."
                )
            pos, cell, pbc = _checked_geometry(system, k)
            charge, spin = _charge_and_spin(system.info, task, k)
            # ase documents pbc as one or 3 bools; pyright infers `bool` from the unannotated default
            pos = wrap_positions(pos, cell, pbc=pbc, eps=0)  # pyright: ignore[reportArgumentType]
            if min_distance is not None:
                _check_min_distance(pos, cell, pbc, min_distance, k)
            edges, shifts = radius_graph(pos, cell, pbc, cutoff, max_neighbors)

            positions.append(pos)
            numbers.append(np.asarray(system.get_atomic_numbers(), dtype=np.int64))
            system_index.append(np.full(len(system), k, dtype=np.int64))
            cells.append(cell)
            charges.append(charge)
            spins.append(spin)
            dataset_index.append(datasets.index(task))
            edge_index.append(edges + offset)
            edge_shift.append(shifts)
            offset += len(system)

        edge_index = np.concatenate(edge_index, axis=1)
        edge_shift = np.concatenate(edge_shift, axis=0)
        edge_mask = np.ones(edge_index.shape[1], dtype=bool)
        if edge_index.shape[1] == 0:
            # fairchem's `add_n_empty_edges`: one fake edge, far away, on atom 0.
            edge_index = np.zeros((2, 1), dtype=np.int64)
            edge_shift = np.zeros((1, 3), dtype=np.int64)
            edge_mask = np.zeros(1, dtype=bool)

        float_dtype = jax.dtypes.canonicalize_dtype(np.float64 if dtype is None else dtype)
        graph = cls(
            positions=_device_array(np.concatenate(positions), float_dtype),
            atomic_numbers=_device_array(np.concatenate(numbers)),
            system_index=_device_array(np.concatenate(system_index)),
            edge_index=_device_array(edge_index),
            edge_shift=_device_array(edge_shift, float_dtype),
            cell=_device_array(np.stack(cells), float_dtype),
            charge=_device_array(np.asarray(charges, dtype=np.int64)),
            spin=_device_array(np.asarray(spins, dtype=np.int64)),
            dataset_index=_device_array(np.asarray(dataset_index, dtype=np.int64)),
            atom_mask=_device_array(np.ones(offset, dtype=bool)),
            edge_mask=_device_array(edge_mask),
            system_mask=_device_array(np.ones(len(structures), dtype=bool)),
        )
        if pad is False:
            return graph
        spec = PaddingSpec() if pad is True else pad
        if not isinstance(spec, PaddingSpec):
            raise ValueError(f"`pad` must be a bool or a PaddingSpec, got {pad!r}.")
        return pad_graph(graph, *spec.sizes(graph))


def stack_graphs(graphs: Sequence[AtomicGraph]) -> AtomicGraph:
    """Stack graphs of equal sizes along a new leading axis (for `jax.vmap` or sharding).

    Pad them to common sizes first (e.g. `pad_graph` with one `PaddingSpec` of fixed
    capacities). The result has `batch_shape == (len(graphs),)`; the model takes one graph,
    so map it over the leading axis: `jax.vmap(lambda g: model(g))(stacked)`.

    **Arguments:**

    - `graphs`: graphs with identical `num_atoms`, `num_edges`, `num_systems` and dtypes.

    **Returns:**

    The stacked `AtomicGraph`.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("stack_graphs needs at least one graph.")
    sizes = {(g.num_atoms, g.num_edges, g.num_systems, g.batch_shape) for g in graphs}
    if len(sizes) != 1:
        raise ValueError(
            f"stack_graphs needs graphs of one size, got (atoms, edges, systems, leading axes) {sorted(sizes)}; "
            "pad them to common sizes with pad_graph first."
        )
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *graphs)


def bucket_size(n: int) -> int:
    """Round `n` up to three significant bits.

    The buckets are 1, 2, ..., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (every integer
    up to 8, then `m * 2**k` with `m` in 4..7): four sizes per doubling, so padding adds
    at most 25% and a stream of batches compiles only a few shapes.

    **Arguments:**

    - `n`: a size, `>= 0`.

    **Returns:**

    The smallest bucket `>= max(n, 1)`.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"bucket_size needs a non-negative int, got {n!r}.")
    n = max(int(n), 1)
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)  # keep the top three bits
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class PaddingSpec:
    """Target sizes for padding an `AtomicGraph`, fixed or bucketed.

    Each of `num_atoms`, `num_edges`, `num_systems` is either a fixed capacity or `None`
    for [`uma_eqx.bucket_size`][] of what the batch needs. Padded atoms need a padded
    system to live in, and padded edges a padded atom, so a bucketed size grows by one
    entry first when needed (e.g. 3 real systems plus padded atoms give `bucket_size(4)`
    systems).
    """

    num_atoms: int | None = None
    num_edges: int | None = None
    num_systems: int | None = None

    def __post_init__(self):
        for name in ("num_atoms", "num_edges", "num_systems"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"PaddingSpec.{name} must be a positive int or None (bucketed), got {value!r}.")

    def sizes(self, graph: AtomicGraph) -> tuple[int, int, int]:
        """The `(num_atoms, num_edges, num_systems)` to pad an unpadded `graph` to.

        **Arguments:**

        - `graph`: the graph to pad.

        **Returns:**

        Sizes to pass to [`uma_eqx.pad_graph`][], which checks that they fit.
        """
        n_atoms, n_edges = graph.num_atoms, graph.num_edges
        n_systems = graph.num_systems
        edges = self.num_edges if self.num_edges is not None else bucket_size(n_edges)
        atoms = self.num_atoms
        if atoms is None:
            atoms = bucket_size(n_atoms + (1 if edges > n_edges else 0))
        systems = self.num_systems
        if systems is None:
            systems = bucket_size(n_systems + (1 if atoms > n_atoms else 0))
        return atoms, edges, systems


def pad_graph(graph: AtomicGraph, num_atoms: int, num_edges: int, num_systems: int) -> AtomicGraph:
    """Pad a graph with masked atoms, edges and systems to the given sizes.

    New atoms go to the last system, new edges are zero-shift self-loops on the last
    atom; so when atoms are added the last system must be padding (a new one, or already
    masked), and when edges are added the last atom must be. Real content, and the order
    of edges by target, are unchanged. Padded values are described in
    [`uma_eqx.AtomicGraph`][]. Call it outside `jit` (it reads the masks).

    **Arguments:**

    - `graph`: the graph to pad.
    - `num_atoms`, `num_edges`, `num_systems`: the new sizes, each at least the current
        one.

    **Returns:**

    The padded `AtomicGraph`.
    """
    sizes = {
        "num_atoms": (num_atoms, graph.num_atoms),
        "num_edges": (num_edges, graph.num_edges),
        "num_systems": (num_systems, graph.num_systems),
    }
    for name, (new, old) in sizes.items():
        if isinstance(new, bool) or not isinstance(new, (int, np.integer)) or new < old:
            raise ValueError(
                f"pad_graph: {name}={new!r} must be an int >= the graph's current {old}; use a larger {name}."
            )
    add_atoms = num_atoms - graph.num_atoms
    add_edges = num_edges - graph.num_edges
    add_systems = num_systems - graph.num_systems
    if add_atoms > 0 and add_systems == 0 and _last_is_real(graph.system_mask):
        raise ValueError(
            f"pad_graph: adding {add_atoms} padded atoms needs a padded system, but "
            f"num_systems={num_systems} leaves none; use num_systems >= "
            f"{graph.num_systems + 1}."
        )
    if add_edges > 0 and add_atoms == 0 and _last_is_real(graph.atom_mask):
        raise ValueError(
            f"pad_graph: adding {add_edges} padded edges needs a padded atom, but "
            f"num_atoms={num_atoms} leaves none; use num_atoms >= "
            f"{graph.num_atoms + 1} (and one more system)."
        )

    # on the host with numpy unless traced: eager jnp ops would compile a program per shape
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(graph))
    xp = jnp if traced else np

    def host(array):
        return array if traced else np.asarray(array)

    def finish(array) -> Array:
        return cast(Array, array) if traced else _device_array(array)

    def extend(array, count, value, axis=0) -> Array:
        shape = list(array.shape)
        shape[axis] = count
        fill = xp.full(shape, value, dtype=array.dtype)
        return finish(xp.concatenate([host(array), fill], axis=axis))

    pad_system, pad_atom = num_systems - 1, num_atoms - 1
    eye = xp.broadcast_to(xp.eye(3, dtype=graph.cell.dtype), (add_systems, 3, 3))
    cell = finish(xp.concatenate([host(graph.cell), eye]))
    return AtomicGraph(
        positions=extend(graph.positions, add_atoms, 0),
        atomic_numbers=extend(graph.atomic_numbers, add_atoms, 0),
        system_index=extend(graph.system_index, add_atoms, pad_system),
        edge_index=extend(graph.edge_index, add_edges, pad_atom, axis=1),
        edge_shift=extend(graph.edge_shift, add_edges, 0),
        cell=cell,
        charge=extend(graph.charge, add_systems, 0),
        spin=extend(graph.spin, add_systems, 0),
        dataset_index=extend(graph.dataset_index, add_systems, 0),
        atom_mask=extend(graph.atom_mask, add_atoms, False),
        edge_mask=extend(graph.edge_mask, add_edges, False),
        system_mask=extend(graph.system_mask, add_systems, False),
        checked_for=graph.checked_for,  # padding keeps every checked range
    )


def _violation_messages(max_num_elements: int, num_datasets: int) -> list[str]:
    """The error of each of `AtomicGraph._violations`' conditions, in order."""
    return [
        f"AtomicGraph: an atomic number is outside 1..{max_num_elements - 1} (or a padded atom's outside "
        f"0..{max_num_elements - 1}); build the graph with AtomicGraph.from_atoms or fix atomic_numbers",
        "AtomicGraph: edge_index has an entry < 0 or >= the number of atoms; fix edge_index",
        "AtomicGraph: system_index has an entry < 0 or >= the number of systems; fix system_index",
        f"AtomicGraph: a charge is outside {list(CHARGE_RANGE)}; fix charge",
        f"AtomicGraph: a spin is outside {list(SPIN_RANGE)}; fix spin",
        f"AtomicGraph: a dataset_index is outside 0..{num_datasets - 1}; fix dataset_index",
    ]


def _last_is_real(mask: Bool[Array, " n"]) -> bool:
    """Whether the last entry is real; `True` (conservative) when traced or empty."""
    if isinstance(mask, jax.core.Tracer) or mask.shape[0] == 0:
        return True
    return bool(np.asarray(mask)[-1])


def _device_array(array, dtype: DTypeLike | None = None) -> Array:
    """A host array on JAX's default device, in `dtype` (default its own) as JAX canonicalises
    it (int64 to int32 without x64). `jax.device_put` only transfers; `jnp.asarray` would
    compile a small program per shape, which dominates a fresh process's first graphs."""
    host = np.asarray(array, dtype=dtype)
    return jax.device_put(host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False))


def _task_names(task_name: str | Sequence[str], num_systems: int) -> list[str]:
    if isinstance(task_name, str):
        return [task_name] * num_systems
    tasks = list(task_name)
    if len(tasks) != num_systems or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"task_name must be a str or one str per structure ({num_systems}), got {task_name!r}.")
    return tasks


def _checked_geometry(
    system: "ase.Atoms", k: int
) -> tuple[Float[np.ndarray, "atoms 3"], Float[np.ndarray, "3 3"], Bool[np.ndarray, "3"]]:
    """Positions, complete cell and pbc of one structure, with fairchem's checks."""
    if len(system) == 0:
        raise ValueError(f"Structure #{k} ({system!r}) has no atoms; remove it from the batch.")
    pos = np.array(system.get_positions(), dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        atom = int(np.argwhere(~np.isfinite(pos))[0, 0])
        raise ValueError(
            f"Structure #{k} has a non-finite position {pos[atom].tolist()} at atom {atom}; positions must be finite."
        )
    pbc = np.array(system.pbc, dtype=bool)
    given = np.array(system.cell, dtype=np.float64)
    if not np.all(np.isfinite(given)):
        raise ValueError(
            f"Structure #{k} has a non-finite cell {given.tolist()}; give finite lattice vectors "
            "(or a zero cell for a molecule)."
        )
    cell = np.array(system.get_cell(complete=True), dtype=np.float64)
    volume = float(system.cell.volume)  # of the cell as given, not the completed one
    if pbc.all() and volume < _PBC_MIN_VOLUME:
        raise ValueError(
            f"Structure #{k} is periodic along all axes but its cell "
            f"{np.asarray(system.cell).tolist()} has volume {volume:g} Å³; set a cell with three "
            "independent lattice vectors, or set pbc=False for a molecule."
        )
    if pbc.any() and not pbc.all() and volume < _MIXED_PBC_MIN_VOLUME:
        raise ValueError(
            f"Structure #{k} has pbc={pbc.tolist()} but its cell volume "
            f"{volume:g} Å³ is below {_MIXED_PBC_MIN_VOLUME} Å³ (fairchem "
            "requires a full 3D cell for partly periodic systems); give the cell three "
            "lattice vectors, e.g. with vacuum along the non-periodic axes."
        )
    return pos, cell, pbc


def _check_min_distance(
    pos: Float[np.ndarray, "atoms 3"],
    cell: Float[np.ndarray, "3 3"],
    pbc: Bool[np.ndarray, "3"],
    min_distance: float,
    k: int,
) -> None:
    """Refuse two atoms, or an atom and a periodic image of another, closer than `min_distance`."""
    vesin = import_vesin()

    if len(pos) < 2 and not pbc.any():
        return
    box = cell if pbc.any() else np.eye(3)
    i, j, d = vesin.NeighborList(cutoff=float(min_distance), full_list=False).compute(
        points=pos, box=box, periodic=pbc, quantities="ijd"
    )
    close = np.flatnonzero(d < min_distance)
    if close.size:
        e = close[np.argmin(d[close])]
        raise ValueError(
            f"Structure #{k}: atoms {int(i[e])} and {int(j[e])} are {d[e]:.3g} Å apart (closest pair, counting "
            f"periodic images), below the minimum of {min_distance} Å; remove the duplicated atom or fix the "
            "coordinates (or pass min_distance=None to AtomicGraph.from_atoms)."
        )


def _charge_and_spin(info: dict, task: str, k: int) -> tuple[int, int]:
    """Total charge and spin multiplicity of one structure, as fairchem reads them."""
    default_spin = _DEFAULT_SPIN_OMOL if task == _OMOL_TASK else _DEFAULT_SPIN
    values = {
        "charge": (info.get("charge", _DEFAULT_CHARGE), CHARGE_RANGE),
        "spin": (info.get("spin", default_spin), SPIN_RANGE),
    }
    out = []
    for name, (value, (low, high)) in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"Structure #{k}: atoms.info[{name!r}] = {value!r} "
                f"({type(value).__name__}) must be an int in [{low}, {high}]."
            )
        if not low <= value <= high:
            raise ValueError(
                f"Structure #{k}: atoms.info[{name!r}] = {value} is outside the allowed range [{low}, {high}]."
            )
        out.append(int(value))
    return out[0], out[1]
