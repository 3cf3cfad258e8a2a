"""UMACalculator inside ASE's dynamics, optimizers and cell filters (default model, EMT-trained)."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

import uma_eqx
from uma_eqx.calculator import UMACalculator


@pytest.fixture(scope="module")
def calc():
    return UMACalculator(uma_eqx.default_model(), task_name="omat")


def _rattled(seed=0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.08, seed=seed)
    return atoms


@pytest.mark.parametrize("optimizer", [BFGS, FIRE])
def test_position_relaxation_converges(calc, optimizer):
    atoms = _rattled()
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    assert optimizer(atoms, logfile=None).run(fmax=0.01, steps=300)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.01
    assert atoms.get_potential_energy() < e0


def test_cell_relaxation_with_frechet_filter(calc):
    """Start 5% expanded: the cell shrinks until the stress vanishes, near EMT's own lattice
    constant (the model was trained on EMT; an independent oracle for the stress)."""
    atoms = bulk("Cu", "fcc", a=3.61 * 1.05, cubic=True)
    atoms.calc = calc
    assert np.abs(atoms.get_stress()[:3]).max() > 1e-3  # tensile at the start
    assert BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=0.002, steps=200)
    assert np.abs(atoms.get_stress()).max() < 5e-4  # eV/Å³ (0.08 GPa)
    a_model = atoms.cell.lengths()[0]
    reference = bulk("Cu", "fcc", a=3.61, cubic=True)
    reference.calc = EMT()
    BFGS(FrechetCellFilter(reference), logfile=None).run(fmax=0.002, steps=200)
    a_emt = reference.cell.lengths()[0]
    assert abs(a_model - a_emt) / a_emt < 0.02, (a_model, a_emt)


def test_velocity_verlet_conserves_energy(calc):
    atoms = _rattled(seed=1)
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    energies = []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(200)
    energies = np.asarray(energies)
    assert np.max(np.abs(energies - energies[0])) / len(atoms) < 2.5e-4  # float32 model


def test_langevin_runs_and_thermalises(calc):
    atoms = _rattled(seed=2)
    atoms.calc = calc
    dyn = Langevin(
        atoms,
        timestep=2.0 * units.fs,
        temperature_K=600,
        friction=0.05,
        fixcm=False,
        logfile=None,
        rng=np.random.default_rng(0),
    )
    temperatures = []
    dyn.attach(lambda: temperatures.append(atoms.get_temperature()), interval=1)
    dyn.run(150)
    assert np.all(np.isfinite(atoms.positions))
    assert np.mean(temperatures[50:]) > 150  # heated from ~0 K towards 600 K
