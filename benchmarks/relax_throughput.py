"""Structures per second relaxed with FIRE to fmax: batched uma_eqx against one-by-one ASE loops.

Same structures, same weights, same run, each method in its own process (pinned to `--threads`
cores, via `compare_fairchem.run_worker`):

- (a) `uma_eqx.relax_batch` (batched FIRE, slots refilled from the stream);
- (b) `UMACalculator` + ASE `FIRE`, one structure after another;
- (c) fairchem's `FAIRChemCalculator` + ASE `FIRE` (`--model full` only: fairchem needs its own
  checkpoint; the full-size random uma-s-1p1-shaped weights of `compare_fairchem.py`);
- (d) torch-sim: not run. torch-sim-atomistic >= 0.4 (the releases with fairchem-2/UMA support)
  requires Python >= 3.12; 0.3.0, the last for Python 3.11, imports fairchem-1 APIs
  (`fairchem.core.common.utils.load_config`) that fairchem-core 2.24 no longer has.

Structures: `--n` rattled (0.05 Å) and strained (2 %) fcc supercells of 8, 16, 32 and 64 atoms
of the built-in model's elements (Cu Ag Au Ni Pd Pt Al). Reports structures/s (wall time of
the whole loop, compilation included, since that is what a screening run pays), FIRE steps,
convergence, and the final-energy difference to (b) per atom.

    python benchmarks/relax_throughput.py --n 32                # built-in model, (a) and (b)
    python benchmarks/relax_throughput.py --n 8 --model full    # full-size random weights, (a) (b) (c)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_fairchem as cf  # noqa: E402

#: Supercell repeats of the 4-atom conventional fcc cell: 8, 16, 32 and 64 atoms.
REPEATS = ((2, 1, 1), (2, 2, 1), (2, 2, 2), (4, 2, 2))
#: Elements of the built-in model and their fcc lattice constants (Å; ASE's reference data).
ELEMENTS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
RATTLE, STRAIN = 0.05, 0.02


def structures(n: int, seed: int):
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk(ELEMENTS[k % len(ELEMENTS)], "fcc", cubic=True).repeat(REPEATS[k % len(REPEATS)])
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + STRAIN * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.rattle(RATTLE, seed=seed + k)
        out.append(atoms)
    return out


def _model(job):
    import uma_eqx

    return uma_eqx.default_model() if job["eqx"] is None else uma_eqx.load(job["eqx"])


def _task(job):
    return "omat"


def _ase_loop(atoms_list, make_calc, job) -> dict:
    from ase.optimize import FIRE

    energies, steps, converged = [], [], []
    t0 = time.perf_counter()
    calc = make_calc()
    for atoms in atoms_list:
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)  # pyright: ignore[reportArgumentType]
        converged.append(bool(opt.run(fmax=job["fmax"], steps=job["max_steps"])))
        energies.append(float(atoms.get_potential_energy()))
        steps.append(int(opt.nsteps))
    return {"wall_s": time.perf_counter() - t0, "energy": energies, "steps": steps, "converged": converged}


def worker_batch(job: dict) -> dict:
    import uma_eqx

    model = _model(job)
    atoms_list = structures(job["n"], job["seed"])
    t0 = time.perf_counter()
    results = uma_eqx.relax_batch(
        model, atoms_list, _task(job), fmax=job["fmax"], max_steps=job["max_steps"], batch_size=job["batch_size"]
    )
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "energy": [r.get("energy") for r in results],
        "steps": [r["steps"] for r in results],
        "converged": [r["converged"] for r in results],
    }


def worker_calculator(job: dict) -> dict:
    from uma_eqx.calculator import UMACalculator

    model = _model(job)
    return _ase_loop(structures(job["n"], job["seed"]), lambda: UMACalculator(model, task_name=_task(job)), job)


def worker_fairchem(job: dict) -> dict:
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

    unit = cf._fairchem_unit({"pt": job["pt"], "threads": job["threads"], "merged": True})
    atoms_list = structures(job["n"], job["seed"])
    for atoms in atoms_list:
        atoms.info.update(charge=0, spin=0)
    return _ase_loop(atoms_list, lambda: FAIRChemCalculator(unit, task_name=_task(job)), job)


WORKERS = {"batch": worker_batch, "calculator": worker_calculator, "fairchem": worker_fairchem}
LABELS = {
    "batch": "(a) uma_eqx relax_batch",
    "calculator": "(b) UMACalculator + ASE FIRE",
    "fairchem": "(c) fairchem + ASE FIRE",
}


def table(rows: dict, n: int) -> str:
    ref = rows.get("calculator")
    lines = [
        "| method | structures/s | wall (s) | FIRE steps (mean) | converged | max abs dE vs (b) (eV/atom) |",
        "|---|---|---|---|---|---|",
    ]
    sizes = [4 * int(np.prod(REPEATS[k % len(REPEATS)])) for k in range(n)]
    for kind, label in LABELS.items():
        r = rows.get(kind)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'].splitlines()[0]} | | | | |")
            continue
        de = "—"
        if ref is not None and "error" not in ref and kind != "calculator":
            diffs = [abs(a - b) / m for a, b, m in zip(r["energy"], ref["energy"], sizes) if a is not None]
            de = f"{max(diffs):.1e}" if diffs else "—"
        lines.append(
            f"| {label} | {n / r['wall_s']:.3g} | {r['wall_s']:.1f} | {np.mean(r['steps']):.1f} | "
            f"{sum(r['converged'])}/{n} | {de} |"
        )
    lines.append("| (d) torch-sim + fairchem | not run: no torch-sim release installs with fairchem-core 2.24 on "
                 "Python 3.11 (see the module docstring) | | | | |")  # fmt: skip
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="number of structures")
    p.add_argument("--model", choices=["builtin", "full"], default="builtin")
    p.add_argument("--methods", default=None, help="comma list of batch,calculator,fairchem (default: all that apply)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mem-limit-gib", type=float, default=20.0)
    p.add_argument("--job-timeout", type=float, default=7200.0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", default=None, help="write the rows and the table as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        cf._emit(args.result, WORKERS[args.worker](json.loads(args.job)))
        return
    fairchem = args.model == "full" and cf.have_fairchem()
    weights = cf.prepare_weights(args, fairchem) if args.model == "full" else {"eqx": None, "pt": None}
    methods = args.methods.split(",") if args.methods else ["batch", "calculator"] + (["fairchem"] if fairchem else [])
    job = {
        "n": args.n, "seed": args.seed, "fmax": args.fmax, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "threads": args.threads, "eqx": weights["eqx"], "pt": weights["pt"],
    }  # fmt: skip
    rows = {}
    for kind in methods:
        payload, error, _ = cf.run_worker(kind, job, args, LABELS[kind], script=Path(__file__))
        rows[kind] = payload if error is None else {"error": error}
    text = table(rows, args.n)
    machine = cf.machine()
    print(f"\n{args.n} structures, model {args.model}, fmax {args.fmax}, max_steps {args.max_steps}, "
          f"batch_size {args.batch_size}, {args.threads} threads; {machine.get('cpu', '')}")  # fmt: skip
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "table": text, "machine": machine}))


if __name__ == "__main__":
    main()
