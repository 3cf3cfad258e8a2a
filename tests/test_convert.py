"""Converter: safe reading, config inference, strict key table, verification, `.eqx` round trip."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FIXTURE_NAMES, FIXTURES

import uma_eqx

torch = pytest.importorskip("torch", reason="conversion tests need torch (the convert extra)")

from uma_eqx.convert import (  # noqa: E402
    config_from_pytorch_checkpoint,
    convert_pytorch_state_dict,
    load_pytorch_checkpoint,
    verify_weight_loading,
)
from uma_eqx.convert._config import _parse_heads  # noqa: E402


@pytest.fixture(scope="module")
def ckpt():
    return load_pytorch_checkpoint(FIXTURES / "uma_s_1p1.pt")


def _convert(ckpt, state_dict=None, config=None):
    config = config or config_from_pytorch_checkpoint(ckpt)
    heads = _parse_heads(ckpt.model_config["heads"])
    return convert_pytorch_state_dict(ckpt.ema_state_dict if state_dict is None else state_dict, config, heads)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_convert_matches_committed_eqx(name):
    """The committed torch-free .eqx files are exactly what the converter produces today."""
    model = uma_eqx.load_fairchem_checkpoint(FIXTURES / f"{name}.pt")
    committed = uma_eqx.load(FIXTURES / f"{name}.eqx")
    assert model.config == committed.config
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(committed)):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_uses_ema_not_model_state_dict(ckpt):
    model = _convert(ckpt)
    ema = ckpt.ema_state_dict["backbone.sphere_embedding.weight"]
    raw = ckpt.model_state_dict["backbone.sphere_embedding.weight"]
    assert not np.array_equal(ema, raw)
    np.testing.assert_array_equal(np.asarray(model.backbone.sphere_embedding), ema)


def test_inferred_configs():
    c11 = config_from_pytorch_checkpoint(FIXTURES / "uma_s_1p1.pt")
    assert (c11.num_experts, c11.lmax, c11.mmax, c11.model_id) == (4, 2, 2, "UMA-1.1")
    assert not c11.composition_mean_includes_self
    assert c11.datasets == ("oc20", "odac", "omat", "omc", "omol")
    c12 = config_from_pytorch_checkpoint(FIXTURES / "uma_s_1p2.pt")
    assert c12.composition_mean_includes_self and c12.charge_balanced_channels == (0, 3)
    assert c12.supports_single_atoms
    i = c12.datasets.index
    # omat_rattle shares omat's embedding row and head expert
    assert c12.dataset_embedding_names[i("omat_rattle")] == "omat"
    assert c12.head_dataset_experts[i("omat_rattle")] == c12.head_dataset_experts[i("omat")]
    assert c12.num_head_experts == len(c12.datasets)
    cm = config_from_pytorch_checkpoint(FIXTURES / "uma_m_1p1.pt")
    assert (cm.lmax, cm.mmax) == (4, 2)
    cd = config_from_pytorch_checkpoint(FIXTURES / "dense.pt")
    assert cd.num_experts == 0 and cd.ff_type == "grid" and cd.dataset_embedding_names is None


def test_verify_report_is_exact(ckpt):
    model = _convert(ckpt)
    report = verify_weight_loading(model, ckpt)
    assert report.ok, str(report)
    assert len(report.rows) > 50 and report.derived_keys
    # a corrupted leaf is caught and named
    bad = jax.tree.map(lambda x: x, model)
    import equinox as eqx

    bad = eqx.tree_at(lambda m: m.backbone.mix_csd.bias, bad, bad.backbone.mix_csd.bias + 1e-3)
    report = verify_weight_loading(bad, ckpt)
    assert not report.ok and "backbone.mix_csd.bias" in str(report)


def test_renamed_key_fails(ckpt):
    sd = dict(ckpt.ema_state_dict)
    sd["backbone.mix_csd.weight_renamed"] = sd.pop("backbone.mix_csd.weight")
    with pytest.raises(ValueError, match=r"missing key 'backbone\.mix_csd\.weight'"):
        _convert(ckpt, sd)


def test_missing_key_fails(ckpt):
    sd = dict(ckpt.ema_state_dict)
    del sd["backbone.blocks.1.edge_wise.so2_conv_2.so2_m_conv.0.fc.weights"]
    with pytest.raises(ValueError, match=r"so2_m_conv\.0\.fc\.weights"):
        _convert(ckpt, sd)


def test_wrong_shape_fails(ckpt):
    sd = dict(ckpt.ema_state_dict)
    sd["backbone.norm.affine_weight"] = np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match=r"backbone\.norm\.affine_weight.*expected \(3, 16\), found \(4, 16\)"):
        _convert(ckpt, sd)


def test_extra_key_fails(ckpt):
    sd = dict(ckpt.ema_state_dict)
    sd["backbone.blocks.2.norm_1.affine_weight"] = np.zeros((3, 16), np.float32)
    with pytest.raises(ValueError, match=r"unexpected key.*blocks\.2\.norm_1\.affine_weight"):
        _convert(ckpt, sd)


def test_config_mismatch_fails(ckpt):
    config = dataclasses.replace(config_from_pytorch_checkpoint(ckpt), num_layers=3)
    with pytest.raises(ValueError, match=r"missing key 'backbone\.blocks\.2"):
        _convert(ckpt, config=config)


def test_unknown_config_key_fails(ckpt):
    ck = dataclasses.replace(
        ckpt, model_config={**ckpt.model_config, "backbone": {**ckpt.model_config["backbone"], "fancy_new_option": 1}}
    )
    with pytest.raises(ValueError, match="fancy_new_option"):
        config_from_pytorch_checkpoint(ck)
    ck = dataclasses.replace(
        ckpt, model_config={**ckpt.model_config, "backbone": {**ckpt.model_config["backbone"], "act_type": "s2"}}
    )
    with pytest.raises(ValueError, match=r"act_type='s2' is not supported"):
        config_from_pytorch_checkpoint(ck)


def test_inconsistent_force_normaliser_fails(ckpt):
    tasks = [dict(t) for t in ckpt.tasks_config]
    for t in tasks:
        if t["name"] == "omat_forces":
            t["normalizer"] = {"mean": 0.0, "rmsd": 3.0}
    with pytest.raises(ValueError, match="omat.*forces normaliser"):
        config_from_pytorch_checkpoint(dataclasses.replace(ckpt, tasks_config=tasks))


def test_foreign_truncated_and_corrupt_files(tmp_path):
    foreign = tmp_path / "notes.pt"
    foreign.write_text("hello")
    with pytest.raises(ValueError, match="not a PyTorch zip checkpoint"):
        load_pytorch_checkpoint(foreign)
    data = (FIXTURES / "uma_s_1p1.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_pytorch_checkpoint(truncated)
    bare = tmp_path / "bare.pt"
    torch.save({"a": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match="not fairchem's MLIPInferenceCheckpoint"):
        load_pytorch_checkpoint(bare)
    with pytest.raises(FileNotFoundError):
        load_pytorch_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Evil()}, path)
    with pytest.raises(ValueError, match="cannot read"):
        load_pytorch_checkpoint(path)


def test_save_load_roundtrip_and_merged(tmp_path):
    model = uma_eqx.load(FIXTURES / "uma_s_1p1.eqx")
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    g = uma_eqx.AtomicGraph.from_atoms(atoms, cutoff=6.0, datasets=model.config.datasets, task_name="omat")
    merged = uma_eqx.merge_experts_for(model, g)
    uma_eqx.save(tmp_path / "m.eqx", merged)
    back = uma_eqx.load(tmp_path / "m.eqx")
    assert back.is_merged and uma_eqx.read_header(tmp_path / "m.eqx")["merged"]
    np.testing.assert_array_equal(np.asarray(back(g)), np.asarray(merged(g)))
    (tmp_path / "junk.eqx").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a uma_eqx model file"):
        uma_eqx.load(tmp_path / "junk.eqx")
    blob = (tmp_path / "m.eqx").read_bytes()
    (tmp_path / "short.eqx").write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        uma_eqx.load(tmp_path / "short.eqx")


def test_load_works_without_torch():
    """`uma_eqx.load` + a prediction run with torch made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import jax, uma_eqx\n"
        "from ase.build import bulk\n"
        f"m = uma_eqx.load({str(FIXTURES / 'uma_s_1p1.eqx')!r})\n"
        "g = uma_eqx.AtomicGraph.from_atoms(bulk('Cu', 'fcc', a=3.6), cutoff=6.0,\n"
        "                                   datasets=m.config.datasets, task_name='omat')\n"
        "print(float(m(g)[0]))\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    root = pathlib.Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.isfinite(float(out.stdout.strip().splitlines()[-1]))
