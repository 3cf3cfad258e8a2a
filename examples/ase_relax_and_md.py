"""Relax a strained Cu cell with ASE (FIRE + FrechetCellFilter), then run Langevin MD.

python examples/ase_relax_and_md.py [--steps 200]
"""

import argparse

import numpy as np
from ase import units
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.optimize import FIRE

import uma_eqx
from uma_eqx.calculator import UMACalculator

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 2, 2))  # 4% expanded
atoms.rattle(0.05, seed=0)
atoms.calc = UMACalculator(uma_eqx.default_model(), task_name="omat")

FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.01, steps=300)
print(f"relaxed: a = {atoms.cell.lengths()[0] / 2:.4f} Å, max |stress| = {np.abs(atoms.get_stress()).max():.2e} eV/Å³")

thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
dyn = Langevin(
    atoms,
    timestep=2.0 * units.fs,
    temperature_K=300,
    friction=0.01,
    fixcm=False,
    logfile=None,
    rng=np.random.default_rng(1),
)
dyn.run(args.steps)
print(f"Langevin: {args.steps} steps, T = {atoms.get_temperature():.0f} K, E = {atoms.get_potential_energy():.4f} eV")
