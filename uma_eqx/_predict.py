"""`predict`: stream many structures through a model in padded, bucketed batches."""

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import ase
import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh

from ._config import UMAConfig
from ._graph import AtomicGraph, bucket_size, pad_graph
from ._potential import UMA, energy_forces_stress
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .parallel._data import (
    Device,
    batch_mesh,
    data_parallel,
    device_capacity,
    empty_graph,
    replicate,
    shard_stack,
    split_evenly,
    to_host,
)


@dataclasses.dataclass
class _Capacity:
    """Grow-only padded sizes: a stream compiles once per growth step, never per structure."""

    atoms: int = 0
    edges: int = 0

    def fit(self, graph: AtomicGraph) -> tuple[int, int]:
        self.atoms = max(self.atoms, bucket_size(graph.num_atoms + 1))  # +1: a padded atom for padded edges
        self.edges = max(self.edges, bucket_size(graph.num_edges))
        return self.atoms, self.edges


def _structures(structures: "str | os.PathLike | ase.Atoms | Iterable") -> Iterator[ase.Atoms]:
    if isinstance(structures, (str, os.PathLike)):
        from ase.io import iread

        if not os.path.exists(structures):
            raise FileNotFoundError(f"structure file not found: {os.fspath(structures)}")
        return iread(os.fspath(structures), index=":")
    if isinstance(structures, ase.Atoms):
        return iter([structures])
    return iter(structures)


def _task_of(config: UMAConfig, atoms: ase.Atoms, task_name, k: int) -> str:
    """Structure `k`'s task: its entry of `task_name`, else `atoms.info["task"]`, else the model's only task."""
    if task_name is not None and not isinstance(task_name, str):
        if k >= len(task_name):
            raise ValueError(f"task_name has {len(task_name)} entries but there are more structures.")
        task_name = task_name[k]
    try:
        return config.resolve_task(task_name, atoms)
    except ValueError as e:
        raise ValueError(f"structure #{k}: {e}") from None


@eqx.filter_jit
def _energy_forces_stress_over(
    model: UMA, graphs: AtomicGraph, mesh: Mesh, stress: bool, settings: ExecutionSettings
) -> dict[str, jax.Array]:
    """`energy_forces_stress` of each graph of a stack, the stack split over `mesh`."""

    def one(m, g):
        return energy_forces_stress(m, g, stress=stress, settings=settings)

    return data_parallel(one, mesh)(model, graphs)


def _relabel(message: str, k: int) -> str:
    """An error about a one-structure batch ("structure #0 ...") as one about structure `k`."""
    return re.sub(r"^[Ss]tructure #0\b", f"structure #{k}", message)


def predict(
    model: UMA,
    structures: "str | os.PathLike | ase.Atoms | Iterable",
    *,
    task_name: str | Sequence[str | None] | None = None,
    batch_size: int = 16,
    stress: bool = True,
    progress: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    settings: ExecutionSettings | None = None,
    devices: "int | Sequence[Device] | None" = None,
) -> list[dict[str, np.ndarray | float | str]]:
    """Energy, forces and stress of many structures, batched and padded.

    Structures (mixed sizes, periodic or not, mixed tasks, charge and spin from
    `atoms.info` as in fairchem's calculator) are grouped `batch_size` at a time into one
    [`uma_eqx.AtomicGraph`][] each ([`uma_eqx.AtomicGraph.for_model`][]). Batches are padded
    to grow-only bucketed capacities (atoms and edges rounded up by [`uma_eqx.bucket_size`][],
    at most 25% padding; the system count fixed at `batch_size + 1`), so a stream of any
    length compiles only when a batch is larger than every earlier one, a handful of times in
    all. Experts are mixed per system (no merging), so results equal the one-by-one
    calculator's up to round-off.

    Data parallel: each batch is split into one padded graph per device (contiguous groups
    of `ceil(batch_size / devices)` systems or fewer; a device left without systems gets a
    graph of padding only), the graphs are stacked along a leading axis sharded over a 1-D
    mesh of `devices`, and every device evaluates its own graph (`jax.shard_map`, see
    [`uma_eqx.parallel.data_parallel`][]). Results equal one device's up to round-off.

    **Arguments:**

    - `model`: the model.
    - `structures`: a list/iterable of `ase.Atoms`, one `ase.Atoms`, or a path to any file
        ASE reads (all frames are streamed).
    - `task_name`: one task for all, one per structure (`None` entries: that structure's
        default), or `None` to take each structure's `atoms.info["task"]` (or the model's
        only task).
    - `batch_size`: structures per batch.
    - `stress`: also compute the stress.
    - `progress`: show a tqdm progress bar.
    - `on_error`: `"raise"` (default): the first bad structure raises. `"skip"`: a bad
        structure gets the row `{"error": message, "natoms": n, "task": task or None}` (no
        energy) in its place and the others run.
    - `settings`: how to execute (see [`uma_eqx.ExecutionSettings`][]).
    - `devices`: devices to split each batch over: `None` (default) for all local devices,
        a count, or a list of `jax.Device`s ([`uma_eqx.parallel.resolve_devices`][]). After
        [`uma_eqx.parallel.initialize`][], `jax.devices()` spans every process: then every
        process must call `predict` with the same structures, and each gets all results.
        Use a `batch_size` that is a multiple of the device count to keep all busy.

    **Returns:**

    One dict per structure, in input order: `energy` (eV, float), `forces` (`(n, 3)` eV/Å),
    `stress` (`(3, 3)` eV/Å³, if requested; as fairchem, also for non-periodic structures,
    with its identity cell of 1 Å³ as the volume), `task`, `natoms`.

    **Raises:**

    With `on_error="raise"`, `ValueError` naming the structure (its place in the stream) for
    unknown tasks, elements outside the model, unsupported single atoms, and anything
    [`uma_eqx.AtomicGraph.from_atoms`][] refuses.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    settings = DEFAULT_SETTINGS if settings is None else settings
    mesh = batch_mesh(devices)
    num_devices = mesh.size
    systems_cap = device_capacity(batch_size, num_devices)
    shared = replicate(model, mesh)  # copied to every device once, not once per batch
    cfg = model.config
    capacity = _Capacity()
    results: dict[int, dict] = {}
    batch: list[tuple[int, ase.Atoms, str]] = []
    bar = tqdm(desc="predict", unit="structure", disable=not progress)

    def fail(k: int, atoms, task, message: str) -> None:
        if on_error == "raise":
            raise ValueError(message)
        natoms = len(atoms) if isinstance(atoms, ase.Atoms) else 0
        results[k] = {"error": message, "natoms": natoms, "task": task}
        bar.update(1)

    def build(entries):
        return AtomicGraph.for_model(model, [a for _, a, _ in entries], [t for _, _, t in entries])

    def flush():
        entries = list(batch)
        batch.clear()
        try:
            groups = [build(group) if group else None for group in split_evenly(entries, num_devices)]
        except ValueError:
            # find the bad structures one by one, name them by their place in the stream
            good = []
            for entry in entries:
                try:
                    build([entry])
                except ValueError as e:
                    fail(entry[0], entry[1], entry[2], _relabel(str(e), entry[0]))
                else:
                    good.append(entry)
            if not good:
                return
            entries = good
            groups = [build(group) if group else None for group in split_evenly(entries, num_devices)]
        atoms_cap = edges_cap = 0
        for graph in groups:
            if graph is not None:
                atoms_cap, edges_cap = capacity.fit(graph)
        like = next(graph for graph in groups if graph is not None)
        padded = [
            empty_graph(atoms_cap, edges_cap, systems_cap, model.dtype, like)
            if graph is None
            else pad_graph(graph, atoms_cap, edges_cap, systems_cap)
            for graph in groups
        ]
        out = to_host(_energy_forces_stress_over(shared, shard_stack(padded, mesh), mesh, stress, settings))
        energy = np.asarray(out["energy"], dtype=np.float64)
        forces = np.asarray(out["forces"], dtype=np.float64)
        sigma = np.asarray(out["stress"], dtype=np.float64) if stress else None
        for d, group in enumerate(split_evenly(entries, num_devices)):
            start = 0
            for s, (k, atoms, task) in enumerate(group):
                n = len(atoms)
                row = {"energy": float(energy[d, s]), "forces": forces[d, start : start + n], "task": task, "natoms": n}
                if sigma is not None:  # computed iff `stress`
                    row["stress"] = sigma[d, s]
                results[k] = row
                start += n
        bar.update(len(entries))

    count = 0
    try:
        for k, atoms in enumerate(_structures(structures)):
            count = k + 1
            task = None
            try:
                if not isinstance(atoms, ase.Atoms):
                    raise ValueError(f"structure #{k} is a {type(atoms).__name__}, not an ase.Atoms.")
                task = _task_of(cfg, atoms, task_name, k)
            except ValueError as e:
                fail(k, atoms, task, str(e))
                continue
            batch.append((k, atoms, task))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
    if task_name is not None and not isinstance(task_name, str) and len(task_name) != count:
        raise ValueError(f"task_name has {len(task_name)} entries for {count} structures.")
    return [results[k] for k in range(count)]
