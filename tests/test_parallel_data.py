"""Data parallel over devices (`uma_eqx.parallel`): predict and a training step equal one device's.

Eight CPU devices are simulated in one child process (`XLA_FLAGS` must be set before JAX
starts); it runs every comparison once and reports the differences as JSON, which the tests
below check. Oracle: the same computation on one device (predict with `devices=1`; the
training step as the plain one-graph `loss_fn` gradient and optax update).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

#: float64 results over devices equal one device's to this relative error (issue 18).
RTOL = 1e-12

_SCRIPT = textwrap.dedent(
    """
    import json, math, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    jax.config.update("jax_enable_x64", True)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import optax
    from ase import Atoms
    from ase.build import bulk, molecule

    import uma_eqx
    from uma_eqx import parallel
    from uma_eqx.train import LossWeights, loss_fn
    from uma_eqx.train._data import Record, batch_capacity, make_batch
    from uma_eqx.train._loop import _to_device, _train_step, stack_batches

    assert jax.device_count() == 8

    def tiny_model():
        # random weights drawn with numpy into the eval_shape skeleton (fast; see test_properties)
        config = uma_eqx.UMAConfig(
            sphere_channels=4, hidden_channels=4, edge_channels=4, lmax=1, mmax=1, num_layers=1,
            num_distance_basis=4, cutoff=4.0, datasets=("omat", "omol"),
            dataset_embedding_names=("omat", "omol"), num_experts=2, use_composition_embedding=True,
        )
        skeleton = eqx.filter_eval_shape(uma_eqx.UMA, config, jnp.float64, key=jax.random.key(0))
        rng = np.random.default_rng(0)
        fill = lambda x: jnp.asarray(rng.normal(scale=0.5, size=x.shape), x.dtype) if isinstance(
            x, jax.ShapeDtypeStruct) else x
        return jax.tree.map(fill, skeleton)

    def structures():
        out = []
        for k in (7, 0, 1, 2, 3, 4, 5, 6, 8):  # the largest first: capacities fixed by the first batch
            if k % 4 == 3:
                a = molecule(["H2O", "CH4", "NH3"][k % 3])
                a.info.update(task="omol", charge=0, spin=1)
            else:
                a = bulk(["Cu", "Ni"][k % 2], "fcc", a=3.6, cubic=k % 3 == 0).repeat((1, 1, 1 + k % 2))
                a.info["task"] = "omat"
            a.rattle(0.05, seed=k)
            out.append(a)
        return out

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    import time
    t0 = time.process_time()
    report = {}
    model, structs = tiny_model(), structures()
    # 9 structures in batches of 6: the first batch gives devices 1, 1, 1, 1, 1, 1, 0, 0 structures,
    # the second 1, 1, 1, 0, ... (devices=None: all 8)
    one = uma_eqx.predict(model, structs, batch_size=6, devices=1, progress=False)
    many = uma_eqx.predict(model, structs, batch_size=6, progress=False)
    report["predict"] = {
        key: max(rel(m[key], o[key]) for m, o in zip(many, one)) for key in ("energy", "forces", "stress")
    }
    report["predict_scale"] = {key: max(float(np.max(np.abs(o[key]))) for o in one) for key in ("energy", "forces")}

    # one optax step: records split over 8 devices (one gets padding only) vs one graph on one device
    rng = np.random.default_rng(1)
    records = []
    for k, a in enumerate(s for s in structs if s.info["task"] == "omat"):
        a = a.copy()
        stress = rng.normal(scale=0.01, size=(3, 3))
        records.append(Record(a, float(rng.normal()), rng.normal(size=(len(a), 3)), (stress + stress.T) / 2,
                              "omat", f"record {k}"))
    config = model.config
    weights = LossWeights(1.0, 10.0, 1.0)
    optimizer = optax.adam(1e-2)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = optimizer.init(params)
    whole = _to_device(make_batch(records, config, batch_capacity(records, config, len(records)), jnp.float64))

    @eqx.filter_jit
    def plain_step(params, state):
        loss, grads = eqx.filter_value_and_grad(lambda p: loss_fn(eqx.combine(p, static), whole, weights)[0])(params)
        updates, _ = optimizer.update(grads, state, params)
        return loss, eqx.apply_updates(params, updates)

    loss1, reference = plain_step(params, state)

    mesh = parallel.batch_mesh(8)
    padding = batch_capacity(records, config, 1)
    stacked = stack_batches([[r] for r in records], config, padding, jnp.float64, mesh)
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    reference, before = leaves(reference), leaves(params)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # the step donates its arguments: buffers of their own
    new, _, _, loss8, _ = _train_step(static, copy(params), copy(state), copy(params), stacked, optimizer,
                                      weights, 0.0, mesh)
    step = max(float(np.max(np.abs(r - p))) for r, p in zip(reference, before))
    diff = max(float(np.max(np.abs(n - r))) for n, r in zip(leaves(new), reference))
    report["train"] = {"records": len(records), "loss_rel": abs(float(loss8) - float(loss1)) / abs(float(loss1)),
                       "largest_update": step, "param_diff_over_update": diff / step}
    report["seconds"] = time.process_time() - t0
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line.removeprefix("REPORT"))


def test_predict_over_devices_equals_one_device(report):
    """Batches that do not divide the device count, devices left with padding only (default: all 8)."""
    assert report["predict_scale"]["energy"] > 1e-3 and report["predict_scale"]["forces"] > 1e-3
    for key, err in report["predict"].items():
        assert err <= RTOL, (key, err)


def test_training_step_over_devices_equals_one_device(report):
    """The eighth device holds padding only: a non-finite value there would poison the gradient."""
    train = report["train"]
    assert train["records"] == 7  # one record per device: the eighth device gets padding only
    assert train["loss_rel"] <= RTOL
    assert train["largest_update"] > 1e-4  # the step moved the parameters (adam, lr 1e-2)
    assert train["param_diff_over_update"] <= RTOL


def test_resolve_devices_errors():
    from uma_eqx import parallel

    with pytest.raises(ValueError, match="devices=0 is invalid"):
        parallel.resolve_devices(0)
    with pytest.raises(ValueError, match="empty sequence"):
        parallel.resolve_devices([])
    device = parallel.resolve_devices(1)[0]
    with pytest.raises(ValueError, match="lists a device twice"):
        parallel.resolve_devices([device, device])
    assert [len(g) for g in parallel.split_evenly(list(range(5)), 3)] == [2, 2, 1]
    assert sum(parallel.split_evenly(list(range(5)), 8), []) == list(range(5))
    assert np.array_equal(parallel.batch_mesh(1).devices, np.array(parallel.resolve_devices(1)))
