"""Formation energies: an ASE calculator wrapper like fairchem's `FormationEnergyCalculator`.

The formation energy of a structure with `n_X` atoms of each element `X` is

$$E_f = E - \\sum_X n_X\\, \\mu_X,$$

with `E` the (optionally corrected) total energy and `mu_X` the energy per atom of element
`X` in its reference state. As in fairchem, the wrapper reports `E_f` in place of the energy
(total, eV; divide by `len(atoms)` for eV/atom); forces and stress pass through, since the
references and the corrections depend on the composition only.
"""

import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, get_args

import equinox as eqx
import jax
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.data import atomic_numbers, chemical_symbols, reference_states

from ._potential import UMA
from ._settings import ExecutionSettings
from .calculator import UMACalculator

#: Lattices tried for an element's ground state, as `ase.build.bulk` names them (the brief of
#: issue 20: "relax each element's fcc/bcc/hcp bulk and take the lowest energy per atom").
GROUND_STATE_LATTICES = ("fcc", "bcc", "hcp")
#: c/a of close-packed spheres, sqrt(8/3): the starting hcp cell (the relaxation frees it).
HCP_IDEAL_C_OVER_A = math.sqrt(8.0 / 3.0)
#: Convergence of the elemental relaxations: largest generalised force of ASE's
#: `FrechetCellFilter` (atoms and cell), eV/Å. The energy error is second order in it.
REFERENCE_FMAX = 1e-3
#: Step limit of one elemental relaxation (BFGS needs < 20 for these one- and two-atom cells).
REFERENCE_MAX_STEPS = 200
#: The only task whose energies MP-style corrections fit: OMat24's PBE/PBE+U VASP settings
#: (fairchem: "MP style corrections can only be applied for the OMat task").
CORRECTABLE_TASK = "omat"
#: Correction schemes: pymatgen's `MaterialsProject2020Compatibility` with MP's parameters
#: (`MPRelaxSet`), or with OMat24's (`OMat24Compatibility.yaml` and `OMat24StaticSet` from
#: `fairchem-data-omat`), the two schemes of fairchem's `apply_mp_style_corrections`.
Corrections = Literal["mp2020", "omat24"]

_EXTRA = "pip install 'uma_eqx[formation]'"
#: Derived references already computed in this process: (model fingerprint, task, element) -> eV/atom.
_REFERENCE_CACHE: dict[tuple[str, str, str], float] = {}


def model_fingerprint(model: UMA) -> str:
    """A SHA-256 of a model's configuration and weights (16 hex digits): equal for equal models.

    **Arguments:**

    - `model`: the model.

    **Returns:**

    The fingerprint, the key of the derived references' cache.
    """
    digest = hashlib.sha256(model.config.to_json().encode())
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        host = np.asarray(leaf)
        digest.update(f"{host.dtype}{host.shape}".encode())
        digest.update(np.ascontiguousarray(host).tobytes())
    return digest.hexdigest()[:16]


def _start_cell(symbol: str, lattice: str) -> Atoms:
    """A primitive `lattice` cell of `symbol` at the volume per atom of ASE's reference state."""
    from ase.build import bulk

    state = reference_states[atomic_numbers[symbol]]
    if state is None or state.get("symmetry") not in GROUND_STATE_LATTICES:
        found = None if state is None else state.get("symmetry")
        raise ValueError(
            f"cannot derive a reference energy for {symbol}: its ground state in ASE's reference states is "
            f"{found!r}, not one of {list(GROUND_STATE_LATTICES)}; pass references={{'{symbol}': eV_per_atom, ...}}"
        )
    volume = bulk(symbol).get_volume() / len(bulk(symbol))  # eV/atom is minimised from here
    if lattice == "fcc":
        return bulk(symbol, "fcc", a=(4.0 * volume) ** (1.0 / 3.0))
    if lattice == "bcc":
        return bulk(symbol, "bcc", a=(2.0 * volume) ** (1.0 / 3.0))
    # hcp: two atoms in a cell of volume (sqrt(3)/2) a^2 c, with c = (c/a) a
    a = (2.0 * volume / (math.sqrt(3.0) / 2.0 * HCP_IDEAL_C_OVER_A)) ** (1.0 / 3.0)
    return bulk(symbol, "hcp", a=a, c=HCP_IDEAL_C_OVER_A * a)


def relaxed_energy_per_atom(calculator: Calculator, atoms: Atoms) -> float:
    """Energy per atom of `atoms` after relaxing positions and cell (ASE BFGS on
    `FrechetCellFilter` to `REFERENCE_FMAX`).

    **Arguments:**

    - `calculator`: any ASE calculator.
    - `atoms`: the starting structure (a copy is relaxed).

    **Returns:**

    eV/atom at the relaxed structure.

    **Raises:**

    `RuntimeError` when the relaxation does not converge in `REFERENCE_MAX_STEPS` steps.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = calculator
    # ASE annotates Atoms; its optimizers take filters (documented use)
    optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)  # pyright: ignore[reportArgumentType]
    if not optimizer.run(fmax=REFERENCE_FMAX, steps=REFERENCE_MAX_STEPS):
        raise RuntimeError(
            f"{atoms.get_chemical_formula()}: the cell relaxation did not reach fmax {REFERENCE_FMAX} eV/Å in "
            f"{REFERENCE_MAX_STEPS} steps; pass its reference energy explicitly"
        )
    return float(atoms.get_potential_energy()) / len(atoms)


def elemental_references(
    model: UMA,
    elements: "list[str] | tuple[str, ...]",
    task_name: str | None = None,
    *,
    settings: ExecutionSettings | None = None,
) -> dict[str, float]:
    """Each element's energy per atom in its ground state, as the model predicts it.

    The lowest energy per atom of the element's fcc, bcc and hcp bulk, each relaxed (cell and
    positions) with the model from the volume of ASE's reference state, all of them in one
    batch ([`uma_eqx.relax_batch`][]: ASE's FIRE on `FrechetCellFilter`). Derived only for elements whose ASE
    reference state is one of these lattices (metals); pass other references explicitly.
    Results are kept for the rest of the process, keyed by the model's weights
    ([`uma_eqx.formation.model_fingerprint`][]) and task.

    **Arguments:**

    - `model`: the model.
    - `elements`: chemical symbols.
    - `task_name`: the task (optional when the model has one).
    - `settings`: execution settings of the calculator that relaxes them.

    **Returns:**

    `{symbol: eV/atom}`.

    **Raises:**

    `ValueError` for an unknown symbol, an element outside the model's elements, or one whose
    ground state is not fcc, bcc or hcp.
    """
    from .relax import relax_batch

    task = model.config.resolve_task(task_name)
    fingerprint = model_fingerprint(model)
    for symbol in elements:
        if symbol not in atomic_numbers or symbol == chemical_symbols[0]:
            raise ValueError(f"unknown element {symbol!r}; use a chemical symbol such as 'Cu'")
    todo = sorted({symbol for symbol in elements if (fingerprint, task, symbol) not in _REFERENCE_CACHE})
    cells = [(symbol, _start_cell(symbol, lattice)) for symbol in todo for lattice in GROUND_STATE_LATTICES]
    for symbol, cell in cells[:: len(GROUND_STATE_LATTICES)]:
        model.config.check_atoms(cell, f"element {symbol}")
    if cells:
        # every candidate of every element in one batch: one compiled program for all
        results = relax_batch(
            model,
            [cell for _, cell in cells],
            task,
            fmax=REFERENCE_FMAX,
            cell=True,
            max_steps=REFERENCE_MAX_STEPS,
            batch_size=len(cells),
            settings=settings,
        )
        for (symbol, cell), result in zip(cells, results, strict=True):
            if not result["converged"]:
                raise RuntimeError(
                    f"{symbol} ({cell.get_chemical_formula()}): the cell relaxation did not reach fmax "
                    f"{REFERENCE_FMAX} eV/Å in {REFERENCE_MAX_STEPS} steps"
                    + (f" ({result['error']})" if "error" in result else "")
                    + f"; pass references={{'{symbol}': eV_per_atom, ...}}"
                )
            per_atom = float(result["energy"]) / len(cell)
            key = (fingerprint, task, symbol)
            _REFERENCE_CACHE[key] = min(_REFERENCE_CACHE.get(key, math.inf), per_atom)
    return {symbol: _REFERENCE_CACHE[(fingerprint, task, symbol)] for symbol in elements}


def _pymatgen_parts(corrections: Corrections) -> tuple[Any, Any]:
    """`(input set class, compatibility)` of a correction scheme, with install hints."""
    try:
        from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
        from pymatgen.io.vasp.sets import MPRelaxSet
    except ImportError as e:
        raise ImportError(f"corrections={corrections!r} need pymatgen: {_EXTRA}") from e
    if corrections == "mp2020":
        return MPRelaxSet, MaterialsProject2020Compatibility(check_potcar=False)
    try:
        from fairchem.data.omat.entries.compatibility import OMAT24_CONFIG_FILE
        from fairchem.data.omat.vasp.sets import OMat24StaticSet
    except ImportError as e:
        raise ImportError(f"corrections='omat24' need OMat24's parameters from fairchem-data-omat: {_EXTRA}") from e
    return OMat24StaticSet, MaterialsProject2020Compatibility(check_potcar=False, config_file=OMAT24_CONFIG_FILE)


def computed_structure_entry(atoms: Atoms, energy: float, corrections: Corrections) -> Any:
    """The uncorrected pymatgen `ComputedStructureEntry` of a structure and its total energy.

    Carries what `MaterialsProject2020Compatibility` reads: the run type and Hubbard U values
    of the scheme's VASP input set for this structure (GGA+U for oxides and fluorides of
    Co, Cr, Fe, Mn, Mo, Ni, V, W), its POTCAR symbols, and the most likely oxidation states
    (`Composition.oxi_state_guesses`), as fairchem's `generate_computed_structure_entry` does.

    **Arguments:**

    - `atoms`: the structure.
    - `energy`: its total energy, eV.
    - `corrections`: `"mp2020"` or `"omat24"`.

    **Returns:**

    A `pymatgen.entries.computed_entries.ComputedStructureEntry`.
    """
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    input_set_class, _ = _pymatgen_parts(corrections)
    structure = AseAtomsAdaptor.get_structure(atoms)  # pyright: ignore[reportArgumentType]
    from pymatgen.io.vasp.sets import BadInputSetWarning

    with warnings.catch_warnings():
        # spglib (called by the input set's symmetry analysis) warns about its own error handling;
        # the input set warns about VASP smearing settings, irrelevant here (only its U values are read)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="spglib")
        warnings.filterwarnings("ignore", category=BadInputSetWarning)
        input_set = input_set_class(structure)
        incar = input_set.incar
        hubbards = dict(zip(input_set.poscar.site_symbols, incar.get("LDAUU", []), strict=False))
        potcar_symbols = list(input_set.potcar_symbols)
    is_hubbard = bool(incar.get("LDAU", False)) and sum(hubbards.values()) > 0
    guesses = structure.composition.oxi_state_guesses()
    parameters = {
        "run_type": "GGA+U" if is_hubbard else "GGA",
        "is_hubbard": is_hubbard,
        "hubbards": hubbards if is_hubbard else {},
        "potcar_symbols": potcar_symbols,
    }
    return ComputedStructureEntry(
        structure=structure,
        energy=float(energy),
        parameters=parameters,
        data={"oxidation_states": dict(guesses[0]) if guesses else {}},
    )


def corrected_energy(atoms: Atoms, energy: float, corrections: Corrections) -> float:
    """A total energy with MP2020-style corrections (anion, GGA/GGA+U mixing) applied.

    Port of `fairchem.data.omat.entries.compatibility.apply_mp_style_corrections`:
    [`uma_eqx.formation.computed_structure_entry`][] processed by pymatgen's
    `MaterialsProject2020Compatibility` (MP's or OMat24's parameters).

    **Arguments:**

    - `atoms`: the structure.
    - `energy`: its total energy, eV.
    - `corrections`: `"mp2020"` or `"omat24"`.

    **Returns:**

    The corrected total energy, eV.

    **Raises:**

    `ValueError` when pymatgen's compatibility scheme rejects the structure (e.g. an
    element outside its fitted set); `ImportError` without the `formation` extra.
    """
    _, compatibility = _pymatgen_parts(corrections)
    entry = computed_structure_entry(atoms, energy, corrections)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="spglib")
        processed = compatibility.process_entry(entry, clean=True, inplace=True)
    if processed is None:
        raise ValueError(
            f"{atoms.get_chemical_formula()}: pymatgen's {corrections} compatibility scheme rejects this structure "
            "(see MaterialsProject2020Compatibility); use corrections=None"
        )
    return float(processed.energy)


class FormationEnergyCalculator(Calculator):
    """Formation energy instead of the total energy, from any ASE calculator.

    Port of `fairchem.core.calculate.ase_calculator.FormationEnergyCalculator`:
    `energy = E - sum_X n_X mu_X` (total, eV; see the module docstring), where `E` is the
    wrapped calculator's energy, MP-style corrected when `corrections` is given, and `mu_X`
    the reference energy per atom of element `X`. Forces and stress are the wrapped
    calculator's.

    **Arguments:**

    - `calculator`: the wrapped ASE calculator (typically a
      [`uma_eqx.calculator.UMACalculator`][]).
    - `references`: `{symbol: eV/atom}`; `None` derives them from the model's elemental
      ground states ([`uma_eqx.formation.elemental_references`][]; needs a `UMACalculator`),
      element by element as structures need them.
    - `corrections`: `None`, `"mp2020"` or `"omat24"` ([`uma_eqx.formation.corrected_energy`][]);
      only for the `omat` task. fairchem applies `"omat24"` by default for that task; here
      corrections are opt-in, since for a model that is not an OMat24 DFT surrogate (such as
      the built-in EMT model) they would be wrong.
    - `task_name`: the task of a calculator that is not a `UMACalculator` (for the
      corrections check); default the `UMACalculator`'s task.
    - `**kwargs`: passed to `ase.calculators.calculator.Calculator`.

    **Raises:**

    `ValueError` (at construction) for corrections outside the `omat` task, an unknown
    correction scheme, or `references=None` with a calculator that is not a
    `UMACalculator`; (at calculation) naming the elements without a reference.
    """

    def __init__(
        self,
        calculator: Calculator,
        references: Mapping[str, float] | None = None,
        corrections: Corrections | None = None,
        *,
        task_name: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if task_name is None and isinstance(calculator, UMACalculator):
            task_name = calculator.task_name
        if corrections is not None:
            if corrections not in get_args(Corrections):
                raise ValueError(
                    f"corrections must be None or one of {list(get_args(Corrections))}, got {corrections!r}"
                )
            if task_name != CORRECTABLE_TASK:
                raise ValueError(
                    f"MP-style corrections fit OMat24 DFT energies (task {CORRECTABLE_TASK!r}); this calculator's task "
                    f"is {task_name!r}. Use corrections=None"
                    + ("" if task_name is not None else ", or pass task_name='omat' for a calculator of that task")
                )
            _pymatgen_parts(corrections)  # an ImportError now, not at the first structure
        if references is None and not isinstance(calculator, UMACalculator):
            raise ValueError(
                f"references=None derives them from a UMA model, but the calculator is a {type(calculator).__name__}; "
                "pass references={'Cu': eV_per_atom, ...}"
            )
        self.calculator = calculator
        self.references = None if references is None else {str(k): float(v) for k, v in references.items()}
        self.corrections: Corrections | None = corrections
        self.task_name = task_name
        self.implemented_properties = list(getattr(calculator, "implemented_properties", ["energy"]))

    def reference_energies(self, symbols: "list[str] | tuple[str, ...]") -> dict[str, float]:
        """The reference energy per atom (eV) of each element in `symbols`.

        **Arguments:**

        - `symbols`: chemical symbols.

        **Returns:**

        `{symbol: eV/atom}`.

        **Raises:**

        `ValueError` naming the elements without a supplied reference.
        """
        if self.references is None:
            calculator = self.calculator
            assert isinstance(calculator, UMACalculator)  # checked in __init__
            return elemental_references(calculator.model, sorted(set(symbols)), calculator.task_name)
        missing = sorted(set(symbols) - set(self.references))
        if missing:
            raise ValueError(
                f"no reference energy for {', '.join(missing)}; add "
                + ", ".join(f"'{symbol}': eV_per_atom" for symbol in missing)
                + " to references"
            )
        return {symbol: self.references[symbol] for symbol in set(symbols)}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """The wrapped calculator's results, with the formation energy as `energy`."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        assert atoms is not None  # set by Calculator.calculate
        self.calculator.calculate(atoms, list(properties), system_changes)
        self.results = dict(self.calculator.results)
        if "energy" not in self.results:
            return
        counts = Counter(atoms.get_chemical_symbols())
        references = self.reference_energies(list(counts))
        energy = float(self.results["energy"])
        if self.corrections is not None:
            energy = corrected_energy(atoms, energy, self.corrections)
        formation = energy - sum(count * references[symbol] for symbol, count in counts.items())
        self.results["energy"] = formation
        if "free_energy" in self.results:
            self.results["free_energy"] = formation
