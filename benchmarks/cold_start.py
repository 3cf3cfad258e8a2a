"""Time to first result of a fresh process: uma_eqx (cold and warm compilation cache) vs fairchem.

    python benchmarks/cold_start.py                  # built-in model and full-size uma-s-1p1 weights
    python benchmarks/cold_start.py --models builtin # the built-in model only (no fairchem column)
    python benchmarks/cold_start.py --rounds 3       # medians of 3 processes per cell

Each measurement is one new Python process (`python -c`-like: this file with `--worker`) that
imports the package, loads the model, builds a calculator and computes energy and forces of a
rattled 64-atom fcc Cu crystal (`uma_eqx._bench.cu_fcc(64)`, task `omat`), once. The table
shows the process's wall time from spawn to exit (what a short screening job waits for) and
its parts: import, load, first energy+forces call.

- uma_eqx **cold**: a new, empty compilation-cache directory (`uma_eqx.enable_compilation_cache`)
  so every program is compiled; **warm**: the next process on the same directory.
- fairchem **cold** / **warm**: the first and the second fairchem process (fairchem runs eagerly
  and keeps no compilation cache; the second process finds the files in the OS page cache, like
  uma_eqx's warm one).

Workers are pinned to `--threads` CPUs exactly as in `compare_fairchem.py` (whose weights,
`benchmarks/.cache/uma_s_1p1_full.{pt,eqx}`, it reuses or builds). Rounds alternate
implementations, so slow drifts of a shared machine hit both alike.

Measured 2026-12-03 (commit 04abfae; AMD EPYC, 2 threads, machine otherwise idle;
`--rounds 2`, medians, wall seconds = import + load + first E+F of the process):

| model (64 atoms, E+F) | uma_eqx cold cache | uma_eqx warm cache | fairchem cold | fairchem warm |
|---|---|---|---|---|
| built-in | 17.2 s (2.3 + 0.3 + 13.7) | 7.3 s (1.9 + 0.2 + 4.6) | — | — |
| uma-s-1p1 size (random weights) | 20.6 s (1.4 + 0.9 + 17.4) | 9.3 s (1.4 + 0.7 + 6.3) | 16.4 s (7.1 + 4.0 + 2.4) | 14.3 s (5.4 + 3.9 + 2.5) |

Measured 2026-12-02 (commit b68390b plus the calculator's host check; x86_64, 2 threads, a
machine shared with other jobs, so absolute times are noisy; `--rounds 2`, medians):

| model (64 atoms, E+F) | uma_eqx cold cache | uma_eqx warm cache | fairchem cold | fairchem warm |
|---|---|---|---|---|
| built-in | 20.6 s (1.7 + 0.2 + 17.8) | 7.4 s (1.9 + 0.2 + 4.6) | — | — |
| uma-s-1p1 size (random weights) | 26.8 s (1.6 + 1.4 + 23.0) | 11.6 s (1.6 + 1.0 + 8.2) | 26.4 s (6.2 + 6.0 + 11.2) | 26.7 s (6.3 + 6.2 + 11.7) |

Before (same day, same harness, heavier load): uma-s-1p1 size 66.3 s cold and 75.8 s warm
against fairchem's 69.8 s and 44.5 s. A warm cache did not help at all: the model's program
carried `eqx.error_if`'s host callback, which JAX never writes to the on-disk cache, and a
first call also compiled ~80 small programs (eager `jnp` ops while reading weights, building
and padding the graph, and indexing results; each one per shape, so a stream of sizes paid
them again and again). Now a first call compiles two programs (the experts merge and the
model) and a warm process loads both; what remains of the warm first call is mostly JAX
tracing the model in Python (halved for merged models on 2026-12-03: their blocks run as one
`lax.scan`, `ExecutionSettings.scan_blocks`).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_fairchem as cf  # noqa: E402  (sibling driver: weights, worker pinning)

#: Atoms in the measured structure (issue 19 item 6: "first E+F call at 64 atoms").
NUM_ATOMS = 64
TASK = cf.TASK


# ========================================================================================
# workers (each runs in its own process; the parent times the whole process)
# ========================================================================================


def worker_eqx(job: dict) -> dict:
    t0 = time.perf_counter()
    import uma_eqx
    from uma_eqx import _bench
    from uma_eqx.calculator import UMACalculator

    uma_eqx.enable_compilation_cache(job["cache_dir"])
    t1 = time.perf_counter()
    model = uma_eqx.default_model() if job["eqx"] is None else uma_eqx.load(job["eqx"])
    t2 = time.perf_counter()
    atoms = _bench.cu_fcc(NUM_ATOMS)
    atoms.calc = UMACalculator(model, task_name=TASK)
    energy = atoms.get_potential_energy()
    atoms.get_forces()
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "energy": energy}


def worker_fairchem(job: dict) -> dict:
    t0 = time.perf_counter()
    _bench = cf._bench_without_jax()
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    unit = cf._fairchem_unit({"pt": job["pt"], "threads": job["threads"], "merged": True})
    t2 = time.perf_counter()
    atoms = _bench.cu_fcc(NUM_ATOMS)
    atoms.calc = FAIRChemCalculator(unit, task_name=TASK)
    energy = atoms.get_potential_energy()
    atoms.get_forces()
    t3 = time.perf_counter()
    # `_fairchem_unit` imports torch and fairchem's model code: count that as import, not load
    return {"import_s": import_s, "load_s": t2 - t1, "first_s": t3 - t2, "energy": energy}


WORKERS = {"eqx": worker_eqx, "fairchem": worker_fairchem}


# ========================================================================================
# driver
# ========================================================================================


def _cell(rows: list[dict]) -> str:
    if not rows:
        return "—"
    if any("error" in r for r in rows):
        return "failed"
    wall = statistics.median(r["wall_s"] for r in rows)
    parts = [statistics.median(r[k] for r in rows) for k in ("import_s", "load_s", "first_s")]
    return f"{wall:.1f} s ({parts[0]:.1f} + {parts[1]:.1f} + {parts[2]:.1f})"


def table(results: dict) -> str:
    """Markdown table: one row per model, wall seconds (import + load + first E+F) per column."""
    lines = [
        f"| model ({NUM_ATOMS} atoms, E+F) | uma_eqx cold cache | uma_eqx warm cache | fairchem cold | fairchem warm |",
        "|---|---|---|---|---|",
    ]
    for model, cells in results.items():
        row = [_cell(cells.get(k, [])) for k in ("eqx_cold", "eqx_warm", "fairchem_cold", "fairchem_warm")]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def measure(kind: str, job: dict, args, label: str) -> dict:
    payload, error, wall = cf.run_worker(kind, job, args, label, script=Path(__file__))
    if error:
        return {"error": error, "wall_s": wall}
    return dict(payload, wall_s=wall)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="builtin,full", help="comma separated: builtin, full")
    p.add_argument("--rounds", type=int, default=1, help="processes per cell (medians are shown)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every worker")
    p.add_argument("--no-fairchem", action="store_true", help="uma_eqx only")
    p.add_argument("--mem-limit-gib", type=float, default=16.0, help="kill a worker whose RSS exceeds this")
    p.add_argument("--job-timeout", type=float, default=900.0, help="kill a worker after this many seconds")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    cf.add_worker_args(p, WORKERS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        cf._emit(args.result, WORKERS[args.worker](json.loads(args.job)))
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - {"builtin", "full"}
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from builtin, full")
    fairchem = cf.have_fairchem() and not args.no_fairchem
    weights = cf.prepare_weights(args, fairchem) if "full" in models else {}
    results: dict[str, dict[str, list]] = {}
    for _ in range(args.rounds):
        for model in models:
            cells = results.setdefault("built-in" if model == "builtin" else "uma-s-1p1 size (random weights)", {})
            eqx = None if model == "builtin" else weights["eqx"]
            with tempfile.TemporaryDirectory(prefix="uma_eqx_cold_") as cache:
                job = {"eqx": eqx, "cache_dir": cache}
                cells.setdefault("eqx_cold", []).append(measure("eqx", job, args, f"uma_eqx {model} cold"))
                cells.setdefault("eqx_warm", []).append(measure("eqx", job, args, f"uma_eqx {model} warm"))
            if model == "full" and fairchem:
                job = {"pt": weights["pt"], "threads": args.threads}
                for cell in ("fairchem_cold", "fairchem_warm"):
                    cells.setdefault(cell, []).append(measure("fairchem", job, args, f"fairchem {model} {cell[9:]}"))
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
