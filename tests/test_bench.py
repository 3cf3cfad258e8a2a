"""`uma_eqx._bench`: row structure, and the timed energies reproduce a direct call (no timing checks)."""

import pathlib

import numpy as np
import pytest

import uma_eqx
from uma_eqx import _bench

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

KEYS = {
    "impl", "variant", "mode", "merged", "stress", "atoms", "edges", "systems", "compile_s", "best_s",
    "median_s", "times_s", "repeats", "energy", "last_step", "flops", "peak_rss_mib", "jax_compile_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return uma_eqx.load(FIXTURES / "uma_s_1p1.eqx")


def _direct(model, atoms, merged):
    graph = _bench._graph(atoms, model, "omat", pad=False)
    if merged:
        model = _bench.merged_model(model, graph)
    return uma_eqx.energy_forces_stress(model, graph)


def test_structures_are_deterministic():
    for n in (4, 6, 32, 64):
        atoms = _bench.cu_fcc(n)
        assert len(atoms) == n and atoms.pbc.all()
        assert np.array_equal(atoms.positions, _bench.cu_fcc(n).positions)
    a, b = _bench.rattled(_bench.cu_fcc(8), 3), _bench.rattled(_bench.cu_fcc(8), 3)
    assert np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.positions, _bench.rattled(_bench.cu_fcc(8), 4).positions)
    systems = _bench.mixed_systems(8, 32)
    assert [len(s) for s in systems] == [32] * 8
    assert len({tuple(s.get_atomic_numbers()) for s in systems}) == 8


# one size per case and XLA's FLOP count in one case only: every size and the count compile anew
@pytest.mark.parametrize("mode,merged,sizes,flops", [("raw", True, [8], True), ("calculator", True, [8], False)])
def test_benchmark_rows(model, mode, merged, sizes, flops):
    rows = _bench.benchmark_uma_eqx(model, sizes, merged=merged, repeats=1, task_name="omat", mode=mode, flops=flops)
    assert [r["atoms"] for r in rows] == sizes
    for r in rows:
        assert KEYS <= set(r)
        assert r["impl"] == "uma_eqx" and r["mode"] == mode and r["merged"] is merged
        assert len(r["times_s"]) == 1 and r["best_s"] == r["median_s"] == r["times_s"][0] > 0
        assert (r["flops"] is not None and r["flops"] > 0) if flops else r["flops"] is None
        assert r["peak_rss_mib"] > 0 and r["edges"] > 0
        # the first call of each size compiles: JAX reports part of that call as compiling
        assert 0 < r["jax_compile_s"] < r["compile_s"]
        base = _bench.cu_fcc(r["atoms"])
        atoms = base if r["last_step"] is None else _bench.rattled(base, r["last_step"])
        assert (r["last_step"] is None) == (mode == "raw")
        # oracle: the unmerged model on the unpadded graph (merging changes only round-off)
        expected = float(_direct(model, atoms, merged=False)["energy"][0])
        np.testing.assert_allclose(r["energy"], expected, rtol=1e-5, atol=1e-5)
    table = _bench.format_table(rows, peak_flops=1e11)
    assert table.count("\n") == 1 + len(rows) and "| uma_eqx |" in table


def test_benchmark_batch(model):
    systems = _bench.mixed_systems(2, 4)
    row = _bench.benchmark_uma_eqx_batch(model, systems, repeats=1, task_name="omat", warmup=0, flops=False)
    assert KEYS <= set(row) and row["systems"] == 2 and row["atoms"] == 8
    graph = uma_eqx.AtomicGraph.from_atoms(systems, cutoff=6.0, datasets=model.config.datasets, task_name="omat")
    expected = uma_eqx.energy_forces_stress(model, graph)["energy"]
    np.testing.assert_allclose(row["energy"], np.asarray(expected), rtol=2e-6, atol=1e-5)


def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="mode"):
        _bench.benchmark_uma_eqx(model, [4], merged=False, repeats=1, mode="fast")
    with pytest.raises(ValueError, match="repeats"):
        _bench.benchmark_uma_eqx(model, [4], merged=False, repeats=0)


def test_harness_update_replaces_matching_rows():
    import copy
    import importlib.util
    import json
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location(
        "compare_fairchem_for_test", root / "benchmarks" / "compare_fairchem.py"
    )
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    base = json.loads((root / "docs" / "assets" / "performance" / "results.json").read_text())  # the published run
    row = copy.deepcopy(next(r for r in base["rows"] if r["impl"] == "uma_eqx" and not r.get("error")))
    row["best_s"] = 1e-3
    new = dict(copy.deepcopy(base), date="D", command="C", rows=[row])
    new["machine"]["git"] = {"commit": "abcdef0123", "dirty": False}
    merged = cf.merge_update(copy.deepcopy(base), new)
    same = [
        r
        for r in merged["rows"]
        if (r["impl"], r["variant"], r.get("atoms")) == (row["impl"], row["variant"], row["atoms"])
    ]
    assert len(merged["rows"]) == len(base["rows"]) and [r["best_s"] for r in same] == [1e-3]
    label = f"{row['impl']} {row['variant']} {row['atoms']}"
    assert merged["updates"][-1]["rows"] == [label]
    assert f"Re-measured D (`C`, commit `abcdef0123`): {label}." in cf.report_markdown(merged, None)


def test_harness_rounds_pool_the_timed_calls():
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location(
        "compare_fairchem_rounds", root / "benchmarks" / "compare_fairchem.py"
    )
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)

    def row(impl, times, compile_s, rss, jax_compile_s=None):
        return {"impl": impl, "variant": "calculator merged", "atoms": 64, "systems": 1, "times_s": times,
                "best_s": min(times), "median_s": sorted(times)[len(times) // 2], "compile_s": compile_s,
                "jax_compile_s": jax_compile_s, "peak_rss_mib": rss, "energy": -1.0, "wall_s": 10.0,
                "job": f"{impl} calculator merged 64 atoms"}  # fmt: skip

    rounds = [
        [row("uma_eqx", [1.5, 1.4], 9.0, 100.0, 6.0), row("fairchem", [2.0, 2.1], 2.0, 300.0)],
        [row("uma_eqx", [1.2, 1.3], 8.0, 120.0, 5.0),
         {"impl": "fairchem", "variant": "fairchem calculator merged 64 atoms",
          "atoms": 64, "error": "killed", "job": "fairchem calculator merged 64 atoms"}],
    ]  # fmt: skip
    merged = {r["impl"]: r for r in cf.merge_rounds(rounds)}
    uma = merged["uma_eqx"]
    assert uma["times_s"] == [1.5, 1.4, 1.2, 1.3] and uma["best_s"] == 1.2 and uma["median_s"] == 1.35
    assert uma["compile_s"] == 8.5 and uma["peak_rss_mib"] == 120.0 and uma["round_best_s"] == [1.4, 1.2]
    assert uma["jax_compile_s"] == 5.5
    assert uma["rounds"] == 2 and uma["repeats"] == 4 and uma["wall_s"] == 20.0
    assert merged["fairchem"]["error"] == "killed"  # a failure in any round is reported, not hidden
    assert cf.merge_rounds(rounds[:1]) == rounds[0]
