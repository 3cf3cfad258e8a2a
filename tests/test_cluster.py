"""The Ray driver (`uma_eqx.cluster.run_sharded`): a worker killed mid-run, a driver restarted.

One local Ray instance (two CPUs, two workers, 127.0.0.1, no dashboard) for the module. The
work is `uma_eqx.predict` with a tiny random model, wrapped so that the worker given a marked
structure exits (`os._exit`) the first time: its shard must run again on a new worker, and
every input must end with exactly one result, in input order, equal to predict run here.
"""

import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ase.build import bulk  # noqa: E402

import uma_eqx  # noqa: E402
from uma_eqx import cluster  # noqa: E402

#: Same program, same weights, other process: equal to this relative error.
RTOL = 1e-12

# ray.init starts its processes with fork+exec (subprocess with preexec_fn); JAX, already running in
# this pytest worker, warns at every fork. The child execs at once, so the warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _tiny_model():
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    config = uma_eqx.UMAConfig(
        sphere_channels=4,
        hidden_channels=4,
        edge_channels=4,
        lmax=1,
        mmax=1,
        num_layers=1,
        num_distance_basis=4,
        cutoff=4.0,
        datasets=("omat",),
        num_experts=2,
        use_composition_embedding=True,
    )
    skeleton = eqx.filter_eval_shape(uma_eqx.UMA, config, jnp.float32, key=jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jnp.asarray(rng.normal(scale=0.5, size=leaf.shape), leaf.dtype)
        return leaf

    return jax.tree.map(fill, skeleton)


def die_once(model, structures, marker, **kwargs):
    """Predict; but the first worker to see a structure tagged `die` exits without a word."""
    if any(a.info.get("die") for a in structures):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # exactly one worker wins
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return cluster.predict_work(model, structures, **kwargs)


def pair_count(model, structures, **kwargs):
    """A work function that needs no compilation: "energy" = number of atom pairs, zero forces."""
    return [
        {"energy": float(len(a) * (len(a) - 1) / 2), "forces": np.zeros((len(a), 3)), "natoms": len(a)}
        for a in structures
    ]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    # workers share a compilation cache: a replacement worker reuses what the first ones compiled
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    model_path = folder / "tiny.eqx"
    uma_eqx.save(model_path, _tiny_model())
    structures = []
    for k in range(7):
        a = bulk(["Cu", "Ni"][k % 2], "fcc", a=3.6, cubic=k % 3 == 0)
        a.rattle(0.05, seed=k)
        a.info["task"] = "omat"
        a.info["die"] = k == 3
        structures.append(a)
    return folder, model_path, structures


def test_killed_worker_retried_every_result_once(local_ray, inputs):
    folder, model_path, structures = inputs
    out = folder / "run.jsonl"
    marker = folder / "died"
    report = cluster.run_sharded(
        structures,
        out,
        model=model_path,
        dtype="float64",
        work=die_once,
        work_kwargs={"marker": str(marker), "batch_size": 2},
        shard_size=2,
        num_workers=2,
    )
    assert marker.exists()  # a worker did die
    assert (report.shards, report.skipped, report.ran) == (4, 0, 4)
    assert report.retried == 1
    results = cluster.read_results(out)
    assert [r["index"] for r in results] == list(range(len(structures)))
    expected = uma_eqx.predict(uma_eqx.load(model_path, dtype=np.float64), structures, batch_size=2, progress=False)
    for got, want in zip(results, expected):
        assert got["natoms"] == want["natoms"]
        assert abs(got["energy"] - want["energy"]) <= RTOL * max(abs(want["energy"]), 1.0)
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=0, atol=RTOL * np.max(np.abs(want["forces"])))
    shard_files = sorted(p.name for p in (folder / "run.jsonl.shards").glob("*.json"))
    assert shard_files == ["000000.json", "000001.json", "000002.json", "000003.json", "manifest.json"]

    # a restarted driver: finished shards are skipped, nothing runs twice (no worker would be needed)
    again = cluster.run_sharded(structures, out, model=model_path, dtype="float64", work=die_once, shard_size=2)
    assert (again.skipped, again.ran, again.retried) == (4, 0, 0)
    assert [r["energy"] for r in cluster.read_results(out)] == [r["energy"] for r in results]

    # after a driver crash between shards: only the missing shard runs
    # (rerun with a cheap work function: its results show which shard ran again)
    (folder / "run.jsonl.shards" / "000002.json").unlink()
    partial = cluster.run_sharded(structures, out, model=model_path, work=pair_count, shard_size=2)
    assert (partial.skipped, partial.ran, partial.retried) == (3, 1, 0)
    merged = cluster.read_results(out)
    assert [r["index"] for r in merged] == list(range(7))
    pairs = [len(a) * (len(a) - 1) / 2 for a in structures]
    assert [r["energy"] for r in merged[4:6]] == pairs[4:6]  # shard 2 = structures 4, 5
    assert [r["energy"] for r in merged[:4] + merged[6:]] == [r["energy"] for r in results[:4] + results[6:]]

    # the same output path with other input is refused
    with pytest.raises(ValueError, match="belongs to another run"):
        cluster.run_sharded(structures[:5], out, model=model_path, work="predict", shard_size=2)


def test_extxyz_output_and_bad_arguments(local_ray, inputs, tmp_path):
    from ase.io import read

    folder, model_path, structures = inputs
    out = tmp_path / "run.extxyz"
    report = cluster.run_sharded(structures[:3], out, model=model_path, work=pair_count, shard_size=2)
    assert (report.shards, report.ran, report.retried) == (2, 2, 0)
    frames = read(out, ":")
    assert [f.info["index"] for f in frames] == [0, 1, 2]
    for frame, original in zip(frames, structures):
        np.testing.assert_allclose(frame.positions, original.positions, atol=1e-6)
        assert frame.get_potential_energy() == len(original) * (len(original) - 1) / 2
        np.testing.assert_array_equal(frame.get_forces(), 0.0)
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        cluster.run_sharded(structures, tmp_path / "x.jsonl", shard_size=0)
    with pytest.raises(ValueError, match="must end in one of"):
        cluster.run_sharded(structures, tmp_path / "x.csv")
    with pytest.raises(ValueError, match="work='anneal' is not one of"):
        cluster.run_sharded(structures, tmp_path / "x.jsonl", work="anneal")
