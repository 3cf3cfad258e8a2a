"""MD steps per second: uma_eqx on JAX-MD (`lax.scan`) vs uma_eqx and fairchem through ASE, same weights.

    python benchmarks/md_speed.py --quick                 # tiny harness check (64 atoms, few steps)
    python benchmarks/md_speed.py                         # small model at 64, 512, 2048 atoms
    python benchmarks/md_speed.py --full-size             # + full-size uma-s-1p1 at 64 atoms
    python benchmarks/md_speed.py --sizes 64,512 --steps 1000,200 --json out.json

For each size, three implementations run NVE velocity Verlet (1 fs, fcc Cu, 300 K
Maxwell-Boltzmann velocities with zero total momentum, same seed) on the **same weights**,
each in a fresh process pinned to `--threads` CPUs (the worker, pinning and memory/time-limit
machinery is `benchmarks/compare_fairchem.py`'s `run_worker`):

- `uma_eqx jax-md`: `uma_eqx.jax_md.energy_and_neighbor_fns` (MoLE experts merged for the
  composition) + `jax_md.simulate.nve`, driven by `uma_eqx.jax_md.run`: whole chunks of
  steps (energy, forces, Verlet update and the in-jit neighbour-list update) under one
  compiled `lax.scan`. "setup" is `energy_and_neighbor_fns` + `allocate` + `init` (the
  merge and jax-md's first force evaluation, outside jit); "compile" is the first chunk
  (tracing + XLA compile + its steps) less one steady chunk; steps/s is over the following
  chunks. Forces only (no stress).
- `uma_eqx ase`: `uma_eqx.calculator.UMACalculator(merge_experts=True)` +
  `ase.md.verlet.VelocityVerlet`: one jitted call per step, neighbour list on the host.
- `fairchem ase`: `FAIRChemCalculator(load_predict_unit(..., inference_settings=...))` +
  `VelocityVerlet`, with `make_fixtures.reference_settings(float32)` but `merge_mole=True`
  (uma_eqx's merged experts) and `torch_num_threads=--threads`.

Both ASE calculators compute energy, forces and stress every step (fairchem always regresses
the stress of this model; uma_eqx's calculator computes it in the same call). For the ASE rows
"compile" is the first force call (jit compile / lazy init and the MoLE merge), followed by
`--warmup` untimed steps; steps/s is over the timed `dyn.run(steps)`.

Weights: a small uma-s-1p1-shaped model with random weights (`--channels`, default 16;
2 layers, 4 experts, 16 distance basis functions, lmax/mmax 2, cutoff 6 Å) written by
`tests/fixtures/make_fixtures.py` in fairchem's checkpoint format into `benchmarks/.cache/`
and converted once with `uma_eqx.load_fairchem_checkpoint` -> `uma_eqx.save`; with
`--full-size`, also the full-size uma-s-1p1 random-weight checkpoint shared with
`compare_fairchem.py` (64 atoms, `--full-steps` steps: seconds per step on a CPU).
Each row also records total energy at the start and end of the run (an NVE sanity check).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_fairchem as cf  # noqa: E402  (found through the sys.path line above); numpy-free: no jax, no torch in the driver

TASK = cf.TASK
SMALL_LAYOUT = {"lmax": 2, "mmax": 2, "num_layers": 2, "num_experts": 4, "num_distance_basis": 16}
TEMPERATURE_K = 300.0
TIMESTEP_FS = 1.0
SEED = 0
IMPLS = ("uma_eqx jax-md", "uma_eqx ase", "fairchem ase")


def small_names(channels: int) -> tuple[str, str]:
    stem = f"uma_s_1p1_small_c{channels}"
    return stem + ".pt", stem + ".eqx"


# ========================================================================================
# workers (each runs in its own process)
# ========================================================================================


def _atoms(n: int):
    """fcc Cu of `n` atoms with seeded 300 K Maxwell-Boltzmann momenta, zero total momentum."""
    import numpy as np
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    bench = cf._bench_without_jax()
    atoms = bench.cu_fcc(n)
    thermalize_momenta(atoms, temperature_K=TEMPERATURE_K, rng=np.random.default_rng(SEED))
    Stationary(atoms)
    return atoms, bench


def _ase_md(atoms, calc, job) -> dict:
    """Time VelocityVerlet with `calc`: first force call, `warmup` steps, then `steps` timed steps."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms.calc = calc
    t0 = time.perf_counter()
    atoms.get_forces()
    compile_s = time.perf_counter() - t0
    e_start = float(atoms.get_total_energy())
    dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs, logfile=None)
    dyn.run(job["warmup"])
    t0 = time.perf_counter()
    dyn.run(job["steps"])
    elapsed = time.perf_counter() - t0
    return {
        "compile_s": compile_s,
        "timed_steps": job["steps"],
        "elapsed_s": elapsed,
        "steps_per_s": job["steps"] / elapsed,
        "etot_start": e_start,
        "etot_end": float(atoms.get_total_energy()),
        "temperature_end_K": float(atoms.get_temperature()),
    }


def worker_ase_eqx(job: dict) -> dict:
    import uma_eqx
    from uma_eqx.calculator import UMACalculator

    atoms, bench = _atoms(job["atoms"])
    model = uma_eqx.load(job["eqx"])
    row = _ase_md(atoms, UMACalculator(model, task_name=TASK, merge_experts=True), job)
    row["settings"] = {"merge_experts": True, "dtype": str(model.dtype)}
    row["peak_rss_mib"] = bench.peak_rss_mib()
    return row


def worker_ase_fairchem(job: dict) -> dict:
    import dataclasses

    sys.path.insert(0, str(cf.ROOT / "tests" / "fixtures"))
    import make_fixtures as mf  # quietens fairchem's load-time warnings too
    import torch
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit

    torch.set_num_threads(job["threads"])
    settings = dataclasses.replace(
        mf.reference_settings(torch.float32), merge_mole=True, torch_num_threads=job["threads"]
    )
    unit = load_predict_unit(job["pt"], inference_settings=settings, device="cpu")
    atoms, bench = _atoms(job["atoms"])
    row = _ase_md(atoms, FAIRChemCalculator(unit, task_name=TASK), job)
    row["settings"] = {
        k: (str(v) if not isinstance(v, (bool, int, float, str, type(None))) else v)
        for k, v in dataclasses.asdict(settings).items()
    }
    row["peak_rss_mib"] = bench.peak_rss_mib()
    return row


def worker_jaxmd(job: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from jax_md import quantity, simulate, space

    import uma_eqx
    from uma_eqx import jax_md as ujmd

    atoms, bench = _atoms(job["atoms"])
    model = uma_eqx.load(job["eqx"])
    dtype = model.dtype
    t_setup = time.perf_counter()
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(model, atoms, task_name=TASK)  # merges experts
    box = jnp.asarray(ujmd.box_from_atoms(atoms), dtype)
    _, shift_fn = space.periodic_general(box, fractional_coordinates=False)
    R = jnp.asarray(atoms.positions, dtype)
    nbrs = neighbor_fn.allocate(R)
    capacity0 = int(nbrs.capacity)
    init, apply = simulate.nve(energy_fn, shift_fn, TIMESTEP_FS * ujmd.FEMTOSECOND)
    mass = jnp.asarray(atoms.get_masses(), dtype)[:, None]
    momenta = jnp.asarray(atoms.get_momenta(), dtype)  # the same start as the ASE rows
    state = init(jax.random.PRNGKey(SEED), R, kT=TEMPERATURE_K * ujmd.BOLTZMANN, mass=mass, momenta=momenta,
                 neighbor=nbrs)  # fmt: skip
    setup_s = time.perf_counter() - t_setup

    total = jax.jit(lambda s, n: energy_fn(s.position, neighbor=n) + quantity.kinetic_energy(
        momentum=s.momentum, mass=s.mass))  # fmt: skip
    e_start = float(total(state, nbrs))

    chunk = job["chunk"]
    chunks = max(1, -(-job["steps"] // chunk))  # timed chunks (all of length `chunk`: one compile)
    stamps = []

    def on_chunk(done, s, outs):
        jax.block_until_ready(s.position)
        stamps.append((done, time.perf_counter()))

    t0 = time.perf_counter()
    state, nbrs, _ = ujmd.run(lambda s, n: apply(s, neighbor=n), state, nbrs, neighbor_fn, chunk * (1 + chunks),
                              steps_per_chunk=chunk, callback=on_chunk)  # fmt: skip
    first_chunk_s = stamps[0][1] - t0
    elapsed = stamps[-1][1] - stamps[0][1]
    timed = stamps[-1][0] - stamps[0][0]
    rate = timed / elapsed
    e_end = float(total(state, nbrs))
    ekin = float(quantity.kinetic_energy(momentum=state.momentum, mass=state.mass))
    return {
        "compile_s": first_chunk_s - chunk / rate,  # first chunk less one steady chunk
        "first_chunk_s": first_chunk_s,
        "setup_s": setup_s,
        "chunk": chunk,
        "timed_steps": timed,
        "elapsed_s": elapsed,
        "steps_per_s": rate,
        "chunk_s": [b[1] - a[1] for a, b in itertools.pairwise(stamps)],
        "etot_start": e_start,
        "etot_end": e_end,
        "temperature_end_K": 2.0 * ekin / (3.0 * len(atoms) * ujmd.BOLTZMANN),
        "neighbor_capacity": [capacity0, int(nbrs.capacity)],
        "settings": {"merge": True, "dtype": str(dtype), "stress": False},
        "peak_rss_mib": bench.peak_rss_mib(),
    }


WORKERS = {"jaxmd": worker_jaxmd, "ase_eqx": worker_ase_eqx, "ase_fairchem": worker_ase_fairchem}


# ========================================================================================
# driver
# ========================================================================================


def prepare_small(args) -> dict:
    pt_name, eqx_name = small_names(args.channels)
    pt, eqx = cf.CACHE / pt_name, cf.CACHE / eqx_name
    cf.CACHE.mkdir(parents=True, exist_ok=True)
    if not pt.exists():
        size = dict(SMALL_LAYOUT, channels=args.channels)
        _, error, _ = cf.run_worker("build", {"pt": str(pt), "size": size}, args, f"build small checkpoint ({pt_name})")
        if error:
            raise SystemExit(error)
    if not eqx.exists() or eqx.stat().st_mtime < pt.stat().st_mtime:
        _, error, _ = cf.run_worker("convert", {"pt": str(pt), "eqx": str(eqx)}, args, f"convert to {eqx_name}")
        if error:
            raise SystemExit(error)
    return {"pt": str(pt), "eqx": str(eqx), "channels": args.channels, **SMALL_LAYOUT}


def measure(args, weights: dict, model: str, n: int, steps: int, chunk: int, rows: list) -> None:
    common = {"pt": weights["pt"], "eqx": weights["eqx"], "atoms": n, "threads": args.threads}
    jobs = [
        ("uma_eqx jax-md", "jaxmd", dict(common, steps=steps, chunk=chunk)),
        ("uma_eqx ase", "ase_eqx", dict(common, steps=steps, warmup=args.warmup)),
        ("fairchem ase", "ase_fairchem", dict(common, steps=steps, warmup=args.warmup)),
    ]
    for impl, kind, job in jobs:
        if impl not in args.impls:
            continue
        payload, error, wall = cf.run_worker(kind, job, args, f"{model} {n} atoms {impl} ({steps} steps)",
                                             script=Path(__file__))  # fmt: skip
        row = {"model": model, "atoms": n, "impl": impl, "wall_s": wall}
        row.update({"error": error.splitlines()[0]} if error else payload)
        rows.append(row)


def table(rows) -> str:
    lines = [
        (
            "| model | atoms | implementation | setup (s) | compile (s) | steps/s | vs fairchem ase | timed steps "
            "| ΔEtot/atom (eV) | peak RSS (MiB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['atoms']} | {r['impl']} "
        if r.get("error"):
            lines.append(head + f"| – | – | – | – | – | – | {r['error']} |")
            continue
        ref = next((f for f in rows if f["impl"] == "fairchem ase" and f["model"] == r["model"]
                    and f["atoms"] == r["atoms"] and not f.get("error")), None)  # fmt: skip
        ratio = "–" if ref is None else f"{r['steps_per_s'] / ref['steps_per_s']:.2f}×"
        drift = (r["etot_end"] - r["etot_start"]) / r["atoms"]
        setup = f"{r['setup_s']:.1f}" if "setup_s" in r else "–"
        lines.append(
            head + f"| {setup} | {r['compile_s']:.1f} | {r['steps_per_s']:.3g} | {ratio} | {r['timed_steps']} "
            f"| {drift:+.1e} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def ints(s):
        return [int(x) for x in s.split(",") if x]

    p.add_argument("--sizes", type=ints, default=[64, 512, 2048], help="atoms per fcc Cu system (small model)")
    p.add_argument("--steps", type=ints, default=None,
                   help="timed steps per size (one value for all, or one per --sizes; default 1000,200,50)")  # fmt: skip
    p.add_argument("--chunk", type=int, default=100, help="JAX-MD steps per lax.scan chunk (capped at the steps)")
    p.add_argument("--warmup", type=int, default=5, help="untimed ASE steps after the first force call")
    p.add_argument("--channels", type=int, default=16, help="sphere/hidden/edge channels of the small model")
    p.add_argument("--full-size", action="store_true", help="add full-size uma-s-1p1 weights at 64 atoms")
    p.add_argument("--full-steps", type=int, default=5, help="timed steps of the full-size rows")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma separated subset of: " + ", ".join(IMPLS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every worker")
    p.add_argument("--mem-limit-gib", type=float, default=16.0, help="kill a worker whose RSS exceeds this")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="kill a worker after this many seconds")
    p.add_argument("--quick", action="store_true", help="harness check: --sizes 64 --steps 40 --chunk 20")
    p.add_argument("--json", type=Path, help="write the raw rows and settings here")
    cf.add_worker_args(p, WORKERS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.chunk, args.full_steps = [64], [40], 20, 2
    defaults = {64: 1000, 512: 200, 2048: 50}
    if args.steps is None:
        args.steps = [defaults.get(n, max(20, 64000 // n)) for n in args.sizes]
    elif len(args.steps) == 1:
        args.steps = args.steps * len(args.sizes)
    if len(args.steps) != len(args.sizes):
        p.error(f"--steps needs one value or one per size ({len(args.sizes)}), got {len(args.steps)}")
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if unknown := set(args.impls) - set(IMPLS):
        p.error(f"unknown --impls {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        cf._emit(args.result, WORKERS[args.worker](json.loads(args.job)))
        return 0
    if not cf.have_fairchem():
        raise SystemExit("needs fairchem-core (the `fixtures` extra): the weights are written in its format")
    t_start = time.time()
    rows = []
    small = prepare_small(args)
    print(f"small weights: {small['eqx']}")
    for n, steps in zip(args.sizes, args.steps):
        measure(args, small, f"small c{args.channels}", n, steps, min(args.chunk, steps), rows)
    full = None
    if args.full_size:
        full = cf.prepare_weights(args, True)
        measure(args, full, "uma-s-1p1 full size", 64, args.full_steps, args.full_steps, rows)
    md = table(rows)
    print()
    print(f"MD steps/s, NVE velocity Verlet, fcc Cu, {TIMESTEP_FS:g} fs, {args.threads} threads, float32 "
          "(ratio: steps/s over fairchem ase's)")  # fmt: skip
    print()
    print(md)
    if args.json:
        results = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/md_speed.py " + " ".join(argv),
            "args": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("worker", "job", "result")
            },
            "machine": cf.machine(),
            "weights": {"small": small, "full": full},
            "rows": rows,
            "table": md,
            "total_s": time.time() - t_start,
        }
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
