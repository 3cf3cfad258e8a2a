"""uma_eqx vs fairchem-core on the same full-size uma-s-1p1 weights, one process per measurement.

    python benchmarks/compare_fairchem.py            # full run (tens of minutes on 2 cores)
    python benchmarks/compare_fairchem.py --quick    # 64 atoms, 2 repeats: checks the harness
    python benchmarks/compare_fairchem.py --docs     # also copies plots and results.json to docs/assets (the page is hand-written)

The driver (this process never imports jax or torch) prepares the weights once, then starts a
fresh worker process (this file with `--worker ...`) for every (implementation, variant, size):
so compile caches, allocator pools and peak RSS never leak from one measurement into the next.
Each worker is pinned to `--threads` CPUs (`os.sched_setaffinity`; XLA and torch size their
thread pools from the affinity mask) with `OMP/MKL/OPENBLAS_NUM_THREADS=--threads`, and the
fairchem worker also calls `torch.set_num_threads(--threads)` (`InferenceSettings.torch_num_threads`).
The driver polls each worker's RSS and kills it above `--mem-limit-gib`.

Weights: a full-size uma-s-1p1 architecture (sphere/hidden/edge 128, lmax 2, mmax 2, 4 layers,
64 distance basis functions, 32 experts, cutoff 6 Å, max_neighbors 300) with random weights,
written in fairchem's inference-checkpoint format by `tests/fixtures/make_fixtures.py`
(`benchmarks/.cache/uma_s_1p1_full.pt`), converted once with `uma_eqx.load_fairchem_checkpoint`
to `benchmarks/.cache/uma_s_1p1_full.eqx`. Without fairchem-core installed (or with
`--no-fairchem`), everything fairchem-side is skipped and uma_eqx runs that converted model if an
earlier run left it in the cache, else a randomly initialised model of the same size.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
FULL_PT = "uma_s_1p1_full.pt"
FULL_EQX = "uma_s_1p1_full.eqx"
RANDOM_EQX = "uma_s_1p1_full_random_init.eqx"  # uma_eqx-only mode (no fairchem)
TASK = "omat"
DOCS_ASSETS = "assets/performance"

# Full size of the published uma-s-1p1 (shared/reference notes; fairchem's uma_sm_1p1 config).
FULL_SIZE = dict(channels=128, lmax=2, mmax=2, num_layers=4, num_experts=32, num_distance_basis=64)
FULL_CONFIG = {
    "sphere_channels": 128, "hidden_channels": 128, "edge_channels": 128, "lmax": 2, "mmax": 2,
    "num_layers": 4, "num_distance_basis": 64, "cutoff": 6.0,
    "datasets": ["oc20", "odac", "omat", "omc", "omol"],
    "dataset_embedding_names": ["oc20", "odac", "omat", "omc", "omol"],
    "num_experts": 32, "use_composition_embedding": True, "head_dataset_experts": [0, 1, 2, 3, 4],
    "num_head_experts": 5, "charge_spin_embedding_trainable": True, "dataset_embedding_trainable": True,
    "model_id": "UMA-1.1", "model_version": 1.1,
}  # fmt: skip


def have_fairchem() -> bool:
    return importlib.util.find_spec("fairchem") is not None and importlib.util.find_spec("fairchem.core") is not None


# ========================================================================================
# workers (each runs in its own process)
# ========================================================================================


def _emit(result_path: str, payload) -> None:
    Path(result_path).write_text(json.dumps(payload))


def worker_build(job: dict) -> dict:
    """Write a random-weight checkpoint in fairchem's format (`job["size"]`: `FULL_SIZE`-like keys; default full size)."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import make_fixtures as mf

    t0 = time.perf_counter()
    size = dict(job.get("size") or FULL_SIZE)
    cfg = mf.config_uma_s_1p1(size.pop("channels"), size.pop("lmax"), size.pop("mmax"), **size)
    mf.write_checkpoint(Path(job["pt"]), cfg, mf.uma_tasks(mf.DS_1P1, seed=100), 11)
    return {"build_s": time.perf_counter() - t0}


def worker_convert(job: dict) -> dict:
    import uma_eqx

    t0 = time.perf_counter()
    model = uma_eqx.load_fairchem_checkpoint(job["pt"])
    convert_s = time.perf_counter() - t0
    uma_eqx.save(job["eqx"], model)
    return {"convert_s": convert_s, "save_s": time.perf_counter() - t0 - convert_s}


def worker_random_init(job: dict) -> dict:
    import jax

    import uma_eqx

    model = uma_eqx.UMA(uma_eqx.UMAConfig.from_json(json.dumps(FULL_CONFIG)), key=jax.random.key(0))
    uma_eqx.save(job["eqx"], model)
    return {}


def worker_peak(job: dict) -> dict:
    import time as _t

    import numpy as np

    from uma_eqx._bench import matmul_peak_flops

    n = job.get("n", 2048)
    x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    x @ x
    best = math.inf
    for _ in range(5):
        t0 = _t.perf_counter()
        x @ x
        best = min(best, _t.perf_counter() - t0)
    return {"jax_matmul_flops": matmul_peak_flops(n), "numpy_matmul_flops": 2.0 * n**3 / best, "n": n}


def worker_eqx(job: dict) -> list[dict]:
    import uma_eqx
    from uma_eqx import _bench

    model = uma_eqx.load(job["eqx"])
    after_load = _bench.peak_rss_mib()
    if job["mode"] == "batch":
        systems = _bench.mixed_systems(job["batch"], job["batch_atoms"])
        rows = [
            _bench.benchmark_uma_eqx_batch(model, systems, repeats=job["repeats"], task_name=TASK, warmup=job["warmup"])
        ]
    else:
        rows = _bench.benchmark_uma_eqx(
            model,
            [job["atoms"]],
            merged=job["merged"],
            repeats=job["repeats"],
            task_name=TASK,
            mode=job["mode"],
            stress=job["stress"],
            warmup=job["warmup"],
        )
    for r in rows:
        r["rss_after_load_mib"] = after_load
    return rows


def _bench_without_jax():
    """`uma_eqx/_bench.py` loaded from its file without importing the `uma_eqx` package (so no jax).

    Its structure and timing helpers need only numpy and ase; importing jax would add ~120 MiB
    to the fairchem worker's peak RSS.
    """
    import importlib.util

    spec = importlib.util.find_spec("uma_eqx")  # locates the package without executing it
    path = Path(next(iter(spec.submodule_search_locations))) / "_bench.py"
    bench_spec = importlib.util.spec_from_file_location("_uma_eqx_bench_standalone", path)
    module = importlib.util.module_from_spec(bench_spec)
    bench_spec.loader.exec_module(module)
    return module


def _fairchem_unit(job: dict):
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    from fairchem.core.units.mlip_unit import load_predict_unit
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

    torch.set_num_threads(job["threads"])
    settings = InferenceSettings(
        tf32=False,
        activation_checkpointing=job.get("checkpointing", False),
        merge_mole=job["merged"],
        compile=job.get("compile", False),
        external_graph_gen=False,
        internal_graph_gen_version=2,
        torch_num_threads=job["threads"],
        base_precision_dtype=torch.float32,
    )
    return load_predict_unit(job["pt"], inference_settings=settings, device="cpu")


def worker_fairchem(job: dict) -> list[dict]:
    import statistics

    import torch

    _bench = _bench_without_jax()
    unit = _fairchem_unit(job)
    after_load = _bench.peak_rss_mib()
    variant = ("calculator " if job["mode"] == "calculator" else "") + ("merged" if job["merged"] else "unmerged")
    if job.get("compile"):
        variant += " compiled"
    if job.get("checkpointing"):
        variant += " checkpointed"

    if job["mode"] == "batch":
        from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch

        systems = _bench.mixed_systems(job["batch"], job["batch_atoms"])
        data = []
        for atoms in systems:
            atoms.info.update(charge=0, spin=0)
            data.append(
                AtomicData.from_ase(
                    atoms, task_name=TASK, r_edges=False, r_data_keys=["spin", "charge"],
                    max_neigh=None, radius=6.0, target_dtype=torch.float32,
                )
            )  # fmt: skip
        batch = atomicdata_list_to_batch(data)

        def call(step):
            pred = unit.predict(batch)
            return [float(e) for e in pred["energy"].detach().numpy()]

        variant = f"batch of {len(systems)} unmerged"
        atoms_total, edges = sum(len(s) for s in systems), None
    else:
        from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

        calc = FAIRChemCalculator(unit, task_name=TASK)
        base = _bench.cu_fcc(job["atoms"])
        atoms_total, edges = job["atoms"], None

        def call(step):
            atoms = _bench.rattled(base, step)
            atoms.calc = calc
            energy = atoms.get_potential_energy()
            atoms.get_forces()
            atoms.get_stress()  # computed in the same call anyway (fairchem always regresses it)
            return energy

    compile_s, times, energy, last_step, _ = _bench._time_calls(call, 0, job["warmup"], job["repeats"])
    return [
        {
            "impl": "fairchem",
            "variant": variant,
            "mode": job["mode"],
            "merged": job["merged"],
            "stress": True,
            "atoms": atoms_total,
            "edges": edges,
            "systems": job.get("batch", 1) if job["mode"] == "batch" else 1,
            "compile_s": compile_s,
            "jax_compile_s": None,
            "best_s": min(times),
            "median_s": statistics.median(times),
            "times_s": times,
            "repeats": job["repeats"],
            "energy": energy,
            "last_step": None if job["mode"] == "batch" else last_step,
            "flops": None,
            "peak_rss_mib": _bench.peak_rss_mib(),
            "rss_after_load_mib": after_load,
        }
    ]


WORKERS = {
    "build": worker_build,
    "convert": worker_convert,
    "random_init": worker_random_init,
    "peak": worker_peak,
    "eqx": worker_eqx,
    "fairchem": worker_fairchem,
}


# ========================================================================================
# driver
# ========================================================================================


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_worker(kind: str, job: dict, args, label: str, script: Path | None = None) -> tuple[object, str | None, float]:
    """Run one worker process; returns (payload, error, wall seconds).

    `script`: the file run as `script --worker kind --job ... --result ...` (default this one;
    `benchmarks/md_speed.py` passes itself to run its own workers with these pinning rules).
    """
    fd, result = tempfile.mkstemp(prefix="uma_bench_", suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, JAX_PLATFORMS="cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cpus = sorted(os.sched_getaffinity(0))[: args.threads] if hasattr(os, "sched_getaffinity") else None

    def pin():
        os.setsid()
        if cpus:
            os.sched_setaffinity(0, cpus)

    cmd = [
        sys.executable,
        str(Path(script or __file__).resolve()),
        "--worker",
        kind,
        "--job",
        json.dumps(job),
        "--result",
        result,
    ]
    t0 = time.perf_counter()
    log = open(Path(result).with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
    error, peak_seen = None, 0.0
    limit_mib = args.mem_limit_gib * 1024
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        peak_seen = max(peak_seen, rss)
        if rss > limit_mib:
            error = f"killed: RSS over {args.mem_limit_gib:g} GiB"
        elif time.perf_counter() - t0 > args.job_timeout:
            error = f"killed: over {args.job_timeout:.0f} s"
        if error:
            os.killpg(proc.pid, 9)
            proc.wait()
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log.close()
    logtext = Path(result).with_suffix(".log").read_text()
    Path(result).with_suffix(".log").unlink()
    payload = None
    if error is None:
        if proc.returncode != 0:
            lines = logtext.strip().splitlines() or [""]
            # first line: the exception (last line of the log); then the log's tail for --verbose
            error = f"worker failed (exit {proc.returncode}): {lines[-1]}\n" + "\n".join(lines[-15:])
        else:
            payload = json.loads(Path(result).read_text())
    Path(result).unlink(missing_ok=True)
    status = "ok" if error is None else error.splitlines()[0] + (" ..." if "\n" in error else "")
    print(f"  [{wall:7.1f} s] {label}: {status}", flush=True)
    if error and args.verbose:
        print(error)
    return payload, error, wall


def prepare_weights(args, fairchem: bool) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    info = {}
    if fairchem:
        pt, eqx = CACHE / FULL_PT, CACHE / FULL_EQX
        if not pt.exists():
            print("building the full-size random-weight fairchem checkpoint ...")
            payload, error, _ = run_worker("build", {"pt": str(pt)}, args, "build checkpoint")
            if error:
                raise SystemExit(error)
            info.update(payload)
        if not eqx.exists() or eqx.stat().st_mtime < pt.stat().st_mtime:
            payload, error, _ = run_worker("convert", {"pt": str(pt), "eqx": str(eqx)}, args, "convert to .eqx")
            if error:
                raise SystemExit(error)
            info.update(payload)
            (CACHE / "convert.json").write_text(json.dumps(payload))
        elif (CACHE / "convert.json").exists():
            info.update(json.loads((CACHE / "convert.json").read_text()))
        info.update(pt=str(pt), eqx=str(eqx), pt_mib=pt.stat().st_size / 2**20, eqx_mib=eqx.stat().st_size / 2**20)
    elif (CACHE / FULL_EQX).exists():
        # uma_eqx only, on the converted fairchem weights of an earlier run: rows merged with
        # `--update` then share the weights of the fairchem rows (timings do not depend on them)
        eqx = CACHE / FULL_EQX
        info.update(pt=None, eqx=str(eqx), eqx_mib=eqx.stat().st_size / 2**20)
    else:
        eqx = CACHE / RANDOM_EQX
        if not eqx.exists():
            payload, error, _ = run_worker("random_init", {"eqx": str(eqx)}, args, "random-init uma_eqx model")
            if error:
                raise SystemExit(error)
        info.update(pt=None, eqx=str(eqx), eqx_mib=eqx.stat().st_size / 2**20)
    return info


def plan(args, fairchem: bool, weights: dict) -> list[tuple[str, dict, str]]:
    """(worker kind, job, label) for every measurement."""
    common = {"eqx": weights["eqx"], "pt": weights["pt"], "threads": args.threads, "warmup": args.warmup}
    jobs = []

    def eqx_job(atoms, mode, merged, stress=False, repeats=None, warmup=None):
        job = dict(common, atoms=atoms, mode=mode, merged=merged, stress=stress, repeats=repeats or args.repeats)
        if warmup is not None:
            job["warmup"] = warmup
        label = f"uma_eqx {mode} {'merged' if merged else 'unmerged'}{' +stress' if stress else ''} {atoms} atoms"
        jobs.append(("eqx", job, label))

    def fc_job(atoms, merged, compile_=False, repeats=None, warmup=None, checkpointing=False):
        if not fairchem:
            return
        job = dict(
            common, atoms=atoms, mode="calculator", merged=merged, compile=compile_, repeats=repeats or args.repeats,
            checkpointing=checkpointing,
        )  # fmt: skip
        if warmup is not None:
            job["warmup"] = warmup
        label = (
            f"fairchem calculator {'merged' if merged else 'unmerged'}{' compiled' if compile_ else ''}"
            f"{' checkpointed' if checkpointing else ''} {atoms} atoms"
        )
        jobs.append(("fairchem", job, label))

    for n in args.sizes:
        eqx_job(n, "calculator", True)
        fc_job(n, True)
        eqx_job(n, "calculator", False)
        fc_job(n, False)
        eqx_job(n, "raw", True)
        if args.compile:
            fc_job(n, True, compile_=True)
    eqx_job(args.stress_size, "raw", True, stress=True)
    if args.batch:
        batch = dict(
            common, mode="batch", merged=False, stress=False, repeats=args.repeats, batch=args.batch, batch_atoms=32
        )
        jobs.append(("eqx", batch, f"uma_eqx batch of {args.batch} x 32 atoms"))
        if fairchem:
            jobs.append(("fairchem", dict(batch), f"fairchem batch of {args.batch} x 32 atoms"))
    for n in args.big:
        # memory: fairchem in its memory-lean setting (activation checkpointing; without it fairchem
        # needs ~25 GB at 2048 atoms)
        eqx_job(n, "calculator", True, repeats=1, warmup=0)
        fc_job(n, True, repeats=1, warmup=0, checkpointing=True)
    return jobs


def find_max(args, fairchem: bool, weights: dict, start: int, results: list) -> None:
    """Double the size (merged calculator, one timed call; fairchem with activation checkpointing, its
    memory-lean setting) until a worker dies or passes the memory limit."""
    common = {"eqx": weights["eqx"], "pt": weights["pt"], "threads": args.threads, "warmup": 0, "repeats": 1}
    impls = [("eqx", "uma_eqx")] + ([("fairchem", "fairchem")] if fairchem else [])
    for kind, name in impls:
        n = start
        while True:
            n *= 2
            job = dict(common, atoms=n, mode="calculator", merged=True, stress=False, checkpointing=kind == "fairchem")
            payload, error, wall = run_worker(kind, job, args, f"{name} calculator merged {n} atoms (find max)")
            if error:
                variant = "calculator merged" + (" checkpointed" if job["checkpointing"] else "")
                results.append({"impl": name, "variant": variant, "atoms": n, "error": error.splitlines()[0]})
                break
            for r in payload:
                r["kind"] = "find_max"
                r["wall_s"] = wall
            results.extend(payload)


# ----------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------

# (label, fairchem variant, uma_eqx variant, fairchem mode, uma_eqx mode)
PAIRS = [
    ("E+F, ASE calculator, merged MoLE", "calculator merged", "calculator merged"),
    ("E+F, ASE calculator, unmerged", "calculator unmerged", "calculator unmerged"),
    ("E+F, uma_eqx raw jit (prebuilt graph) vs fairchem calculator, merged", "calculator merged", "raw merged"),
    ("E+F+S, uma_eqx raw jit vs fairchem calculator, merged", "calculator merged", "raw merged +stress"),
    ("E+F, fairchem torch.compile vs uma_eqx calculator, merged", "calculator merged compiled", "calculator merged"),
    (
        "E+F, ASE calculator, merged; fairchem with activation checkpointing",
        "calculator merged checkpointed",
        "calculator merged",
    ),
    ("E+F, batch of 8 x 32 atoms (mixed compositions), unmerged", "batch of 8 unmerged", "batch of 8 unmerged"),
]


def _ok(rows):
    return [r for r in rows if not r.get("error")]


def _find(rows, impl, variant, atoms):
    for r in _ok(rows):
        if r["impl"] == impl and r["variant"] == variant and r["atoms"] == atoms:
            return r
    return None


def _t(s):
    if s is None:
        return "–"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def _energy_check(f: dict, e: dict) -> str:
    """Max |E_fairchem - E_uma_eqx| per atom of the last timed call, when both timed the same structures."""
    if f["mode"] != e["mode"] or f.get("last_step") != e.get("last_step"):
        return "–"
    fe, ee = f["energy"], e["energy"]
    fe, ee = (fe, ee) if isinstance(fe, list) else ([fe], [ee])
    return f"{max(abs(a - b) for a, b in zip(fe, ee)) / (f['atoms'] / f['systems']):.1e}"


def comparison_table(rows) -> str:
    head = (
        "| workload | atoms | fairchem best | uma_eqx best | speed-up (fairchem / uma_eqx) | fairchem median "
        "| uma_eqx median | first call fairchem / uma_eqx | peak RSS fairchem / uma_eqx (MiB) | max abs ΔE/atom (eV) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for label, fv, ev in PAIRS:
        sizes = sorted({r["atoms"] for r in _ok(rows) if r["impl"] == "uma_eqx" and r["variant"] == ev})
        for n in sizes:
            f, e = _find(rows, "fairchem", fv, n), _find(rows, "uma_eqx", ev, n)
            if f is None or e is None:
                continue
            lines.append(
                f"| {label} | {n} | {_t(f['best_s'])} | {_t(e['best_s'])} | **{f['best_s'] / e['best_s']:.2f}×** "
                f"| {_t(f['median_s'])} | {_t(e['median_s'])} | {_t(f['compile_s'])} / {_t(e['compile_s'])} "
                f"| {f['peak_rss_mib']:.0f} / {e['peak_rss_mib']:.0f} | {_energy_check(f, e)} |"
            )
    return "\n".join(lines)


def _attach_flops(rows) -> None:
    """fairchem rows get the FLOP count XLA reports for uma_eqx on the same model and structures.

    Batches: the uma_eqx row counts each system alone with merged experts (the per-system math
    that fairchem's MoLE also does), summed over the systems.
    """
    for r in _ok(rows):
        if r["impl"] != "fairchem" or r.get("flops"):
            continue
        if r["mode"] == "batch":
            ev = r["variant"]
        else:
            ev = "calculator merged" if r["merged"] else "calculator unmerged"
        e = _find(rows, "uma_eqx", ev, r["atoms"])
        if e is not None:
            r["flops"] = e.get("flops")
            r["edges"] = r.get("edges") or e.get("edges")


def _slope(xs, ys):
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return None if sxx == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def series(rows):
    """(impl, variant) -> rows sorted by atoms, for single-system calculator/raw variants."""
    out = {}
    for r in _ok(rows):
        if r["mode"] == "batch":
            continue
        out.setdefault((r["impl"], r["variant"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["atoms"]) for k, v in out.items()}


def scaling_table(rows) -> str:
    lines = [
        "| implementation | variant | sizes | time exponent | peak-RSS exponent | exponent of RSS growth over the loaded model |",
        "|---|---|---|---|---|---|",
    ]
    for (impl, variant), rs in series(rows).items():
        if len(rs) < 2:
            continue
        xs = [r["atoms"] for r in rs]
        t = _slope(xs, [r["best_s"] for r in rs])
        m = _slope(xs, [r["peak_rss_mib"] for r in rs])
        g = _slope(xs, [r["peak_rss_mib"] - r.get("rss_after_load_mib", 0.0) for r in rs])

        def fmt(v):
            return "–" if v is None else f"{v:.2f}"

        lines.append(f"| {impl} | {variant} | {xs[0]}–{xs[-1]} | {fmt(t)} | {fmt(m)} | {fmt(g)} |")
    return "\n".join(lines)


def plots(rows, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, fname in (
        ("best_s", "time per energy+forces call (s, best)", "time_vs_atoms.png"),
        ("peak_rss_mib", "peak RSS of the process (MiB)", "memory_vs_atoms.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for (impl, variant), rs in sorted(series(rows).items()):
            style = "-" if impl == "uma_eqx" else "--"
            marker = "o" if "merged" in variant and "unmerged" not in variant else "s"
            ax.plot([r["atoms"] for r in rs], [r[key] for r in rs], style, marker=marker, label=f"{impl}: {variant}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("atoms (fcc Cu, periodic)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = outdir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("uma_eqx", "jax", "jaxlib", "equinox", "numpy", "torch", "fairchem-core", "ase"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    git = {}
    try:

        def run(*a):
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout

        git = {
            "commit": run("rev-parse", "HEAD").strip(),
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no").strip()),
        }
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem,
        "platform": platform.platform(),
        "versions": versions,
        "git": git,
    }


def report_markdown(results: dict, img_prefix: str | None) -> str:
    rows = results["rows"]
    m = results["machine"]
    peak = results.get("peak") or {}
    w = results["weights"]
    from uma_eqx._bench import format_table

    lines = []
    add = lines.append
    add(f"Measured {results['date']} on **{m['cpu']}**, {results['args']['threads']} threads "
        f"(of {m['logical_cpus']} logical CPUs), {m['memory_gib']:.0f} GiB RAM, float32.")  # fmt: skip
    add("")
    git = m.get("git") or {}
    add("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + (f"; uma_eqx commit `{git['commit'][:10]}`" + (" with local changes" if git.get("dirty") else "") if git else "")
        + ".")  # fmt: skip
    add("")
    for u in results.get("updates", []):
        g = u.get("git") or {}
        add(f"Re-measured {u['date']} (`{u['command']}`" + (f", commit `{g['commit'][:10]}`" if g else "")
            + (" with local changes" if g.get("dirty") else "") + "): " + "; ".join(u["rows"]) + "."
            + (f" That run's matmul peak, used for these rows' \"% of matmul peak\": {u['peak'] / 1e9:.0f} GFLOP/s."
               if u.get("peak") else ""))  # fmt: skip
        add("")
    if peak:
        add(f"Matmul peak on these threads (float32, {peak['n']}×{peak['n']}): "
            f"{peak['jax_matmul_flops'] / 1e9:.0f} GFLOP/s (JAX), {peak['numpy_matmul_flops'] / 1e9:.0f} GFLOP/s (numpy).")  # fmt: skip
        add("")
    if w.get("pt"):
        add(f"Weights: full-size uma-s-1p1 architecture with random weights "
            f"({w['pt_mib']:.0f} MiB fairchem checkpoint, {w['eqx_mib']:.0f} MiB `.eqx`)"
            + (f"; conversion with `uma_eqx.load_fairchem_checkpoint` took {w['convert_s']:.1f} s." if w.get("convert_s") else "."))  # fmt: skip
    else:
        add("fairchem-core is not installed: uma_eqx only, randomly initialised full-size model.")
    add("")
    if results["fairchem"]:
        add("### Speed-up")
        add("")
        add("Ratios are fairchem time / uma_eqx time (above 1: uma_eqx is faster), best of the timed repeats. "
            "The last column compares the energies of the last timed call where both timed the same structures "
            "(a check that both ran the same model). Peak RSS includes loading the weights: fairchem's "
            "`load_predict_unit` reads the whole checkpoint (training and EMA weights), uma_eqx the `.eqx` file.")  # fmt: skip
        add("")
        rounds = results.get("args", {}).get("rounds", 1)
        if rounds > 1:
            add(f"Every measurement ran in {rounds} rounds (the whole list, in order, {rounds} times, each "
                "measurement in a new process), and the timed calls of all rounds are pooled, so slow drifts of "
                "the machine's speed hit both implementations alike.")  # fmt: skip
            add("")
        add(comparison_table(rows))
        add("")
    add("### All measurements")
    add("")
    fmt_peak = peak.get("jax_matmul_flops")
    add(format_table(rows, peak_flops=fmt_peak))
    add("")
    add("GFLOP/s: XLA's FLOP count of the jitted energy+forces(+stress) call on the unpadded graph "
        "(`cost_analysis()['flops']`), divided by the best time; single-system fairchem rows use the same count "
        "(same model, same structure). Batch rows (both implementations) count the sum over the systems of "
        "each system alone with merged experts: the model's math, without the batch's padding.")  # fmt: skip
    add("")
    scal = scaling_table(rows)
    if scal.count("\n") > 1:
        add("### Scaling (log-log slope, 64 atoms to the largest size)")
        add("")
        add(scal)
        add("")
    if img_prefix is not None:
        add(f"![time per call vs atoms]({img_prefix}/time_vs_atoms.png)")
        add("")
        add(f"![peak memory vs atoms]({img_prefix}/memory_vs_atoms.png)")
        add("")
    return "\n".join(lines)


def write_docs(results: dict, outdir: Path) -> Path:
    """Copy the plots and `results.json` to the docs' assets (the short page `docs/performance.md`
    is written by hand from them; the full report stays in `outdir/results.md`)."""
    assets = ROOT / "docs" / DOCS_ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("time_vs_atoms.png", "memory_vs_atoms.png"):
        if (outdir / name).exists():
            shutil.copyfile(outdir / name, assets / name)
    path = assets / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------------------


def add_worker_args(p: argparse.ArgumentParser, workers: dict) -> None:
    """`--verbose` and the hidden worker-protocol options shared by the benchmark drivers."""
    p.add_argument("--verbose", action="store_true", help="print worker logs on failure")
    p.add_argument("--worker", choices=sorted(workers), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def ints(s):
        return [int(x) for x in s.split(",") if x]

    p.add_argument("--sizes", type=ints, default=[64, 128, 256, 512], help="atoms per fcc Cu system (comma separated)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run the whole list of measurements this many times, alternating implementations, and pool the "
        "timed calls (slow drifts of a shared machine then hit both sides alike)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every worker")
    p.add_argument(
        "--stress-size", type=int, default=None, help="size of the E+F+S measurement (default 256 or the largest)"
    )
    p.add_argument("--batch", type=int, default=8, help="systems in the batched measurement (0: skip)")
    p.add_argument("--big", type=ints, default=[2048], help="sizes measured with one call each (memory); '' to skip")
    p.add_argument(
        "--find-max", action="store_true", help="double the size from the largest until over --mem-limit-gib"
    )
    p.add_argument("--mem-limit-gib", type=float, default=16.0, help="kill a worker whose RSS exceeds this")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="kill a worker after this many seconds")
    p.add_argument("--compile", action="store_true", help="also time fairchem with torch.compile (minutes per size)")
    p.add_argument("--no-fairchem", action="store_true", help="uma_eqx only, even if fairchem-core is installed")
    p.add_argument("--quick", action="store_true", help="harness check: --sizes 64 --repeats 2 --big '' ")
    p.add_argument(
        "--docs",
        action="store_true",
        help="copy the plots and results.json to docs/" + DOCS_ASSETS + " (docs/performance.md is written by hand)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="directory for results.json, results.md, plots")
    p.add_argument("--only", help="regular expression: run only the measurements whose label matches (see the log)")
    p.add_argument(
        "--update", type=Path,
        help="merge the new rows into this results.json (replacing rows of the same implementation, variant and "
        "size; the page lists the re-measured rows and their commit) instead of starting a new run",
    )  # fmt: skip
    p.add_argument("--from-json", type=Path, help="only re-render tables/plots/docs from a saved results.json")
    add_worker_args(p, WORKERS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.big = [64], 2, []
    if args.stress_size is None:
        args.stress_size = 256 if 256 in args.sizes else max(args.sizes)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _emit(args.result, WORKERS[args.worker](json.loads(args.job)))
        return 0

    if args.from_json:
        results = json.loads(args.from_json.read_text())
        _attach_flops(results["rows"])
        return write_outputs(results, args)

    fairchem = have_fairchem() and not args.no_fairchem
    if not fairchem:
        print("fairchem-core is not installed (or --no-fairchem): skipping every fairchem measurement; uma_eqx only.")
    t_start = time.time()
    weights = prepare_weights(args, fairchem)
    print(f"weights: {weights['eqx']}")
    peak, error, _ = run_worker("peak", {"n": 2048}, args, "matmul peak")
    results = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/compare_fairchem.py " + shlex.join(a for a in argv if a != "--docs") + " --docs"
        if "--docs" in argv
        else "python benchmarks/compare_fairchem.py " + shlex.join(argv),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "job", "result")
        },
        "machine": machine(),
        "fairchem": fairchem,
        "weights": weights,
        "peak": peak,
        "rows": [],
    }
    results["command"] = results["command"].strip()
    jobs = plan(args, fairchem, weights)
    if args.only:
        jobs = [job for job in jobs if re.search(args.only, job[2])]
    rounds_note = f", {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"{len(jobs)} measurements, one process each{rounds_note}:")
    rounds = []
    for k in range(args.rounds):
        rows = []
        for kind, job, label in jobs:
            payload, error, wall = run_worker(kind, job, args, label + (f" (round {k + 1})" if args.rounds > 1 else ""))
            if error:
                impl = "uma_eqx" if kind == "eqx" else "fairchem"
                error = error.splitlines()[0]
                rows.append({"impl": impl, "variant": label, "atoms": job.get("atoms"), "error": error, "job": label})
                continue
            for i, r in enumerate(payload):
                r["wall_s"] = wall
                r["job"] = label if len(payload) == 1 else f"{label} #{i}"
            rows.extend(payload)
        rounds.append(rows)
    results["rows"] = merge_rounds(rounds)
    if args.find_max:
        start = max([n for n in args.big + args.sizes])
        find_max(args, fairchem, weights, start, results["rows"])
    results["total_s"] = time.time() - t_start
    if args.update:
        results = merge_update(json.loads(args.update.read_text()), results)
    _attach_flops(results["rows"])
    return write_outputs(results, args)


def _median_or_none(values: list) -> float | None:
    """The median of `values`, or `None` when any is missing (e.g. rows from an older run)."""
    return None if any(v is None for v in values) else statistics.median(values)


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per measurement from `--rounds` repetitions of the whole job list.

    Every round runs each measurement in a new process, in the same order, so slow drifts of
    the machine's speed (other tenants, clocks) hit both implementations alike instead of
    whichever ran at a bad moment. Rows are matched by their job label (`job`). Timed calls
    of all rounds are pooled: `best_s` and `median_s` are over all of them; `compile_s` is the
    median first call (`jax_compile_s` the median JAX compile time in it), `peak_rss_mib` the
    largest; `times_s` keeps every call and `round_best_s` each round's best. A measurement
    that failed in any round is reported by its error.
    """
    if len(rounds) == 1:
        return rounds[0]
    merged: dict = {}
    for rows in rounds:
        for r in rows:
            merged.setdefault(r["job"], []).append(r)
    out = []
    for group in merged.values():
        failed = [r for r in group if "error" in r]
        if failed:
            out.append(failed[0])
            continue
        row = dict(group[0])  # energy and last_step: every round replays the same rattled steps
        times = [t for r in group for t in r["times_s"]]
        row.update(
            times_s=times,
            best_s=min(times),
            median_s=statistics.median(times),
            compile_s=statistics.median(r["compile_s"] for r in group),
            jax_compile_s=_median_or_none([r.get("jax_compile_s") for r in group]),
            peak_rss_mib=max(r["peak_rss_mib"] for r in group),
            round_best_s=[r["best_s"] for r in group],
            rounds=len(group),
            repeats=len(times),
        )
        if "wall_s" in row:
            row["wall_s"] = sum(r["wall_s"] for r in group)
        out.append(row)
    return out


def merge_update(base: dict, new: dict) -> dict:
    """`base` with `new`'s rows replacing those of the same (implementation, variant, atoms)."""
    key = lambda r: (r["impl"], r["variant"], r.get("atoms"))  # noqa: E731
    replaced = {key(r) for r in new["rows"]}
    rows = [r for r in base["rows"] if key(r) not in replaced]
    peak = (new.get("peak") or {}).get("jax_matmul_flops")  # this run's peak, for the rows' "% of peak"
    for r in new["rows"]:
        r["updated"] = new["date"]
        r["peak_flops"] = peak
    base = dict(base, rows=rows + new["rows"])
    base.setdefault("updates", []).append(
        {"date": new["date"], "command": new["command"], "git": new["machine"].get("git"),
         "rows": sorted(f"{i} {v} {n}" for i, v, n in replaced),
         "peak": peak}
    )  # fmt: skip
    return base


def write_outputs(results: dict, args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots(results["rows"], args.out)
    md = report_markdown(results, ".")
    (args.out / "results.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwritten: {args.out}/results.json, results.md, time_vs_atoms.png, memory_vs_atoms.png")
    if args.docs:
        print(f"written: {write_docs(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
