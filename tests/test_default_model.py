"""The built-in default model: ships, loads without torch, and reproduces EMT (its training oracle)."""

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

import uma_eqx
from uma_eqx.calculator import UMACalculator

#: Held-out tolerances against EMT for a rattled structure unlike any single training frame
#: (the report's test-set MAEs are far below these; see uma_eqx/data/default_model_report.json).
FORCE_MAE_TOL = 0.15  # eV/Å
ENERGY_PER_ATOM_TOL = 0.08  # eV/atom


def test_default_model_reproduces_emt():
    model = uma_eqx.default_model()
    assert model.config.task_names == ("omat",)
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 6]] = [79, 46]  # Cu-Au-Pd alloy
    atoms.rattle(0.06, seed=11)
    ref = atoms.copy()
    ref.calc = EMT()
    atoms.calc = UMACalculator(model, task_name="omat")
    f_err = np.abs(atoms.get_forces() - ref.get_forces()).mean()
    e_err = abs(atoms.get_potential_energy() - ref.get_potential_energy()) / len(atoms)
    assert f_err < FORCE_MAE_TOL, f_err
    assert e_err < ENERGY_PER_ATOM_TOL, e_err


def test_default_model_report_is_consistent():
    report = uma_eqx.default_model_report()
    assert report["test"]["structures"] > 100
    assert 0 < report["test"]["forces_mae_meV_per_A"] < 50
    assert report["model"]["num_layers"] == uma_eqx.default_model().config.num_layers
