"""UMA forces inside OpenMM, through `openmm.PythonForce` (OpenMM 8.6 on PyPI has it).

OpenMM calls a Python function with its `State` at every force evaluation and takes back the
energy and forces; here that function evaluates a [`uma_eqx.calculator.UMACalculator`][], so
every integrator, barostat-free ensemble and reporter of OpenMM runs on UMA. The model runs
on the host once per step (JAX: CPU or GPU as configured), not inside OpenMM's platform
kernels. Units convert exactly: positions nm to Å, energies eV to kJ/mol, forces eV/Å to
kJ/mol/nm.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms, units

from ._potential import UMA
from ._settings import ExecutionSettings
from .calculator import UMACalculator

#: 1 eV in kJ/mol (ASE's CODATA constants: e·N_A / 1000).
EV_IN_KJ_PER_MOL = 1.0 / (units.kJ / units.mol)
#: 1 nm in Å.
NM_IN_ANGSTROM = 10.0


def _openmm():
    try:
        import openmm
    except ImportError as e:
        raise ImportError("uma_eqx.openmm needs OpenMM: pip install 'uma_eqx[openmm]'") from e
    if not hasattr(openmm, "PythonForce"):
        raise ImportError(
            f"OpenMM {openmm.__version__} has no openmm.PythonForce (forces computed in Python); "
            "upgrade with pip install -U openmm"
        )
    return openmm


class UMAComputation:
    """The function `openmm.PythonForce` calls: `state -> (energy kJ/mol, forces kJ/mol/nm)`.

    **Arguments:**

    - `model`: the model.
    - `atomic_numbers`: one per OpenMM particle, in particle order.
    - `task_name`: the task (optional when the model has one).
    - `charge`, `spin`: total charge and spin multiplicity (written to `atoms.info`, as
      [`uma_eqx.calculator.UMACalculator`][] reads them); `None` for the calculator's
      defaults (0, and spin 1 for `omol`, with its warning).
    - `periodic`: read the box from the state and evaluate a periodic system.
    - `settings`: how to execute the model.
    """

    def __init__(
        self,
        model: UMA,
        atomic_numbers: Sequence[int],
        task_name: str | None = None,
        *,
        charge: int | None = None,
        spin: int | None = None,
        periodic: bool = False,
        settings: ExecutionSettings | None = None,
    ):
        self.calculator = UMACalculator(model, task_name, settings=settings)
        self.atoms = Atoms(numbers=np.asarray(atomic_numbers, dtype=int), pbc=periodic)
        if charge is not None:
            self.atoms.info["charge"] = charge
        if spin is not None:
            self.atoms.info["spin"] = spin
        self.periodic = periodic

    def __call__(self, state) -> tuple[float, np.ndarray]:
        """Energy (kJ/mol) and forces (`(particles, 3)`, kJ/mol/nm) at the state's positions."""
        from openmm.unit import nanometer  # pyright: ignore[reportAttributeAccessIssue]

        self.atoms.positions = state.getPositions(asNumpy=True).value_in_unit(nanometer) * NM_IN_ANGSTROM
        if self.periodic:
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(nanometer)
            self.atoms.cell = np.asarray(box) * NM_IN_ANGSTROM
        self.calculator.calculate(self.atoms, ["energy", "forces"])
        energy = float(self.calculator.results["energy"]) * EV_IN_KJ_PER_MOL
        forces = self.calculator.results["forces"] * (EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM)
        return energy, forces


def uma_force(
    model: UMA,
    atomic_numbers: Sequence[int],
    task_name: str | None = None,
    *,
    charge: int | None = None,
    spin: int | None = None,
    periodic: bool = False,
    settings: ExecutionSettings | None = None,
) -> Any:
    """An `openmm.PythonForce` that adds the model's energy and forces to an OpenMM `System`.

    **Arguments:** as for [`uma_eqx.openmm.UMAComputation`][].

    **Returns:**

    The `openmm.PythonForce` (periodic when `periodic`: then set the system's box vectors).
    """
    openmm = _openmm()
    force = openmm.PythonForce(
        UMAComputation(model, atomic_numbers, task_name, charge=charge, spin=spin, periodic=periodic, settings=settings)
    )
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


def create_system(
    model: UMA,
    atoms: Atoms,
    task_name: str | None = None,
    *,
    settings: ExecutionSettings | None = None,
) -> Any:
    """An OpenMM `System` of `atoms` (masses, box) whose only force is the model's.

    Charge and spin come from `atoms.info` (as for the ASE calculator); the system is periodic
    when `atoms.pbc` is all true (OpenMM has no partly periodic boxes: such structures are
    refused), non-periodic (a molecule or cluster) when all false.

    **Arguments:**

    - `model`: the model.
    - `atoms`: the structure; its positions are not stored in the system (pass
      `atoms.positions / 10` nm to `Context.setPositions`).
    - `task_name`: the task (optional when the model has one).
    - `settings`: how to execute the model.

    **Returns:**

    The `openmm.System`.

    **Raises:**

    `ValueError` for partly periodic structures and cells not in OpenMM's reduced form.
    """
    openmm = _openmm()
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        raise ValueError(f"OpenMM boxes are periodic along all three axes or none; atoms.pbc is {pbc.tolist()}")
    periodic = bool(pbc.all())
    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))  # OpenMM's mass unit is the dalton, as ASE's
    if periodic:
        cell = np.asarray(atoms.cell)
        if abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) > 1e-12:
            raise ValueError(
                "OpenMM needs a reduced box (a along x, b in the xy plane); rotate the structure first with "
                "atoms.set_cell(atoms.cell.standard_form()[0], scale_atoms=True)"
            )
        a, b, c = (openmm.Vec3(*(row / NM_IN_ANGSTROM)) for row in np.asarray(atoms.cell))
        system.setDefaultPeriodicBoxVectors(a, b, c)
    info = atoms.info
    system.addForce(
        uma_force(
            model,
            atoms.get_atomic_numbers().tolist(),
            task_name,
            charge=info.get("charge"),
            spin=info.get("spin"),
            periodic=periodic,
            settings=settings,
        )
    )
    return system
