"""`UMACalculator` against fairchem's `FAIRChemCalculator` references, and its input checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

import uma_eqx
from _cases import case_atoms, reference, stress_offset
from conftest import FIXTURES, rel_err
from uma_eqx.calculator import UMACalculator

TOL_F64 = 1e-9


@pytest.fixture(scope="module")
def model64():
    return uma_eqx.load(FIXTURES / "uma_s_1p1.eqx", dtype=jnp.float64)


@pytest.mark.parametrize("merge", [True, False])
def test_calculator_matches_fairchem(model64, merge):
    ref = reference("uma_s_1p1")
    for case in ref["cases"][:6]:
        atoms = case_atoms(case)
        atoms.calc = UMACalculator(model64, task_name=case["task"], merge_experts=merge)
        r = case["float64"]
        assert rel_err(atoms.get_potential_energy(), r["energy"]) < TOL_F64
        assert rel_err(atoms.get_forces(), r["forces"]) < TOL_F64
        assert rel_err(atoms.get_stress(), np.asarray(r["stress"]) - stress_offset(ref, case["task"])) < TOL_F64
        assert atoms.get_potential_energy() == atoms.calc.get_property("free_energy")


def test_remerges_when_composition_changes(model64):
    calc = UMACalculator(model64, task_name="omat")
    plain = UMACalculator(model64, task_name="omat", merge_experts=False)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=3)
    alloy = cu.copy()
    alloy.numbers[[0, 1]] = 79
    for atoms in (cu, alloy, cu):
        e = calc.get_potential_energy(atoms.copy())
        assert abs(e - plain.get_potential_energy(atoms.copy())) < 1e-9 * abs(e)
    assert calc._merged_key[0][79] == 0.0  # last call was Cu again: re-merged back


def test_single_atom_rules():
    m11 = uma_eqx.load(FIXTURES / "uma_s_1p1.eqx", dtype=jnp.float64)
    lone = Atoms("O", positions=[[0, 0, 0]])
    lone.calc = UMACalculator(m11, task_name="omol")
    with pytest.raises(ValueError, match="single non-periodic atom"):
        lone.get_potential_energy()
    ref = reference("uma_s_1p2")
    case = next(c for c in ref["cases"] if c["name"] == "o_single_atom_nopbc")
    m12 = uma_eqx.load(FIXTURES / "uma_s_1p2.eqx", dtype=jnp.float64)
    atoms = case_atoms(case)
    atoms.calc = UMACalculator(m12, task_name=case["task"])
    assert rel_err(atoms.get_potential_energy(), case["float64"]["energy"]) < TOL_F64
    np.testing.assert_array_equal(atoms.get_forces(), 0.0)


def test_bad_inputs(model64):
    with pytest.raises(ValueError, match=r"task_name is required.*omat"):
        UMACalculator(model64)
    with pytest.raises(ValueError, match=r"unknown task_name 'omatt'.*'omat'"):
        UMACalculator(model64, task_name="omatt")
    calc = UMACalculator(model64, task_name="omol")
    water = molecule("H2O")
    bad = water.copy()
    bad.numbers[0] = 100
    with pytest.raises(ValueError, match=r"atomic number\(s\) 100 \(Fm\) are outside this model's elements"):
        calc.get_potential_energy(bad)
    nan = water.copy()
    nan.positions[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        calc.get_potential_energy(nan)
    charged = water.copy()
    charged.info["charge"] = 101
    with pytest.raises(ValueError, match="101"):
        calc.get_potential_energy(charged)
    spin = water.copy()
    spin.info["spin"] = -1
    with pytest.raises(ValueError, match="-1"):
        calc.get_potential_energy(spin)
    with pytest.raises(ValueError):
        calc.get_potential_energy(Atoms())


def test_float32_calculator_runs_md_steps():
    from ase.md.verlet import VelocityVerlet
    from ase import units

    model = uma_eqx.load(FIXTURES / "uma_s_1p1.eqx")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.02, seed=0)
    atoms.calc = UMACalculator(model, task_name="omat")
    e0 = atoms.get_total_energy()
    VelocityVerlet(atoms, 0.5 * units.fs).run(5)
    assert np.isfinite(atoms.get_total_energy()) and abs(atoms.get_total_energy() - e0) < 1e-2
