"""Formation energies (`uma_eqx.formation`): the built-in model's binary alloys against ASE's EMT
(the potential it was trained on, with EMT's own elemental references), MP-style corrections
against pymatgen's on the same entries, and the errors."""

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

import uma_eqx
from uma_eqx.calculator import UMACalculator
from uma_eqx.formation import (
    GROUND_STATE_LATTICES,
    FormationEnergyCalculator,
    _start_cell,
    corrected_energy,
    elemental_references,
    relaxed_energy_per_atom,
)

#: A formation energy adds the alloy's energy error to its references' errors, each of the
#: order of the model's held-out energy MAE per atom: allow three of them.
ERROR_MULTIPLE = 3


def _l10(a: str, b: str) -> Atoms:  # CuAu-type, tetragonal
    frac = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Atoms([a, a, b, b], scaled_positions=frac, cell=[3.9, 3.9, 3.7], pbc=True)


def _l12(a: str, b: str) -> Atoms:  # Cu3Au-type
    frac = [[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5], [0, 0, 0]]
    return Atoms([a, a, a, b], scaled_positions=frac, cell=[3.75] * 3, pbc=True)


def _b2(a: str, b: str) -> Atoms:  # CsCl-type
    return Atoms([a, b], scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[2.9] * 3, pbc=True)


def _emt_relaxed(atoms: Atoms) -> Atoms:
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = EMT()
    assert BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-3, steps=300)
    return atoms


def test_binary_alloys_match_emt_within_the_model_error():
    model = uma_eqx.default_model()
    elements = ["Cu", "Au", "Ni", "Al"]
    # the oracle: EMT's own ground states (ASE BFGS, one structure at a time) and EMT energies
    emt_refs = {
        el: min(relaxed_energy_per_atom(EMT(), _start_cell(el, lattice)) for lattice in GROUND_STATE_LATTICES)
        for el in elements
    }
    derived = elemental_references(model, elements)
    tolerance = ERROR_MULTIPLE * uma_eqx.default_model_report()["test"]["energy_mae_meV_per_atom"] / 1000
    for el in elements:
        assert abs(derived[el] - emt_refs[el]) < tolerance, (el, derived[el], emt_refs[el])
    uma = FormationEnergyCalculator(UMACalculator(model))
    emt = FormationEnergyCalculator(EMT(), references=emt_refs)
    for alloy in (_l10("Cu", "Au"), _l12("Cu", "Au"), _b2("Ni", "Al")):
        alloy = _emt_relaxed(alloy)
        expected = emt.get_potential_energy(alloy) / len(alloy)
        got = uma.get_potential_energy(alloy) / len(alloy)
        assert abs(got - expected) < tolerance, (alloy.get_chemical_formula(), got, expected)
        # forces pass through unchanged
        np.testing.assert_array_equal(uma.get_forces(alloy), UMACalculator(model).get_forces(alloy))
    # cached: a second call returns the same numbers without relaxing again
    assert elemental_references(model, ["Au", "Cu"]) == {"Au": derived["Au"], "Cu": derived["Cu"]}


class _Fixed(Calculator):
    """A fixed total energy, -42 eV (the corrections depend on the composition only)."""

    implemented_properties = ["energy"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["energy"] = -42.0


@pytest.mark.parametrize("scheme", ["mp2020", "omat24"])
def test_corrections_equal_pymatgen_on_the_same_entries(scheme):
    pytest.importorskip("pymatgen")
    compatibility_module = pytest.importorskip("pymatgen.entries.compatibility")
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    if scheme == "omat24":
        omat = pytest.importorskip("fairchem.data.omat.entries.compatibility")
        compatibility = compatibility_module.MaterialsProject2020Compatibility(
            check_potcar=False, config_file=omat.OMAT24_CONFIG_FILE
        )
    else:
        compatibility = compatibility_module.MaterialsProject2020Compatibility(check_potcar=False)
    # MP's published U values (MPRelaxSet / pymatgen's MPRelaxSet.yaml): Fe 5.3, Ni 6.2 eV
    cases = [
        (bulk("NiO", "rocksalt", a=4.17), {"Ni": 6.2}, {"Ni": 2, "O": -2}),
        (Atoms("Fe2O3", scaled_positions=np.random.default_rng(0).random((5, 3)), cell=[5.0] * 3, pbc=True),
         {"Fe": 5.3}, {"Fe": 3, "O": -2}),
        (bulk("ZnS", "zincblende", a=5.4), {}, {"Zn": 2, "S": -2}),
        (bulk("LiF", "rocksalt", a=4.03), {}, {"Li": 1, "F": -1}),
        (bulk("Cu", "fcc", a=3.6), {}, {"Cu": 0}),
    ]  # fmt: skip
    references = {"Ni": -5.0, "O": -4.9, "Fe": -8.3, "Zn": -1.2, "S": -4.1, "Li": -1.9, "F": -1.9, "Cu": -4.1}
    for atoms, hubbards, oxidation in cases:
        entry = ComputedStructureEntry(
            structure=AseAtomsAdaptor.get_structure(atoms),
            energy=-42.0,
            parameters={
                "run_type": "GGA+U" if hubbards else "GGA",
                "is_hubbard": bool(hubbards),
                "hubbards": hubbards,
            },
            data={"oxidation_states": oxidation},
        )
        expected = compatibility.process_entry(entry, clean=True, inplace=False).energy
        assert corrected_energy(atoms, -42.0, scheme) == pytest.approx(expected, abs=1e-9)
        calc = FormationEnergyCalculator(_Fixed(), references, scheme, task_name="omat")
        symbols = atoms.get_chemical_symbols()
        formation = expected - sum(references[s] for s in symbols)
        assert calc.get_potential_energy(atoms) == pytest.approx(formation, abs=1e-9)
    try:  # the same numbers as fairchem's own function, where fairchem-data-omat is installed
        from fairchem.data.omat.entries.compatibility import apply_mp_style_corrections
    except ImportError:
        return
    from pymatgen.io.vasp.sets import BadInputSetWarning

    for atoms, _, _ in cases:
        kind = "MP2020" if scheme == "mp2020" else "OMat24"
        with warnings.catch_warnings():  # fairchem's input set warns about VASP smearing settings
            warnings.filterwarnings("ignore", category=BadInputSetWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="spglib")
            expected = apply_mp_style_corrections(-42.0, atoms, correction_type=kind)
        assert corrected_energy(atoms, -42.0, scheme) == pytest.approx(expected, abs=1e-9)


def test_errors_name_the_problem():
    model = uma_eqx.default_model()
    with pytest.raises(ValueError, match=r"no reference energy for Au.*'Au': eV_per_atom"):
        FormationEnergyCalculator(EMT(), references={"Cu": -0.01}).get_potential_energy(_l12("Cu", "Au"))
    with pytest.raises(ValueError, match="task is 'omol'"):
        FormationEnergyCalculator(EMT(), {"Cu": 0.0}, "mp2020", task_name="omol")
    with pytest.raises(ValueError, match="task is None.*pass task_name=.omat."):
        FormationEnergyCalculator(EMT(), {"Cu": 0.0}, "omat24")  # a foreign calculator must name its task
    assert FormationEnergyCalculator(UMACalculator(model), corrections="omat24").task_name == "omat"
    with pytest.raises(ValueError, match="derives them from a UMA model"):
        FormationEnergyCalculator(EMT())
    with pytest.raises(ValueError, match="ground state in ASE's reference states is 'diamond'"):
        _start_cell("Si", "fcc")
