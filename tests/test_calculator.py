"""`UMACalculator` against fairchem's `FAIRChemCalculator` references, and its input checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from _cases import case_atoms, reference, stress_offset
from ase import Atoms
from ase.build import bulk, molecule
from conftest import FIXTURES, rel_err

import uma_eqx
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
    # last call was Cu again: re-merged back (the same merged model as for the first Cu call's key)
    assert calc.model_for(cu) is calc.model_for(cu.copy())
    assert calc.model_for(alloy) is not calc.model_for(cu)


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
    from ase import units
    from ase.md.verlet import VelocityVerlet

    model = uma_eqx.load(FIXTURES / "uma_s_1p1.eqx")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.02, seed=0)
    atoms.calc = UMACalculator(model, task_name="omat")
    e0 = atoms.get_total_energy()
    VelocityVerlet(atoms, 0.5 * units.fs).run(5)
    assert np.isfinite(atoms.get_total_energy()) and abs(atoms.get_total_energy() - e0) < 1e-2


@pytest.mark.parametrize("key", ["charge", "spin"])
def test_changing_info_invalidates_results(model64, key):
    # fairchem oracle: the h2o_cation case (charge 1, spin 2); the same Atoms first evaluated
    # with other charge/spin must not keep its first energy when only atoms.info changes
    ref = reference("uma_s_1p1")
    case = next(c for c in ref["cases"] if c["name"] == "h2o_cation")
    atoms = case_atoms(case)
    atoms.calc = UMACalculator(model64, task_name="omol")
    first = {"charge": 1, "spin": 2}
    first[key] = {"charge": 0, "spin": 1}[key]
    atoms.info.update(first)
    e_other = atoms.get_potential_energy()
    atoms.info[key] = case[key]  # now exactly the fairchem case
    e = atoms.get_potential_energy()
    assert e != e_other
    assert rel_err(e, case["float64"]["energy"]) < TOL_F64
    assert rel_err(atoms.get_forces(), case["float64"]["forces"]) < TOL_F64
    # a second Atoms with the same geometry and other charge/spin, same calculator
    other = atoms.copy()
    other.info.update(first)
    other.calc = atoms.calc
    assert other.get_potential_energy() == e_other
    # an unrelated info key does not trigger a new calculation
    atoms.calc.results["energy"] = 123.0
    other.info["comment"] = "no effect"
    assert atoms.calc.check_state(other) == []


def test_omol_defaults_warn_once(model64):
    calc = UMACalculator(model64, task_name="omol")
    water = molecule("H2O")
    with pytest.warns(UserWarning, match="charge=0, spin=1"):
        calc.get_potential_energy(water)
    moved = water.copy()
    moved.positions[0, 0] += 0.01
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calc.get_potential_energy(moved)  # once per calculator
        explicit = water.copy()
        explicit.info.update(charge=0, spin=1)
        UMACalculator(model64, task_name="omol").get_potential_energy(explicit)  # nothing missing
        UMACalculator(model64, task_name="omat").get_potential_energy(bulk("Cu", "fcc", a=3.6))  # not omol


def test_calculator_shared_by_threads(model64):
    from concurrent.futures import ThreadPoolExecutor

    calc = UMACalculator(model64, task_name="omat")
    structures = []
    for k in range(6):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=k)
        structures.append(atoms)
    expected = [UMACalculator(model64, task_name="omat").get_forces(a.copy()) for a in structures]

    def work(k):
        atoms = structures[k % len(structures)].copy()
        atoms.calc = calc
        return k % len(structures), atoms.get_forces(), atoms.get_potential_energy()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(work, range(36)))
    for k, forces, _ in results:
        np.testing.assert_allclose(forces, expected[k], rtol=1e-12, atol=1e-12)


def test_a_structure_runs_in_a_size_already_compiled(model64):
    """A structure that fits a padded size the calculator already ran runs in it, compiling
    nothing, with the results of its own size (padded atoms and edges are inert)."""
    from jax import monitoring

    dense = bulk("Cu", "fcc", a=3.55, cubic=True)
    dense.rattle(0.05, seed=5)
    loose = dense.copy()
    loose.set_cell(dense.cell * 1.08, scale_atoms=True)  # same atoms, fewer edges
    own = [uma_eqx.PaddingSpec().sizes(uma_eqx.AtomicGraph.for_model(model64, a, "omat")) for a in (dense, loose)]
    assert own[1][1] < own[0][1] <= uma_eqx.calculator.SIZE_REUSE_FACTOR * own[1][1]

    calc = UMACalculator(model64, task_name="omat")
    calc.get_potential_energy(dense)
    assert calc.padded_sizes == own[0]
    compiles = []
    listener = lambda event, seconds, **_: compiles.append(event)  # noqa: E731
    monitoring.register_event_duration_secs_listener(listener)
    try:
        results = [calc.get_property(name, loose) for name in ("energy", "forces", "stress")]
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert calc.padded_sizes == own[0]  # not its own, smaller size
    assert "/jax/core/compile/backend_compile_duration" not in compiles

    fresh = UMACalculator(model64, task_name="omat")
    expected = [fresh.get_property(name, loose) for name in ("energy", "forces", "stress")]
    assert fresh.padded_sizes == own[1]
    for got, want in zip(results, expected, strict=True):
        assert rel_err(got, want) < 1e-12
    # a larger structure does not fit: it gets its own size
    calc.get_potential_energy(dense.repeat((2, 1, 1)))
    assert calc.padded_sizes == uma_eqx.PaddingSpec().sizes(
        uma_eqx.AtomicGraph.for_model(model64, dense.repeat((2, 1, 1)), "omat")
    )
