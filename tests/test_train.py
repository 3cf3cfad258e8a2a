"""Training and fine-tuning: loss falls, freezing, exact resume, fine-tuning a converted model, bad data."""

import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from conftest import FIXTURES

import uma_eqx
from uma_eqx.train import TrainConfig, read_dataset, train, trainable_filter

ROOT = pathlib.Path(__file__).parents[1]
SMALL = dict(
    sphere_channels=8,
    hidden_channels=8,
    edge_channels=4,
    lmax=2,
    mmax=2,
    num_layers=1,
    num_distance_basis=8,
    cutoff=4.5,
    datasets=["omat"],
    num_experts=2,
    use_composition_embedding=True,
)


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = bulk(["Cu", "Ni", "Pd"][i % 3], "fcc", a=3.6 + 0.1 * (i % 3), cubic=True)
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        atoms.info["task"] = "omat"
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("emt")
    write(d / "train.extxyz", _frames(12))
    write(d / "val.extxyz", _frames(4, seed=1))
    return d


def _cfg(data, out, **kw):
    base = dict(
        train=[str(data / "train.extxyz")],
        valid=[str(data / "val.extxyz")],
        out_dir=str(out),
        model=SMALL,
        epochs=4,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=2,
        fit_references=True,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_outputs_written_and_resume_is_exact(data, tmp_path):
    full, result = train(_cfg(data, tmp_path / "a", epochs=8), resume=False)
    hist = result["history"]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    for name in (
        "model.eqx",
        "metrics.csv",
        "metrics.json",
        "learning_curve.png",
        "checkpoint.eqx",
        "checkpoint.state",
    ):
        assert (tmp_path / "a" / name).exists(), name
    assert "val_forces_mae_meV_per_A" in hist[-1]
    back = uma_eqx.load(tmp_path / "a" / "model.eqx")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # interrupted after 4 of 8 epochs, then restarted: bit-identical to the uninterrupted run
    train(_cfg(data, tmp_path / "b", epochs=8), resume=False, stop_after_epochs=4)
    resumed, _ = train(_cfg(data, tmp_path / "b", epochs=8), resume=True)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fine_tune_converted_fixture_with_frozen_backbone(data, tmp_path):
    """Fine-tune the converted uma-s-1p1 fixture, heads only: backbone bit-identical, loss falls, reload."""
    init = uma_eqx.load(FIXTURES / "uma_s_1p1.eqx")
    cfg = _cfg(
        data,
        tmp_path / "ft",
        model=None,
        init=str(FIXTURES / "uma_s_1p1.eqx"),
        freeze="backbone",
        epochs=3,
        ema_decay=0.0,
        fit_references=False,
        learning_rate=1e-2,
    )
    tuned, result = train(cfg, resume=False)
    for a, b in zip(jax.tree.leaves(init.backbone), jax.tree.leaves(tuned.backbone)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init.energy_head), jax.tree.leaves(tuned.energy_head))
    )
    hist = result["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    code = (
        "import sys; sys.modules['torch'] = None\nimport uma_eqx, jax\nfrom ase.build import bulk\n"
        f"m = uma_eqx.load({str(tmp_path / 'ft' / 'model.eqx')!r})\n"
        "g = uma_eqx.AtomicGraph.from_atoms(bulk('Cu','fcc',a=3.6), cutoff=6.0,\n"
        "                                   datasets=m.config.datasets, task_name='omat')\n"
        "print(repr(float(m(g)[0])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-1500:]
    g = uma_eqx.AtomicGraph.from_atoms(
        bulk("Cu", "fcc", a=3.6), cutoff=6.0, datasets=tuned.config.datasets, task_name="omat"
    )
    assert float(out.stdout.split()[-1]) == pytest.approx(float(tuned(g)[0]), rel=1e-6)


def test_freeze_filters():
    model = uma_eqx.load(FIXTURES / "uma_s_1p1.eqx")
    experts_only = trainable_filter(model, "all_but_experts")
    params, _ = eqx.partition(model, experts_only)
    leaves = jax.tree.leaves(params)
    # only MoLE layers: (experts, out, in) weights and their shared biases
    assert any(x.ndim == 3 for x in leaves) and all(x.ndim in (1, 3) for x in leaves)
    is_mole = lambda v: isinstance(v, uma_eqx.MoLELinear)  # noqa: E731
    n_mole = sum(is_mole(x) for x in jax.tree.leaves(model.backbone.blocks, is_leaf=is_mole))
    assert sum(x.ndim == 3 for x in leaves) == n_mole
    with pytest.raises(ValueError, match="unknown freeze"):
        trainable_filter(model, "heads")


def test_bad_records(tmp_path):
    frames = _frames(2)
    no_energy = frames[0].copy()
    no_energy.calc = None
    write(tmp_path / "noe.extxyz", [no_energy])
    with pytest.raises(ValueError, match=r"noe\.extxyz\[0\]: no energy"):
        read_dataset(tmp_path / "noe.extxyz")
    bad_f = frames[1].copy()
    bad_f.calc = SinglePointCalculator(bad_f, energy=1.0, forces=np.full((len(bad_f), 3), np.nan))
    write(tmp_path / "nan.extxyz", [bad_f])
    with pytest.raises(ValueError, match=r"nan\.extxyz\[0\]: non-finite forces"):
        read_dataset(tmp_path / "nan.extxyz")
    unknown = frames[0]  # keeps its labels (a copy would drop the calculator)
    unknown.info["task"] = "omol"
    write(tmp_path / "task.extxyz", [unknown])
    cfg = TrainConfig(train=[str(tmp_path / "task.extxyz")], out_dir=str(tmp_path / "o"), model=SMALL, progress=False)
    with pytest.raises(ValueError, match=r"task 'omol' is not one of the model's tasks \['omat'\]"):
        train(cfg, resume=False)
    with pytest.raises(FileNotFoundError):
        read_dataset(tmp_path / "missing.extxyz")
