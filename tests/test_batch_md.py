"""`uma_eqx.run_md_batch` against one-structure ASE dynamics on `UMACalculator` (float64)."""

import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin

import uma_eqx
from uma_eqx._default import DEFAULT_MODEL
from uma_eqx.calculator import UMACalculator
from uma_eqx.simulate import run_md

#: float64 on both sides: the same trajectory up to round-off over a few dozen steps.
TOL = 1e-9
STEPS, INTERVAL = 20, 5


@pytest.fixture(scope="module")
def model():
    return uma_eqx.load(DEFAULT_MODEL, dtype=jnp.float64)


@pytest.fixture(scope="module")
def structures():
    cells = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Ag", "fcc", a=4.1).repeat((2, 1, 1))]
    for k, atoms in enumerate(cells):
        atoms.rattle(0.05, seed=k)
    return cells


def test_nve_matches_run_md(model, structures):
    results = uma_eqx.run_md_batch(
        model, structures, ensemble="nve", temperature_K=600.0, steps=STEPS, interval=INTERVAL, seed=3, batch_size=2
    )
    assert len(results) == 2
    for k, (atoms, result) in enumerate(zip(structures, results)):
        ref = run_md(model, atoms, task_name="omat", ensemble="nve", engine="ase", temperature_K=600.0,
                     steps=STEPS, interval=INTERVAL, seed=3 + k)  # fmt: skip
        assert [row["step"] for row in result.log] == [row["step"] for row in ref.log] == [0, 5, 10, 15, 20]
        for frame, ref_frame, row, ref_row in zip(result.frames, ref.frames, result.log, ref.log):
            np.testing.assert_allclose(frame.positions, ref_frame.positions, atol=TOL)
            np.testing.assert_allclose(frame.get_momenta(), ref_frame.get_momenta(), atol=TOL)
            assert abs(row["epot"] - ref_row["epot"]) < TOL and abs(row["ekin"] - ref_row["ekin"]) < TOL
        assert result.log[-1]["ekin"] != result.log[0]["ekin"]  # the atoms moved


def test_langevin_without_noise_matches_ase(model, structures):
    # at 0 K ASE's Langevin is deterministic (its noise has zero amplitude): friction and forces only
    friction_per_fs = 0.02
    results = uma_eqx.run_md_batch(model, structures, ensemble="nvt", temperature_K=0.0, steps=STEPS,
                                   interval=INTERVAL, friction_per_fs=friction_per_fs, batch_size=2)  # fmt: skip
    for atoms, result in zip(structures, results):
        atoms = atoms.copy()
        atoms.calc = UMACalculator(model)
        dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=0.0, friction=friction_per_fs / units.fs, fixcm=False)
        frames = []
        dyn.attach(lambda a=atoms, f=frames: f.append((a.positions.copy(), a.get_momenta())), interval=INTERVAL)
        dyn.run(STEPS)
        assert len(frames) == len(result.frames)
        for (positions, momenta), frame in zip(frames, result.frames):
            np.testing.assert_allclose(frame.positions, positions, atol=TOL)
            np.testing.assert_allclose(frame.get_momenta(), momenta, atol=TOL)
        assert np.abs(result.frames[-1].get_momenta()).max() > 0


def test_thermostat_noise_differs_per_replica(model, structures):
    replicas = [structures[0]] * 2
    results = uma_eqx.run_md_batch(model, replicas, ensemble="nvt", temperature_K=300.0, steps=2, interval=2, seed=5)
    a, b = (r.frames[-1].positions for r in results)
    assert not np.allclose(a, b)  # seeds seed + k: independent replicas


def test_bad_parameters(model, structures):
    with pytest.raises(ValueError, match="ensemble"):
        uma_eqx.run_md_batch(model, structures, ensemble="npt")
    with pytest.raises(ValueError, match="timestep_fs"):
        uma_eqx.run_md_batch(model, structures, timestep_fs=0.0)
    nan = structures[0].copy()
    nan.positions[0, 0] = np.nan
    with pytest.raises(ValueError, match="structure #1"):
        uma_eqx.run_md_batch(model, [structures[0], nan])
