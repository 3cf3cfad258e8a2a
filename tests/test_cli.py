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
from conftest import FIXTURES, TOLERANCES

import uma_eqx
from uma_eqx.cli import main


def _run(args, ok=True):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _one_line_error(result, *fragments, exit_code=2):
    """Exit code 2, a single `Error:` line on stderr naming the problem, no traceback."""
    assert result.exit_code == exit_code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Error:" not in result.stdout and "Traceback" not in result.output
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
    _one_line_error(
        _run(["predict", str(uma_eqx.cli.EXAMPLES), "--output", str(tmp_path / "r.txt")], ok=False),
        "unknown output format",
    )


def test_info_and_convert(tmp_path):
    out = _run(["info"]).output
    assert "parameters:" in out and "tasks: omat" in out
    out = _run(["info", str(FIXTURES / "uma_s_1p1.eqx")]).output
    assert "format version" in out and "experts=4" in out
    _one_line_error(_run(["info", str(tmp_path / "missing.eqx")], ok=False), "model file not found")
    _one_line_error(
        _run(["convert", str(tmp_path / "x.pt"), str(tmp_path / "x.eqx")], ok=False), "checkpoint not found"
    )


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
    out = _run(
        [
            "md",
            str(cu_file),
            "--engine",
            engine,
            "--ensemble",
            ensemble,
            "--steps",
            "20",
            "--interval",
            "10",
            "--timestep",
            "1.0",
            "--output",
            str(traj),
        ]
    ).output
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
    _one_line_error(
        _run(["md", str(tmp_path / "cluster.xyz"), "--ensemble", "npt", "--steps", "2"], ok=False),
        "npt needs a periodic system",
    )
    _one_line_error(_run(["md", str(cu_file), "--timestep", "-1", "--steps", "2"], ok=False), "timestep_fs")
    _one_line_error(
        _run(["md", str(cu_file), "--temperature", "0", "--steps", "2"], ok=False), "nvt needs temperature_K > 0"
    )
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


def test_predict_bad_frames_are_reported_and_the_others_run(tmp_path):
    """One line per bad frame (file and frame named), results for the good ones, exit 2 at the end."""
    good = bulk("Cu", "fcc", a=3.6, cubic=True)
    rattled = good.copy()
    rattled.rattle(0.05, seed=1)
    nan, overlap, charged = good.copy(), good.copy(), good.copy()
    nan.positions[0, 0] = np.nan
    overlap.positions[1] = overlap.positions[0]
    charged.info["charge"] = "abc"
    write(tmp_path / "many.extxyz", [good, bulk("Fe"), rattled, nan, overlap, charged])
    result = _run(["predict", str(tmp_path / "many.extxyz"), "--output", str(tmp_path / "r.json")], ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    table = [line.split()[0] for line in result.stdout.splitlines() if " omat " in line]
    assert table == ["many.extxyz[0]", "many.extxyz[2]"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    where = str(tmp_path / "many.extxyz")
    expected = {1: "26 (Fe)", 3: "non-finite position", 4: "0 Å apart", 5: "info['charge'] = 'abc'"}
    assert len(errors) == len(expected)
    for line, (k, reason) in zip(errors, expected.items(), strict=True):
        assert line.startswith(f"Error: {where}[{k}]") and reason in line, line
    assert "4 of 6 structures failed; the results above are the other 2" in result.stderr
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [("error" in r) for r in rows] == [False, True, False, True, True, True]
    # the good frames' results are what they are alone
    alone = uma_eqx.predict(uma_eqx.default_model(), [good, rattled], task_name="omat", progress=False)
    tol = TOLERANCES["float32"]["energy"]  # padding differs between the two batches
    assert [rows[0]["energy_eV"], rows[2]["energy_eV"]] == pytest.approx([r["energy"] for r in alone], rel=tol, abs=tol)
    # csv: an error column; extxyz: the good frames only
    _run(["predict", str(tmp_path / "many.extxyz"), "--output", str(tmp_path / "r.csv")], ok=False)
    csv_rows = (tmp_path / "r.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",error") and len(csv_rows) == 7 and "26 (Fe)" in csv_rows[2]
    _run(["predict", str(tmp_path / "many.extxyz"), "--output", str(tmp_path / "r.extxyz")], ok=False)
    assert len(read(tmp_path / "r.extxyz", ":")) == 2


def test_predict_all_frames_bad(tmp_path):
    write(tmp_path / "fe.extxyz", [bulk("Fe"), bulk("Fe").repeat((2, 1, 1))])
    result = _run(["predict", str(tmp_path / "fe.extxyz")], ok=False)
    assert result.exit_code == 2 and "structure " not in result.stdout
    assert result.stderr.count("Error:") == 2 and "2 of 2 structures failed\n" in result.stderr


def test_model_file_errors(tmp_path, cu_file):
    png = tmp_path / "model.eqx"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    _one_line_error(
        _run(["predict", str(cu_file), "--model", str(png)], ok=False), "is a PNG image", "not a uma_eqx model file"
    )
    short = tmp_path / "short.eqx"
    short.write_bytes((FIXTURES / "dense.eqx").read_bytes()[:5000])
    _one_line_error(_run(["info", str(short)], ok=False), "truncated or corrupt model weights")
    empty = tmp_path / "empty.eqx"
    empty.write_bytes(b"")
    _one_line_error(_run(["md", str(cu_file), "--model", str(empty)], ok=False), "an empty file")
    _one_line_error(_run(["info", str(tmp_path)], ok=False), "is a directory")
    _one_line_error(
        _run(["convert", str(FIXTURES / "dense.eqx"), str(tmp_path / "o.eqx")], ok=False),
        "is a uma_eqx model file",
        "uma_eqx.load(",
    )
    _one_line_error(
        _run(["convert", str(FIXTURES / "dense.pt"), str(tmp_path / "no" / "o.eqx")], ok=False),
        "the folder",
        "does not exist",
    )


def test_fairchem_checkpoint_as_model_is_told_by_content(tmp_path):
    pytest.importorskip("torch")
    renamed = tmp_path / "dense.eqx"  # a .pt under a .eqx name: converted on the fly all the same
    renamed.write_bytes((FIXTURES / "dense.pt").read_bytes())
    out = _run(["info", str(renamed)]).output
    assert "experts=0" in out and "format version" not in out


def test_output_paths_are_checked_before_any_work(tmp_path, cu_file):
    for command in (["predict", str(cu_file)], ["md", str(cu_file)], ["optimize", str(cu_file)]):
        _one_line_error(_run([*command, "--output", str(tmp_path / "out.foo")], ok=False), "unknown output format")
        _one_line_error(
            _run([*command, "--output", str(tmp_path / "no" / "out.extxyz")], ok=False),
            f"the folder {tmp_path / 'no'} does not exist",
        )
        assert not (tmp_path / "out.foo").exists()


def test_train_config_errors(tmp_path):
    binary = tmp_path / "cfg.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    _one_line_error(_run(["train", str(binary)], ok=False), "is a PNG image, not a TOML text file")
    broken = tmp_path / "broken.toml"
    broken.write_text("train = [\n")
    _one_line_error(_run(["train", str(broken)], ok=False), f"{broken} is not valid TOML")


def test_unexpected_errors_are_one_line_without_traceback(monkeypatch):
    def broken():
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(uma_eqx, "default_model", broken)
    _one_line_error(_run(["info"], ok=False), "internal error: RuntimeError: device lost", "--debug", exit_code=1)
    with pytest.raises(RuntimeError, match="device lost"):
        _run(["--debug", "info"], ok=False)


def test_errors_through_the_real_entry_point(tmp_path):
    """The installed command: exit code 2, one line on stderr, nothing on stdout, no traceback."""
    import subprocess
    import sys

    missing = tmp_path / "missing.cif"
    proc = subprocess.run(
        [sys.executable, "-m", "uma_eqx.cli", "predict", str(missing), "--model", str(FIXTURES / "dense.eqx")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip() == f"Error: structure file not found: {missing}", proc.stderr


@pytest.mark.parametrize("steps", [1, 2])
def test_md_rate_of_short_runs(tmp_path, cu_file, steps):
    """A run shorter than one --interval records its last step and reports a real rate, never nan."""
    import re

    out = _run(
        [
            "md",
            str(cu_file),
            "--engine",
            "ase",
            "--steps",
            str(steps),
            "--interval",
            "10",
            "--output",
            str(tmp_path / "md.extxyz"),
        ]
    ).stdout
    assert "nan" not in out
    rate = float(re.search(r"([0-9.e+]+) steps/s after compilation", out).group(1))
    assert np.isfinite(rate) and rate > 0
    assert [f.info["step"] for f in read(tmp_path / "md.extxyz", ":")] == [0, steps]


def test_md_rate_is_none_without_timed_steps(tmp_path, cu_file):
    """JAX-MD compiles in its first chunk: a one-chunk run has no steps left to time."""
    pytest.importorskip("jax_md")
    out = _run(["md", str(cu_file), "--engine", "jax-md", "--steps", "2", "--output", str(tmp_path / "m.extxyz")])
    assert "rate: n/a (too few steps after compilation;" in out.stdout and "nan" not in out.stdout


def test_md_recorder_clock():
    from uma_eqx.simulate import _Recorder

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    zeros = np.zeros((len(atoms), 3))
    record = _Recorder(atoms, 1.0, None, warmup_records=1)
    record(0, atoms.positions, zeros, atoms.cell, 0.0, 0.0)
    record(10, atoms.positions, zeros, atoms.cell, 0.0, 0.0)  # the compiling chunk: the clock starts
    first = record.result()
    assert first.steps_per_second is None and first.wall_time_s > 0
    record(15, atoms.positions, zeros, atoms.cell, 0.0, 0.0)
    later = record.result()
    assert later.steps_per_second is not None and np.isfinite(later.steps_per_second) and later.steps_per_second > 0
    assert later.wall_time_s >= first.wall_time_s


def test_predict_never_prints_a_non_finite_result(monkeypatch):
    """A NaN energy from the model is reported as that structure's error, not printed as a number."""
    real = uma_eqx.predict

    def nan_for_the_second(*args, **kwargs):
        rows = real(*args, **kwargs)
        rows[1]["energy"] = float("nan")
        return rows

    monkeypatch.setattr(uma_eqx, "predict", nan_for_the_second)
    result = _run(["predict"], ok=False)
    assert result.exit_code == 2 and "nan" not in result.stdout.lower()
    assert "examples.extxyz[1]: the model returned a non-finite energy or forces" in result.stderr
    assert len([line for line in result.stdout.splitlines() if " omat " in line]) == 3
