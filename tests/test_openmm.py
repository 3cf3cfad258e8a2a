"""UMA in OpenMM (`uma_eqx.openmm`): energies and forces along a short OpenMM trajectory equal
`UMACalculator`'s at the same positions, for a cluster and a periodic crystal."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

import uma_eqx
from uma_eqx.calculator import UMACalculator

openmm = pytest.importorskip("openmm")
if not hasattr(openmm, "PythonForce"):
    pytest.skip("this OpenMM has no PythonForce", allow_module_level=True)
import openmm.unit as u  # noqa: E402

from uma_eqx.openmm import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM, create_system  # noqa: E402

#: float32 model: energies and forces agree to its round-off (both sides run the same calculator
#: code; the difference is only the nm <-> Å round trip of the positions in OpenMM's doubles).
ENERGY_ATOL_EV = 1e-5
FORCE_ATOL_EV_PER_A = 1e-4


def _check_trajectory(atoms: Atoms, steps: int = 3) -> None:
    model = uma_eqx.default_model()
    system = create_system(model, atoms)
    integrator = openmm.VerletIntegrator(0.5 * u.femtoseconds)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(atoms.positions / NM_IN_ANGSTROM)
    context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    reference = UMACalculator(model)
    positions = []
    for _ in range(steps + 1):
        state = context.getState(getEnergy=True, getForces=True, getPositions=True)
        here = atoms.copy()
        here.positions = state.getPositions(asNumpy=True).value_in_unit(u.nanometer) * NM_IN_ANGSTROM
        here.calc = reference
        energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) / EV_IN_KJ_PER_MOL
        forces = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
        np.testing.assert_allclose(energy, here.get_potential_energy(), atol=ENERGY_ATOL_EV)
        np.testing.assert_allclose(
            forces / (EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM), here.get_forces(), atol=FORCE_ATOL_EV_PER_A
        )
        positions.append(here.positions)
        integrator.step(1)
    assert np.abs(positions[-1] - positions[0]).max() > 1e-4  # the atoms moved


def test_cluster_in_a_nonperiodic_system():
    # a Cu4Ag2 octahedron treated as a molecule (the built-in model has only the omat task)
    d = 1.8
    cluster = Atoms(
        "Cu4Ag2", positions=[[d, 0, 0], [-d, 0, 0], [0, d, 0], [0, -d, 0], [0, 0, 1.4 * d], [0, 0, -1.4 * d]]
    )
    _check_trajectory(cluster)


def test_periodic_crystal():
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    crystal.rattle(0.05, seed=1)
    _check_trajectory(crystal, steps=2)


def test_refuses_boxes_openmm_cannot_take():
    from uma_eqx.openmm import create_system

    slab = bulk("Cu", "fcc", a=3.6, cubic=True)
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="all three axes or none"):
        create_system(uma_eqx.default_model(), slab)
    with pytest.raises(ValueError, match="standard_form"):
        create_system(uma_eqx.default_model(), bulk("Cu", "fcc", a=3.6))  # primitive fcc: a not along x only
