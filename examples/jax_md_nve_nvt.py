"""NVE then NVT molecular dynamics of periodic fcc Cu with JAX-MD and the built-in model.

Whole chunks of steps run on the device under `lax.scan`; the neighbour list is rebuilt inside
the loop when needed and reallocated by `uma_eqx.jax_md.run` if it overflows.

    python examples/jax_md_nve_nvt.py [--steps 500]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from ase.build import bulk
from jax_md import quantity, simulate, space

import uma_eqx
from uma_eqx import jax_md as ujmd

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=500)
args = parser.parse_args()

model = uma_eqx.default_model()  # or uma_eqx.load("uma-s-1p1.eqx")
atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
atoms.rattle(0.05, seed=0)

energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(model, atoms, task_name="omat")
box = jnp.asarray(ujmd.box_from_atoms(atoms), model.dtype)  # lattice vectors as columns
_, shift_fn = space.periodic_general(box, fractional_coordinates=False)
R = jnp.asarray(atoms.positions, model.dtype)
mass = jnp.asarray(atoms.get_masses(), model.dtype)[:, None]
neighbors = neighbor_fn.allocate(R)
dt, kT = 1.0 * ujmd.FEMTOSECOND, 300.0 * ujmd.BOLTZMANN


def total_energy(state, nbrs):
    return energy_fn(state.position, neighbor=nbrs) + quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)


# NVE: the total energy is conserved.
init, apply = simulate.nve(energy_fn, shift_fn, dt)
state = init(jax.random.PRNGKey(0), R, kT=kT, mass=mass, neighbor=neighbors)
state, neighbors, energies = ujmd.run(
    lambda s, n: apply(s, neighbor=n), state, neighbors, neighbor_fn, args.steps, observe=total_energy
)
energies = np.concatenate([np.asarray(e) for e in energies])
print(f"NVE: {args.steps} steps, max |E - E0| = {np.abs(energies - energies[0]).max() / len(atoms) * 1e3:.3f} meV/atom")

# NVT (Nose-Hoover chain) at 600 K, continuing from the NVE positions.
init, apply = simulate.nvt_nose_hoover(energy_fn, shift_fn, dt, 600.0 * ujmd.BOLTZMANN, tau=100 * dt)
state = init(jax.random.PRNGKey(1), state.position, mass=mass, neighbor=neighbors)
state, neighbors, temperatures = ujmd.run(
    lambda s, n: apply(s, neighbor=n),
    state,
    neighbors,
    neighbor_fn,
    args.steps,
    observe=lambda s, n: quantity.temperature(momentum=s.momentum, mass=s.mass) / ujmd.BOLTZMANN,
)
temperatures = np.concatenate([np.asarray(t) for t in temperatures])
print(f"NVT: {args.steps} steps, mean T over the second half = {temperatures[args.steps // 2 :].mean():.0f} K")
