"""uma_eqx.export: jax.export artifacts run without uma_eqx, against the model (UMACalculator).

One structure throughout: a Cu/Ag wire periodic along z, so that LAMMPS-style ghost atoms
(periodic images) are few. Test 1 feeds the artifact the model's own periodic graph (edge
shifts, padding) in a process where `import uma_eqx` fails; test 2 feeds a fixed-size
artifact a padded half neighbour list over local atoms and ghost images (zero shifts), as a
LAMMPS pair style would, and adds the ghosts' forces to their owners (reverse communication).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list
from conftest import TOLERANCES, rel_err

import uma_eqx
from uma_eqx.calculator import UMACalculator

pytest.importorskip("flatbuffers")  # jax.export serialisation (the `export` extra)

import jax  # noqa: E402

TOL = TOLERANCES["float32"]  # the built-in model is float32, as is its artifact

RUN_WITHOUT_UMA_EQX = """
import sys
sys.modules["uma_eqx"] = None  # `import uma_eqx` now raises ImportError
import jax
import numpy as np
try:
    import uma_eqx
except ImportError:
    pass
else:
    raise SystemExit("uma_eqx was importable")
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
inputs = dict(np.load(sys.argv[2]))
names = ["atomic_numbers", "positions", "edge_index", "edge_shift", "num_local", "charge", "spin"]
outputs = exported.call(*[inputs[k] for k in names])
bad = exported.call(*[inputs[k] if k != "charge" else np.int32(1000) for k in names])
names_out = ["energy", "forces", "virial", "atom_energies", "atom_virials"]
np.savez(sys.argv[3], bad_energy=np.asarray(bad[0]), **{k: np.asarray(v) for k, v in zip(names_out, outputs)})
"""


#: Both artifacts are written in a child process: the test process checks shapes with
#: jaxtyping + beartype, whose `int` return checks of `AtomicGraph.num_atoms` refuse the
#: symbolic sizes that `jax.export` traces with (plain runs have no such checks). The first
#: has symbolic sizes and a full list (through the CLI), the second fixed sizes and a half list.
EXPORT_BOTH = """
import sys
import uma_eqx
from uma_eqx.cli import main
main(["--no-compile-cache", "export", "default", sys.argv[1], "--task", "omat"], standalone_mode=False)
uma_eqx.export(uma_eqx.default_model(), sys.argv[2], platforms=("cpu",), neighbor_list="half",
               num_atoms=int(sys.argv[3]), num_edges=int(sys.argv[4]))
"""
#: Padding of the fixed-size artifact beyond the ghost test's atoms and half-list edges.
PAD_ATOMS, PAD_EDGES = 5, 17


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, ghosts):
    folder = tmp_path_factory.mktemp("export")
    full, half = folder / "model.jaxexport", folder / "half.jaxexport"
    sizes = [str(len(ghosts["numbers"]) + PAD_ATOMS), str(ghosts["edges"].shape[1] + PAD_EDGES)]
    run = subprocess.run(
        [sys.executable, "-c", EXPORT_BOTH, str(full), str(half), *sizes], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote " + str(full) in run.stdout  # the CLI's report
    return full, half


@pytest.fixture(scope="module")
def model():
    return uma_eqx.default_model()


@pytest.fixture(scope="module")
def wire():
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((1, 1, 2))
    atoms.symbols[[1, 4, 6]] = "Ag"
    atoms.rattle(0.05, seed=3)
    atoms.set_cell([14.0, 14.0, atoms.cell[2, 2]])
    atoms.center(axis=(0, 1))
    atoms.pbc = (False, False, True)
    return atoms


@pytest.fixture(scope="module")
def reference(model, wire):
    atoms = wire.copy()
    atoms.calc = UMACalculator(model)
    return {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "virial": -atoms.get_volume() * atoms.get_stress(voigt=True)[[0, 1, 2, 5, 4, 3]],  # xx yy zz xy xz yz
    }


def check(outputs, reference, num_local):
    assert rel_err(outputs["energy"], reference["energy"]) < TOL["energy"]
    assert rel_err(outputs["forces"], reference["forces"]) < TOL["forces"]
    assert rel_err(outputs["virial"], reference["virial"]) < TOL["stress"]
    assert rel_err(np.sum(outputs["atom_energies"][:num_local]), reference["energy"]) < TOL["energy"]
    assert rel_err(np.sum(outputs["atom_virials"], axis=0), reference["virial"]) < TOL["stress"]


def test_artifact_runs_without_uma_eqx(model, wire, reference, artifacts, tmp_path):
    artifact = artifacts[0]
    meta = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    assert meta["platforms"] == ["cpu", "cuda"] and meta["cutoff"] == model.config.cutoff
    assert meta["element_symbols"] == ["Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"] and meta["dtype"] == "float32"
    assert [x["shape"] for x in meta["inputs"][:4]] == [["atoms"], ["atoms", "3"], ["2", "edges"], ["edges", "3"]]

    # the model's own graph: periodic edges carry their cell shift S H; one padding atom, two padding edges
    graph = uma_eqx.AtomicGraph.for_model(model, wire, "omat")
    n = graph.num_atoms
    shifts = np.asarray(graph.edge_shift) @ np.asarray(graph.cell[0])
    inputs = {
        "atomic_numbers": np.append(np.asarray(graph.atomic_numbers), 0).astype(np.int32),
        "positions": np.vstack([np.asarray(graph.positions), np.zeros((1, 3))]).astype(np.float32),
        "edge_index": np.hstack([np.asarray(graph.edge_index), [[-1, n], [-1, 0]]]).astype(np.int32),
        "edge_shift": np.vstack([shifts, np.zeros((2, 3))]).astype(np.float32),
        "num_local": np.int32(n),
        "charge": np.int32(0),
        "spin": np.int32(0),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = tmp_path / "outputs.npz"
    run = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_UMA_EQX, str(artifact), str(tmp_path / "inputs.npz"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = dict(np.load(out))
    assert np.all(outputs["forces"][n:] == 0) and outputs["atom_energies"][n] == 0  # the padding atom
    outputs["forces"] = outputs["forces"][:n]
    check(outputs, reference, n)
    assert np.isnan(outputs["bad_energy"])  # charge outside fairchem's range: NaN, not a silent clamp


@pytest.fixture(scope="module")
def ghosts(model, wire):
    """LAMMPS-style inputs: the wire's atoms, then ghost images along z within the receptive
    field (at image positions), and a half list over all of them with zero shifts."""
    n, period = len(wire), wire.cell[2, 2]
    field = (model.config.num_layers + 1) * model.config.cutoff
    images = int(np.ceil(field / period))
    offsets = [k for k in range(-images, images + 1) if k != 0]
    positions = np.vstack([wire.positions] + [wire.positions + [0, 0, k * period] for k in offsets])
    owner = np.tile(np.arange(n), 1 + len(offsets))
    cluster = Atoms(numbers=wire.numbers[owner], positions=positions, pbc=False)
    i, j = neighbor_list("ij", cluster, model.config.cutoff)
    half = i < j  # each pair once
    return {
        "numbers": cluster.numbers,
        "positions": positions,
        "owner": owner,
        "edges": np.stack([j[half], i[half]]),  # source, target
        "field": field,
    }


def test_lammps_style_half_list_with_ghosts(model, wire, reference, ghosts, artifacts):
    artifact = artifacts[1]
    meta = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    assert meta["neighbor_list"] == "half" and meta["receptive_field"] == ghosts["field"]
    assert meta["inputs"][0]["shape"] == [str(len(ghosts["numbers"]) + PAD_ATOMS)]  # fixed sizes

    # padded to the artifact's sizes: padding atoms have atomic number 0, padding edges index -1
    n, m = len(wire), len(ghosts["numbers"])
    edges = np.hstack([ghosts["edges"], np.full((2, PAD_EDGES), -1)])
    edges[:, -1] = [m, m + 1]  # a padding edge may also join padding atoms
    inputs = (
        np.append(ghosts["numbers"], np.zeros(PAD_ATOMS)).astype(np.int32),
        np.vstack([ghosts["positions"], np.ones((PAD_ATOMS, 3))]).astype(np.float32),
        edges.astype(np.int32),
        np.zeros((edges.shape[1], 3), np.float32),
        np.int32(n),
        np.int32(0),
        np.int32(0),
    )
    exported = jax.export.deserialize(artifact.read_bytes())
    energy, forces, virial, atom_energies, atom_virials = (np.asarray(x) for x in exported.call(*inputs))
    assert np.all(atom_energies[n:] == 0)  # ghosts' energies belong to their owners
    assert np.all(forces[m:] == 0)  # padding atoms
    assert np.max(np.abs(forces[n:m])) > 1e-3  # ghosts do get forces...
    total = np.zeros((n, 3))
    np.add.at(total, ghosts["owner"], forces[:m])  # ...which reverse communication adds to their owners
    outputs = {
        "energy": energy,
        "forces": total,
        "virial": virial,
        "atom_energies": atom_energies,
        "atom_virials": atom_virials,
    }
    check(outputs, reference, n)
