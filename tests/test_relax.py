"""`uma_eqx.relax_batch` against ASE's FIRE (and FrechetCellFilter) on `UMACalculator`.

One batched program and one calculator program serve the whole module: the structures are
ordered largest first (the slots are sized before the first step), the calculator pads every
structure to one fixed size, and `fmax`/`max_steps` are run-time data of the batched step.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

import uma_eqx
from uma_eqx import AtomicGraph, PaddingSpec
from uma_eqx.calculator import UMACalculator
from uma_eqx.relax import FIREParameters, ResultLog, relax_batch

#: The acceptance bound of issue 19: final energies equal ASE's to 1e-3 eV/atom.
ENERGY_TOL_PER_ATOM = 1e-3
MAX_STEPS = 200


class _OnePaddedSize(UMACalculator):
    """`UMACalculator` that pads every structure to one size: one compiled program for the oracle
    (padding does not change results: tests/test_graph.py, tests/test_predict.py)."""

    def _graph(self, atoms):
        return AtomicGraph.for_model(self.model, atoms, self.task_name, pad=PaddingSpec(9, 400, 2))


def _strained(atoms: Atoms, seed: int, rattle: float = 0.06, strain: float = 0.02) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + strain * rng.standard_normal((3, 3))), scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def mixed_set() -> list[Atoms]:
    """Rattled, strained cells of 2-8 atoms of the built-in model's elements, and an Al cluster."""
    cells = [
        _strained(bulk("Pt", "fcc", a=3.92, cubic=True).repeat((2, 1, 1)), 0),  # 8 atoms, largest first
        _strained(bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1)), 1),  # 2 atoms
        _strained(bulk("Ag", "fcc", a=4.09, cubic=True), 2),  # 4 atoms
        _strained(bulk("Au", "fcc", a=4.08, cubic=True).repeat((2, 1, 1)), 3),  # 8 atoms
        _strained(bulk("Ni", "fcc", a=3.52, cubic=True), 4),
        _strained(bulk("Pd", "fcc", a=3.89).repeat((2, 2, 1)), 5),
    ]
    cluster = Atoms("Al5", positions=[[0, 0, 0], [2.7, 0, 0], [1.35, 2.3, 0], [1.35, 0.8, 2.2], [1.35, 0.8, -2.2]])
    cluster.rattle(0.05, seed=6)
    return cells + [cluster]


def bad_inputs() -> list[Atoms]:
    """An element outside the model, a NaN position, and two atoms on top of each other."""
    unknown = bulk("Fe", "bcc", a=2.87)
    nan = bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1))
    nan.positions[1, 0] = np.nan
    overlap = bulk("Ag", "fcc", a=4.09, cubic=True)
    overlap.positions[1] = overlap.positions[0] + 0.01
    return [unknown, nan, overlap]


def ase_fire(atoms: Atoms, calc, cell: bool) -> tuple[float, int, bool]:
    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell and atoms.pbc.all() else atoms
    opt = FIRE(target, logfile=None)
    converged = opt.run(fmax=0.05, steps=MAX_STEPS)
    return float(atoms.get_potential_energy()), opt.nsteps, bool(converged)


@pytest.fixture(scope="module")
def model():
    return uma_eqx.default_model()


@pytest.fixture(scope="module")
def calc(model):
    return _OnePaddedSize(model)


@pytest.fixture(scope="module")
def stream():
    good = mixed_set()
    # bad structures in the middle of the stream: each gets its record, the rest goes on
    return good[:3] + bad_inputs() + good[3:]


@pytest.fixture(scope="module")
def relaxed(model, stream):
    return relax_batch(model, stream, fmax=0.05, max_steps=MAX_STEPS, batch_size=3)


@pytest.mark.parametrize("cell", [False, True])
def test_energies_and_steps_match_ase_fire(model, calc, stream, relaxed, cell):
    good = [k for k in range(len(stream)) if k not in (3, 4, 5)]  # bad_inputs() sit at 3, 4, 5
    if cell:
        # the same stream (the same slot sizes: no new compilation); ASE's filter on a subset
        relaxed = relax_batch(model, stream, fmax=0.05, max_steps=MAX_STEPS, batch_size=3, cell=True)
        good = [good[1], good[3], good[-1]]
    structures = [stream[k] for k in good]
    results = [relaxed[k] for k in good]
    for atoms, result in zip(structures, results):
        energy, steps, converged = ase_fire(atoms, calc, cell)
        n = len(atoms)
        assert "error" not in result, result.get("error")
        assert result["converged"] == converged
        assert abs(result["energy"] - energy) / n <= ENERGY_TOL_PER_ATOM
        # same algorithm, same forces up to round-off: the same number of steps, or nearly
        assert abs(result["steps"] - steps) <= max(2, steps // 10), (result["steps"], steps)
        assert result["fmax"] < 0.05
        forces = result["forces"]
        assert forces.shape == (n, 3) and np.max(np.linalg.norm(forces, axis=1)) < 0.05 * (1.0 if not cell else 1.5)
        if cell and atoms.pbc.all():
            assert not np.allclose(result["atoms"].cell[:], atoms.cell[:])  # the cell moved
            assert np.max(np.abs(result["stress"])) * atoms.get_volume() / n < 0.05 * 1.5
        else:
            np.testing.assert_array_equal(result["atoms"].cell[:], atoms.cell[:])


def test_results_in_input_order_with_failed_records(stream, relaxed):
    assert [r["index"] for r in relaxed] == list(range(len(stream)))
    errors = {k: r["error"] for k, r in enumerate(relaxed) if "error" in r}
    assert sorted(errors) == [3, 4, 5]
    assert "Fe" in errors[3] or "26" in errors[3]
    assert "non-finite" in errors[4] and "structure #4" in errors[4]
    assert "apart" in errors[5] and "structure #5" in errors[5]
    for k, r in enumerate(relaxed):
        assert r["natoms"] == len(stream[k])
        if k not in errors:
            assert r["converged"] and r["steps"] > 0
            assert r["atoms"].get_chemical_symbols() == stream[k].get_chemical_symbols()


def test_not_converged_reports_last_state(model, stream, relaxed):
    results = relax_batch(model, stream, fmax=0.05, max_steps=3, batch_size=3)
    for full, short in zip(relaxed, results):
        if "error" in full:
            assert "error" in short
            continue
        assert short["steps"] == 3 and not short["converged"]
        assert short["fmax"] >= 0.05 and short["energy"] > full["energy"] - 1e-6
        assert np.isfinite(short["forces"]).all()


def test_extxyz_output_is_read_back(model, stream, relaxed, tmp_path):
    out = tmp_path / "relaxed.extxyz"
    log = ResultLog(out)
    log.open()
    for r in reversed(relaxed):  # finished out of order
        log.append(r)
    log.close()
    # everything is on disk: a rerun computes nothing and returns the records in input order
    again = relax_batch(model, stream, fmax=0.05, max_steps=MAX_STEPS, batch_size=3, output=out)
    for a, b in zip(relaxed, again):
        assert a["index"] == b["index"] and a.get("error") == b.get("error")
        if "error" not in a:
            assert (a["steps"], a["converged"]) == (b["steps"], b["converged"])
            np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-12)
            np.testing.assert_allclose(b["forces"], a["forces"], rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(b["atoms"].positions, a["atoms"].positions, atol=1e-7)  # extxyz: 8 decimals
    from ase.io import read

    frames = read(out, index=":")
    assert [f.info["index"] for f in frames] == list(range(len(stream)))  # rewritten in input order


def test_torn_record_is_cut_off(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"index": 0, "error": "x", "natoms": 1}) + "\n" + '{"index": 1, "ener')
    log = ResultLog(out)
    assert list(log.open()) == [0]
    log.close()
    assert out.read_text().count("\n") == 1 and out.read_text().endswith("\n")


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        relax_batch(model, [], batch_size=0)
    with pytest.raises(ValueError, match="fmax"):
        relax_batch(model, [], fmax=-1.0)
    with pytest.raises(ValueError, match="suffix"):
        relax_batch(model, [], output="out.cif")
    with pytest.raises(ValueError, match="maxstep"):
        FIREParameters(maxstep=0.0)


_CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, equinox as eqx
    jax.config.update("jax_enable_x64", True)
    from ase.build import bulk
    import uma_eqx
    from uma_eqx.relax import relax_batch

    def tiny_model():
        config = uma_eqx.UMAConfig(
            sphere_channels=4, hidden_channels=4, edge_channels=4, lmax=1, mmax=1, num_layers=1,
            num_distance_basis=4, cutoff=4.0, datasets=("omat",), num_experts=2,
        )
        skeleton = eqx.filter_eval_shape(uma_eqx.UMA, config, jnp.float64, key=jax.random.key(0))
        rng = np.random.default_rng(0)
        fill = lambda x: jnp.asarray(rng.normal(scale=0.3, size=x.shape), x.dtype) if isinstance(
            x, jax.ShapeDtypeStruct) else x
        return jax.tree.map(fill, skeleton)

    def structures():
        out = []
        for k in range(8):
            a = bulk(["Cu", "Ni"][k % 2], "fcc", a=3.6, cubic=True).repeat((1, 1, 2 - (k > 0)))
            a.rattle(0.05, seed=k)
            out.append(a)
        return out

    pause = float(sys.argv[2])
    results = relax_batch(tiny_model(), structures(), fmax=0.05, max_steps=12, batch_size=2,
                          output=sys.argv[1], callback=lambda r: time.sleep(pause))
    if len(sys.argv) > 3:
        import pickle
        with open(sys.argv[3], "wb") as f:
            pickle.dump([(r["index"], r["energy"], r["steps"], r["converged"]) for r in results], f)
    """
)


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_killed_run_resumes_with_one_result_per_input(tmp_path):
    import pickle

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = [sys.executable, "-c", _CRASH_SCRIPT]
    # the uninterrupted reference
    reference_file = tmp_path / "reference.jsonl"
    done = subprocess.run(script + [str(reference_file), "0", str(tmp_path / "ref.pkl")], env=env, timeout=600)
    assert done.returncode == 0
    reference = pickle.loads((tmp_path / "ref.pkl").read_bytes())
    # killed with SIGKILL once the first results are on disk
    out = tmp_path / "run.jsonl"
    proc = subprocess.Popen(script + [str(out), "1.0"], env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(_records(out)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = {r["index"] for r in _records(out)}
    assert 2 <= len(partial) < 8
    # the same command again finishes the rest
    done = subprocess.run(script + [str(out), "0", str(tmp_path / "resumed.pkl")], env=env, timeout=600)
    assert done.returncode == 0
    records = _records(out)
    assert [r["index"] for r in records] == list(range(8))  # exactly one per input, in input order
    resumed = pickle.loads((tmp_path / "resumed.pkl").read_bytes())
    for (k, e, steps, conv), (k2, e2, steps2, conv2), record in zip(reference, resumed, records):
        assert k == k2 == record["index"]
        assert (steps, conv) == (steps2, conv2) == (record["steps"], record["converged"])
        assert abs(e - e2) <= 1e-9 * max(1.0, abs(e)) and record["energy"] == e2


def test_cli_optimize_many_frames(stream, relaxed, tmp_path):
    from ase.io import write
    from click.testing import CliRunner

    from uma_eqx.cli import main

    many = tmp_path / "many.extxyz"
    write(many, stream)
    out = tmp_path / "relaxed.jsonl"
    args = ["optimize", str(many), "--batch-size", "3", "--steps", str(MAX_STEPS), "--output", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 2  # three bad frames: reported, and the exit code says so
    assert "3 failed" in result.output and f"{many}[4]" in result.output
    records = _records(out)
    assert [r["index"] for r in records] == list(range(len(stream)))
    for record, r in zip(records, relaxed):
        assert ("error" in record) == ("error" in r)
        if "error" not in r:
            assert abs(record["steps"] - r["steps"]) <= 1 and abs(record["energy"] - r["energy"]) < 1e-4 * r["natoms"]


_DEVICES_SCRIPT = _CRASH_SCRIPT.split("pause = float")[0] + textwrap.dedent(
    """
        assert jax.device_count() == 4
        model, structs = tiny_model(), structures()
        one = relax_batch(model, structs, fmax=0.05, max_steps=12, batch_size=4, devices=1)
        four = relax_batch(model, structs, fmax=0.05, max_steps=12, batch_size=4, devices=4)
        for a, b in zip(one, four):
            assert (a["steps"], a["converged"]) == (b["steps"], b["converged"]), (a, b)
            assert abs(a["energy"] - b["energy"]) <= 1e-9 * max(1.0, abs(a["energy"])), (a["energy"], b["energy"])
            assert np.allclose(a["atoms"].positions, b["atoms"].positions, atol=1e-9)
        print("OK", [r["steps"] for r in four])
        """
)


def test_slots_split_over_devices_equal_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout


def test_packs_hold_structures_in_contiguous_rows_at_their_own_size():
    """The host layout of the batch: each structure's atoms and edges in contiguous rows (atoms
    grouped by system, edges sorted by target, as the model's expert routing requires), packs
    sized for the mean structure rather than slots x the largest, and a stepped state read back
    into the right structure after others left."""
    from uma_eqx.relax import _candidates, _Entry, _Member, _Packs

    model = uma_eqx.default_model()
    structures = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat(r) for r in ((1, 1, 1), (4, 2, 2), (2, 1, 1), (1, 1, 1))]
    packs = _Packs(num_packs=1, slots=4, dtype=np.float64, index_dtype=np.int64, fire=FIREParameters())
    radius = model.config.cutoff + 0.5
    members = []
    for k, atoms in enumerate(structures):
        edges = _candidates(atoms.positions, atoms.cell[:], atoms.pbc, radius)
        entry = _Entry(index=k, atoms=atoms, task="omat", natoms=len(atoms), pbc=atoms.pbc.copy())
        state = packs.new_state(entry, atoms.cell[:], False, None, radius)
        members.append(_Member(entry, atoms.numbers, (0, 0, 0), edges[0], edges[1], edges[0].shape[1], state))
    packs.size_for([(m.entry.natoms, m.reserve) for m in members])
    sizes = [len(a) for a in structures]
    assert packs.atoms_cap < 4 * max(sizes)  # 4 slots of the largest (64 atoms) would be 256 rows
    for m in members:
        assert packs.fits(0, m.entry.natoms, m.reserve)
        packs.members[0].append(m)
    graph, state = packs.pack()
    system, mask = graph["system_index"][0], graph["atom_mask"][0]
    assert np.all(np.diff(system) >= 0) and mask.sum() == sum(sizes) and not mask[-1]
    np.testing.assert_array_equal(np.bincount(system[mask]), sizes)
    target = graph["edge_index"][0, 1]
    assert np.all(np.diff(target) >= 0)  # sorted by target, padded edges last on the padding atom
    real = graph["edge_mask"][0]
    np.testing.assert_array_equal(np.bincount(system[target[real]]), [m.edges.shape[1] for m in members])
    # a stepped state goes back to its structure; after the second one leaves, the others keep theirs
    state["x"][0, mask] += 1.0
    packs.unpack(state)
    np.testing.assert_allclose(packs.members[0][2].state["x"], structures[2].positions + 1.0)
    packs.members[0].pop(1)
    graph, state = packs.pack()
    assert graph["atom_mask"][0].sum() == sum(sizes) - sizes[1]
    np.testing.assert_allclose(state["x"][0, 4:12], structures[2].positions + 1.0)
