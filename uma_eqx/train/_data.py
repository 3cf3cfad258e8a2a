"""Labelled structures from extxyz / ASE databases, batched into padded graphs."""

import dataclasses
import os
from collections.abc import Sequence
from typing import cast

import numpy as np
from ase import Atoms

from .._config import UMAConfig
from .._graph import AtomicGraph, PaddingSpec, pad_graph


@dataclasses.dataclass
class Record:
    """One labelled structure.

    **Attributes:**

    - `atoms`: the `ase.Atoms` (its `info` carries `charge`, `spin`, `task`).
    - `energy`: total energy (eV).
    - `forces`: `(n, 3)` forces (eV/Å) or `None`.
    - `stress`: `(3, 3)` stress (eV/Å³, ASE sign) or `None`.
    - `task`: dataset/task name.
    - `source`: `path[index]`, used in error messages.
    """

    atoms: Atoms
    energy: float
    forces: np.ndarray | None
    stress: np.ndarray | None
    task: str
    source: str
    num_edges: int | None = None


def _label(atoms, name, getter):
    try:
        return getter()
    except Exception:
        return atoms.info.get(name)


def read_dataset(paths: "str | os.PathLike | Sequence[str | os.PathLike]", task: str | None = None) -> list[Record]:
    """Read labelled structures from extxyz (or any ASE-readable) files or ASE databases (`.db`).

    Energy is required; forces and stress are used when present. The task is
    `atoms.info["task"]`, else `task`.

    **Raises:**

    `ValueError` naming the record (`path[index]`) for a missing energy, forces of the wrong
    shape, non-finite labels or positions, or no task.
    """
    from ase.io import read

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset file not found: {path!r}")
        if path.endswith(".db"):
            import ase.db

            frames: list[Atoms] = [
                row.toatoms(add_additional_information=True) for row in ase.db.connect(path).select()
            ]
            for a in frames:
                a.info.update(a.info.pop("key_value_pairs", {}) or {})
        else:
            frames = cast(list[Atoms], read(path, ":"))  # index ":" reads a list
        for i, atoms in enumerate(frames):
            src = f"{path}[{i}]"
            energy = _label(atoms, "energy", atoms.get_potential_energy)
            if energy is None:
                raise ValueError(f"{src}: no energy label (store it with the calculator or info['energy'])")
            energy = float(energy)
            forces = _label(atoms, "forces", atoms.get_forces)
            if forces is not None:
                forces = np.asarray(forces, np.float64)
                if forces.shape != (len(atoms), 3):
                    raise ValueError(f"{src}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
            stress = _label(atoms, "stress", atoms.get_stress)
            if stress is not None:
                stress = np.asarray(stress, np.float64)
                if stress.shape == (6,):
                    from ase.stress import voigt_6_to_full_3x3_stress

                    stress = voigt_6_to_full_3x3_stress(stress)
                if stress.shape != (3, 3):
                    raise ValueError(f"{src}: stress has shape {stress.shape}, expected (6,) or (3, 3)")
            for name, value in (
                ("energy", energy),
                ("forces", forces),
                ("stress", stress),
                ("positions", atoms.positions),
            ):
                if value is not None and not np.all(np.isfinite(value)):
                    raise ValueError(f"{src}: non-finite {name} (NaN or inf); fix or drop this record")
            name = atoms.info.get("task", task)
            if name is None:
                raise ValueError(f"{src}: no task: set atoms.info['task'] or pass task=")
            atoms.calc = None
            records.append(Record(atoms, energy, forces, stress, str(name), src))
    if not records:
        raise ValueError(f"no structures in {list(map(str, paths))}")
    return records


def check_records(records: Sequence[Record], config: UMAConfig) -> None:
    """Errors naming the record for elements or tasks the model does not have."""
    for r in records:
        config.check_atoms(r.atoms, str(r.source))
        if r.task not in config.task_names:
            raise ValueError(f"{r.source}: task {r.task!r} is not one of the model's tasks {list(config.task_names)}")


@dataclasses.dataclass
class Batch:
    """A padded graph with its labels (padded entries are masked out of the loss)."""

    graph: AtomicGraph
    energy: np.ndarray  # (systems,)
    forces: np.ndarray  # (atoms, 3)
    stress: np.ndarray  # (systems, 3, 3)
    has_forces: np.ndarray  # (atoms,) bool
    has_stress: np.ndarray  # (systems,) bool


#: Head-room of the fixed batch capacity over `batch_size` average structures.
CAPACITY_MARGIN = 1.25


def count_edges(records: Sequence[Record], config: UMAConfig) -> None:
    """Store each record's edge count (`record.num_edges`), used to pack batches."""
    from ..neighbors import radius_graph

    for r in records:
        if getattr(r, "num_edges", None) is None:
            a = r.atoms
            edge_index, _ = radius_graph(
                np.asarray(a.positions, np.float64),
                np.asarray(a.cell.complete(), np.float64),
                np.asarray(a.pbc, bool),
                float(config.cutoff),
                config.max_neighbors,
            )
            r.num_edges = int(edge_index.shape[1])


def batch_capacity(records: Sequence[Record], config: UMAConfig, batch_size: int) -> PaddingSpec:
    """Fixed padding sizes for packed batches of about `batch_size` average records.

    Batches are packed greedily up to this capacity (see [`pack_batches`][]), so a run compiles
    once and padding wastes at most ~25%.
    """
    count_edges(records, config)
    atoms = np.array([len(r.atoms) for r in records])
    edges = np.array([r.num_edges for r in records])
    n_atoms = int(max(CAPACITY_MARGIN * batch_size * atoms.mean(), atoms.max())) + 1
    n_edges = int(max(CAPACITY_MARGIN * batch_size * edges.mean(), edges.max(), 1))
    return PaddingSpec(num_atoms=n_atoms, num_edges=n_edges, num_systems=2 * batch_size + 1)


def make_batch(records: Sequence[Record], config: UMAConfig, padding: PaddingSpec, dtype) -> Batch:
    """Build one padded batch (graph + labels) from `records`."""
    graph = AtomicGraph.for_model(config, [r.atoms for r in records], [r.task for r in records], dtype=dtype)
    graph = pad_graph(graph, *padding.sizes(graph))
    n_atoms, n_systems = graph.num_atoms, graph.num_systems
    energy = np.zeros(n_systems)
    forces = np.zeros((n_atoms, 3))
    stress = np.zeros((n_systems, 3, 3))
    has_f = np.zeros(n_atoms, bool)
    has_s = np.zeros(n_systems, bool)
    start = 0
    for s, r in enumerate(records):
        n = len(r.atoms)
        energy[s] = r.energy
        if r.forces is not None:
            forces[start : start + n] = r.forces
            has_f[start : start + n] = True
        if r.stress is not None:
            stress[s] = r.stress
            has_s[s] = True
        start += n
    return Batch(graph, energy, forces, stress, has_f, has_s)


def empty_batch(padding: PaddingSpec, dtype, like: AtomicGraph | None = None) -> Batch:
    """A batch of padding only (no systems, no labels), for a device without records in a step.

    **Arguments:**

    - `padding`: fixed capacities (see [`batch_capacity`][]).
    - `dtype`: float dtype of the graph.
    - `like`: a graph whose static fields the empty one copies (see
        [`uma_eqx.parallel.empty_graph`][]).
    """
    from ..parallel._data import empty_graph

    n_atoms, n_edges, n_systems = padding.num_atoms, padding.num_edges, padding.num_systems
    if n_atoms is None or n_edges is None or n_systems is None:
        raise ValueError(f"empty_batch needs fixed capacities (see batch_capacity), got {padding}")
    return Batch(
        empty_graph(n_atoms, n_edges, n_systems, dtype, like),
        np.zeros(n_systems),
        np.zeros((n_atoms, 3)),
        np.zeros((n_systems, 3, 3)),
        np.zeros(n_atoms, bool),
        np.zeros(n_systems, bool),
    )


def pack_batches(
    records: Sequence[Record], padding: PaddingSpec, rng: np.random.Generator | None
) -> list[list[Record]]:
    """Split one epoch (shuffled when `rng` is given) into batches that fit `padding`.

    Records are added in order until the next one would exceed the atom, edge or system
    capacity (one slot of each is kept for padding).
    """
    max_atoms, max_edges, max_systems = padding.num_atoms, padding.num_edges, padding.num_systems
    if max_atoms is None or max_edges is None or max_systems is None:
        raise ValueError(f"pack_batches needs fixed capacities (see batch_capacity), got {padding}")
    order = np.arange(len(records)) if rng is None else rng.permutation(len(records))
    batches, current, atoms, edges = [], [], 0, 0
    for j in order:
        r = records[int(j)]
        n, e = len(r.atoms), r.num_edges
        if e is None:
            raise ValueError(f"{r.source}: edges not counted; call count_edges(records, config) first")
        if current and (atoms + n >= max_atoms or edges + e > max_edges or len(current) + 1 >= max_systems):
            batches.append(current)
            current, atoms, edges = [], 0, 0
        current.append(r)
        atoms, edges = atoms + n, edges + e
    if current:
        batches.append(current)
    return batches
