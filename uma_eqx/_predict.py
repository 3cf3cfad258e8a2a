"""`predict`: stream many structures through a model in padded, bucketed batches."""

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence

import ase
import numpy as np

from ._config import UMAConfig
from ._graph import AtomicGraph, bucket_size, pad_graph
from ._potential import UMA, energy_forces_stress


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
    if task_name is not None and not isinstance(task_name, str):
        if k >= len(task_name):
            raise ValueError(f"task_name has {len(task_name)} entries but there are more structures.")
        task_name = task_name[k]
    try:
        return config.resolve_task(task_name, atoms)
    except ValueError as e:
        raise ValueError(f"structure #{k}: {e}") from None


def predict(
    model: UMA,
    structures: "str | os.PathLike | ase.Atoms | Iterable",
    *,
    task_name: str | Sequence[str] | None = None,
    batch_size: int = 16,
    stress: bool = True,
    progress: bool = True,
) -> list[dict[str, np.ndarray | float | str]]:
    """Energy, forces and stress of many structures, batched and padded.

    Structures (mixed sizes, periodic or not, mixed tasks, charge and spin from
    `atoms.info` as in fairchem's calculator) are grouped `batch_size` at a time into one
    [`uma_eqx.AtomicGraph`][] each. Batches are padded to grow-only bucketed capacities
    (atoms and edges rounded up by [`uma_eqx.bucket_size`][], at most 25% padding; the
    system count fixed at `batch_size + 1`), so a stream of any length compiles only when a
    batch is larger than every earlier one, a handful of times in all. Experts are mixed per
    system (no merging), so results equal the one-by-one calculator's up to round-off.

    **Arguments:**

    - `model`: the model.
    - `structures`: a list/iterable of `ase.Atoms`, one `ase.Atoms`, or a path to any file
        ASE reads (all frames are streamed).
    - `task_name`: one task for all, one per structure, or `None` to take each structure's
        `atoms.info["task"]` (or the model's only task).
    - `batch_size`: structures per batch.
    - `stress`: also compute the stress.
    - `progress`: show a tqdm progress bar.

    **Returns:**

    One dict per structure, in input order: `energy` (eV, float), `forces` (`(n, 3)` eV/Å),
    `stress` (`(3, 3)` eV/Å³, if requested; as fairchem, also for non-periodic structures,
    with its identity cell of 1 Å³ as the volume), `task`, `natoms`.

    **Raises:**

    `ValueError` naming the structure for unknown tasks, elements outside the model,
    unsupported single atoms, and anything [`uma_eqx.AtomicGraph.from_atoms`][] refuses.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    cfg = model.config
    capacity = _Capacity()
    results: list[dict] = []
    batch: list[ase.Atoms] = []
    tasks: list[str] = []
    bar = tqdm(desc="predict", unit="structure", disable=not progress)

    def flush():
        first = len(results)
        try:
            graph = AtomicGraph.from_atoms(
                batch, cutoff=cfg.cutoff, datasets=cfg.datasets, task_name=tasks,
                max_neighbors=cfg.max_neighbors, dtype=model.dtype,
            )
        except ValueError as e:
            raise ValueError(f"in the batch of structures #{first}..#{first + len(batch) - 1}: {e}") from None
        atoms_cap, edges_cap = capacity.fit(graph)
        graph = pad_graph(graph, atoms_cap, edges_cap, batch_size + 1)
        out = energy_forces_stress(model, graph, stress=stress)
        energy = np.asarray(out["energy"], dtype=np.float64)
        forces = np.asarray(out["forces"], dtype=np.float64)
        sigma = np.asarray(out["stress"], dtype=np.float64) if stress else None
        start = 0
        for k, (atoms, task) in enumerate(zip(batch, tasks)):
            n = len(atoms)
            row = {"energy": float(energy[k]), "forces": forces[start : start + n], "task": task, "natoms": n}
            if stress:
                row["stress"] = sigma[k]
            results.append(row)
            start += n
        bar.update(len(batch))
        batch.clear()
        tasks.clear()

    try:
        for k, atoms in enumerate(_structures(structures)):
            if not isinstance(atoms, ase.Atoms):
                raise ValueError(f"structure #{k} is a {type(atoms).__name__}, not an ase.Atoms.")
            task = _task_of(cfg, atoms, task_name, k)
            cfg.check_atoms(atoms, f"structure #{k}")
            batch.append(atoms)
            tasks.append(task)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
    if task_name is not None and not isinstance(task_name, str) and len(task_name) != len(results):
        raise ValueError(f"task_name has {len(task_name)} entries for {len(results)} structures.")
    return results
