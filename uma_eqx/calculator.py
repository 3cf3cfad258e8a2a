"""ASE calculator: a drop-in for fairchem's `FAIRChemCalculator`."""

import equinox as eqx
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ._graph import AtomicGraph
from ._potential import UMA, energy_forces_stress, merge_experts_for


@eqx.filter_jit
def _efs_merging_per_call(model: UMA, graph: AtomicGraph) -> dict:
    # The calculator's graph holds one real system (system 0; the others are padding): merge
    # its experts inside the call, as fairchem's MOLE does for a single system when
    # `merge_mole` is off. One matmul per layer and chunk, like a merged model; nothing is cached.
    return energy_forces_stress(merge_experts_for(model, graph), graph)


class UMACalculator(Calculator):
    """Energy, forces and stress of a [`uma_eqx.UMA`][] model for ASE.

    Mirrors `fairchem.core.calculate.ase_calculator.FAIRChemCalculator`: `task_name` is required
    when the model has several tasks; `charge` and `spin` are read from `atoms.info` (defaults
    0, and spin 1 for `omol`, 0 otherwise); positions are wrapped along periodic axes; the
    graph uses the model's cutoff and fairchem's neighbour cap; stress (ASE Voigt order, eV/Å³)
    is reported for every system, as fairchem does (for a non-periodic system the "volume" is
    fairchem's identity cell, 1 Å³).

    With `merge_experts=True` (default) the MoLE experts are merged for the current
    composition, charge, spin and task (fairchem's `merge_mole`), and re-merged automatically
    when any of them changes. Graphs are padded to bucketed sizes so that MD and relaxations
    compile only a handful of times.

    **Arguments:**

    - `model`: the model.
    - `task_name`: one of `model.config.task_names` (optional when there is only one).
    - `merge_experts`: merge MoLE experts per composition and keep the merged model until it
      changes (faster; same energies up to round-off). `False`: merge inside every call
      (fairchem's `merge_mole=False`), nothing cached.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: UMA, task_name: str | None = None, *, merge_experts: bool = True, **kwargs):
        super().__init__(**kwargs)
        tasks = model.config.task_names
        if task_name is None:
            if len(tasks) != 1:
                raise ValueError(f"task_name is required for a model with several tasks; choose one of {list(tasks)}")
            task_name = tasks[0]
        model.config.dataset_index(task_name)  # raises with the list of tasks
        self.model = model
        self.task_name = task_name
        self.merge = merge_experts and model.backbone.router is not None
        self._merged_key = None
        self._merged_model = None

    def _check_atoms(self, atoms) -> None:
        self.model.config.check_atoms(atoms, "atoms")

    def _model_for(self, graph: AtomicGraph, atoms) -> UMA:
        if not self.merge:
            return self.model
        z = atoms.get_atomic_numbers()
        counts = np.bincount(z, minlength=self.model.config.max_num_elements)
        reduced = tuple(np.round(counts / counts.sum(), 12))
        key = (reduced, int(graph.charge[0]), int(graph.spin[0]), self.task_name)
        if key != self._merged_key:
            self._merged_model = merge_experts_for(self.model, graph)
            self._merged_key = key
        return self._merged_model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self._check_atoms(atoms)
        cfg = self.model.config
        graph = AtomicGraph.from_atoms(
            atoms,
            cutoff=cfg.cutoff,
            datasets=cfg.datasets,
            task_name=self.task_name,
            max_neighbors=cfg.max_neighbors,
            dtype=self.model.dtype,
            pad=True,
        )
        if self.merge or self.model.backbone.router is None:
            out = energy_forces_stress(self._model_for(graph, atoms), graph)
        else:
            out = _efs_merging_per_call(self.model, graph)
        n = len(atoms)
        energy = float(out["energy"][0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = np.asarray(out["forces"][:n], dtype=np.float64)
        self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"][0], dtype=np.float64))
