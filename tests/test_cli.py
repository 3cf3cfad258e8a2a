"""The `uma-eqx` command line: every subcommand's happy path and its one-line error path."""

import json
import pathlib

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from click.testing import CliRunner

import uma_eqx
from conftest import FIXTURES
from uma_eqx.cli import main


def _run(args, ok=True):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _one_line_error(result, *fragments):
    """Exit code 2, a single `Error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def cu_file(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True)
    atoms.rattle(0.05, seed=0)
    path = tmp_path / "cu.extxyz"
    write(path, atoms)
    return path


def test_help_shows_examples_and_every_subcommand():
    out = _run(["--help"]).output
    for name in ("convert", "info", "predict", "optimize", "md", "train", "bench", "Examples:"):
        assert name in out
    for name in ("convert", "info", "predict", "optimize", "md", "train", "bench"):
        assert "Usage:" in _run([name, "--help"]).output


def test_predict_bundled_and_outputs(tmp_path):
    out = _run(["predict"]).output
    table = [line for line in out.splitlines() if "omat" in line]
    assert len(table) == len(read(uma_eqx.cli.EXAMPLES, ":"))
    for suffix in (".json", ".csv", ".extxyz"):
        target = tmp_path / f"r{suffix}"
        _run(["predict", str(uma_eqx.cli.EXAMPLES), "--output", str(target)])
        assert target.stat().st_size > 0
    rows = json.loads((tmp_path / "r.json").read_text())
    frames = read(tmp_path / "r.extxyz", ":")
    assert [r["energy_eV"] for r in rows] == pytest.approx([f.get_potential_energy() for f in frames], rel=1e-6)
    # The batched CLI equals the ASE calculator one structure at a time.
    from uma_eqx.calculator import UMACalculator

    atoms = read(uma_eqx.cli.EXAMPLES, 0)
    atoms.calc = UMACalculator(uma_eqx.default_model(), task_name="omat")
    assert rows[0]["energy_eV"] == pytest.approx(atoms.get_potential_energy(), rel=1e-5)


def test_predict_errors(tmp_path):
    _one_line_error(_run(["predict", str(tmp_path / "nope.cif")], ok=False), "structure file not found")
    bad = tmp_path / "bad.xyz"
    bad.write_text("this is not a structure\n")
    _one_line_error(_run(["predict", str(bad)], ok=False), "cannot read structures")
    fe = tmp_path / "fe.extxyz"
    write(fe, bulk("Fe"))
    _one_line_error(_run(["predict", str(fe)], ok=False), "26 (Fe)", "outside this model's elements")
    _one_line_error(_run(["predict", "--task", "omol"], ok=False), "unknown task_name 'omol'")
    _one_line_error(_run(["predict", "--model", str(tmp_path / "m.eqx")], ok=False), "model file not found")
    _one_line_error(_run(["predict", str(uma_eqx.cli.EXAMPLES), "--output", str(tmp_path / "r.txt")], ok=False),
                    "unknown output format")


def test_info_and_convert(tmp_path):
    out = _run(["info"]).output
    assert "parameters:" in out and "tasks: omat" in out
    out = _run(["info", str(FIXTURES / "uma_s_1p1.eqx")]).output
    assert "format version" in out and "experts=4" in out
    _one_line_error(_run(["info", str(tmp_path / "missing.eqx")], ok=False), "model file not found")
    _one_line_error(_run(["convert", str(tmp_path / "x.pt"), str(tmp_path / "x.eqx")], ok=False), "checkpoint not found")


def test_convert_happy_path(tmp_path):
    pytest.importorskip("torch")
    target = tmp_path / "s.eqx"
    out = _run(["convert", str(FIXTURES / "uma_s_1p1.pt"), str(target)]).output
    assert "verification:" in out and "-> OK" in out and "active per structure" in out
    assert uma_eqx.read_header(target)["config"]["num_experts"] == 4
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip or pickle")
    _one_line_error(_run(["convert", str(junk), str(tmp_path / "j.eqx")], ok=False))


def test_optimize(tmp_path, cu_file):
    out_file = tmp_path / "opt.extxyz"
    out = _run(["optimize", str(cu_file), "--fmax", "0.02", "--cell", "--output", str(out_file)]).output
    assert "converged" in out
    frames = read(out_file, ":")
    # extxyz turns info["energy"] into the frame's calculator energy on reading.
    assert frames[-1].info["fmax"] < 0.02 and frames[-1].get_potential_energy() < frames[0].get_potential_energy()
    mol = tmp_path / "mol.xyz"
    write(mol, molecule("H2"))
    _one_line_error(_run(["optimize", str(mol)], ok=False), "outside this model's elements")
    cu2 = bulk("Cu").repeat(2)
    cu2.pbc = False
    write(tmp_path / "cluster.xyz", cu2)
    _one_line_error(_run(["optimize", str(tmp_path / "cluster.xyz"), "--cell"], ok=False), "needs a periodic system")


@pytest.mark.parametrize("engine, ensemble", [("jax-md", "nve"), ("ase", "nvt")])
def test_md(tmp_path, cu_file, engine, ensemble):
    pytest.importorskip("jax_md")
    traj = tmp_path / "md.extxyz"
    out = _run(["md", str(cu_file), "--engine", engine, "--ensemble", ensemble, "--steps", "20", "--interval", "10",
                "--timestep", "1.0", "--output", str(traj)]).output
    assert "steps/s" in out
    frames = read(traj, ":")
    assert [f.info["step"] for f in frames] == [0, 10, 20]
    log = np.loadtxt(tmp_path / "md.log")
    assert log.shape == (3, 7) and np.all(np.isfinite(log[:, :6]))
    if ensemble == "nve":
        assert np.ptp(log[:, 4]) / len(frames[0]) < 1e-3  # total energy, eV/atom
    assert (tmp_path / "md.png").stat().st_size > 1000


def test_md_errors(tmp_path, cu_file):
    cluster = bulk("Cu").repeat(2)
    cluster.pbc = False
    write(tmp_path / "cluster.xyz", cluster)
    _one_line_error(_run(["md", str(tmp_path / "cluster.xyz"), "--ensemble", "npt", "--steps", "2"], ok=False),
                    "npt needs a periodic system")
    _one_line_error(_run(["md", str(cu_file), "--timestep", "-1", "--steps", "2"], ok=False), "timestep_fs")
    _one_line_error(_run(["md", str(cu_file), "--temperature", "0", "--steps", "2"], ok=False),
                    "nvt needs temperature_K > 0")
    usage = _run(["md", str(cu_file), "--ensemble", "nph"], ok=False)
    assert usage.exit_code == 2 and "Invalid value for '--ensemble'" in usage.output


def test_bench():
    out = _run(["bench", "--atoms", "4", "--repeats", "1", "--mode", "raw"]).output
    assert "4" in out and "|" in out
    _one_line_error(_run(["bench", "--atoms", "a,b"], ok=False), "--atoms must be comma-separated integers")


def test_train(tmp_path):
    frames = []
    for i in range(4):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=np.zeros(6))
        frames.append(atoms)
    write(tmp_path / "train.extxyz", frames)
    config = tmp_path / "cfg.toml"
    config.write_text(
        f'train = ["{tmp_path / "train.extxyz"}"]\nout_dir = "{tmp_path / "run"}"\ntask = "omat"\nepochs = 1\n'
        "batch_size = 2\nprogress = false\n[model]\nsphere_channels = 8\nhidden_channels = 8\nedge_channels = 4\n"
        'lmax = 1\nmmax = 1\nnum_layers = 1\nnum_distance_basis = 8\ncutoff = 4.0\ndatasets = ["omat"]\n'
    )
    out = _run(["train", str(config)]).output
    assert "model.eqx" in out and (tmp_path / "run" / "model.eqx").exists()
    _one_line_error(_run(["train", str(tmp_path / "none.toml")], ok=False), "training config not found")
    pathlib.Path(tmp_path / "broken.toml").write_text("train = ['t.extxyz']\nepochs = 'many'\n")
    _one_line_error(_run(["train", str(tmp_path / "broken.toml")], ok=False), "epochs = 'many' must be a int")
    pathlib.Path(tmp_path / "broken2.toml").write_text("train = 3\n")
    _one_line_error(_run(["train", str(tmp_path / "broken2.toml")], ok=False), "train = 3 must be a file name")
