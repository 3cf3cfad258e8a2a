"""Memory and time per step of `uma-eqx md --engine jax-md` against the number of atoms.

Each size runs in its own process, exactly as a user would start it (the CLI, built-in model
unless `--model` is given): an fcc Cu crystal of about N atoms, NVE, a few steps. The child's
peak resident memory comes from the kernel (`os.wait4` resource usage), the time per step
from the CLI's own "steps/s after compilation" line, and the total wall time includes start-up,
the neighbour-list allocation and compilation.

    python benchmarks/md_scaling.py                       # 1k, 4k, 16k atoms
    python benchmarks/md_scaling.py --atoms 1000,4000,16000,100000 --json docs/assets/scaling/md.json

Memory per atom should be roughly flat: per edge, the model keeps the edge vectors and a few
per-edge scalars between blocks (the Wigner-D rotations are made chunk by chunk), plus at most
`ExecutionSettings.residual_budget_bytes` of convolution outputs per block.
"""

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

import ase.build
import ase.io

#: fcc Cu lattice constant (Å), experimental (Kittel, Introduction to Solid State Physics, 8th ed.).
CU_LATTICE_CONSTANT = 3.61


def crystal(target_atoms: int) -> ase.Atoms:
    """The cubic fcc Cu supercell `k x k x k` (4 k^3 atoms) closest to `target_atoms`."""
    k = max(1, round((target_atoms / 4) ** (1 / 3)))
    atoms = ase.build.bulk("Cu", "fcc", a=CU_LATTICE_CONSTANT, cubic=True).repeat((k, k, k))
    atoms.rattle(0.02, seed=0)
    return atoms


def run_one(atoms: ase.Atoms, steps: int, model: str | None, workdir: pathlib.Path) -> dict:
    """One `uma-eqx md` process on `atoms`; its peak memory, time per step and wall time."""
    path = workdir / f"cu_{len(atoms)}.extxyz"
    ase.io.write(path, atoms)
    command = ["uma-eqx", "md", str(path), "--engine", "jax-md", "--ensemble", "nve", "--steps", str(steps)]
    command += ["--interval", str(max(1, steps // 2)), "--output", str(workdir / f"md_{len(atoms)}.extxyz")]
    if model:
        command += ["--model", model]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-2000:]}")
    rate = re.search(r"([0-9.eE+-]+) steps/s after compilation", output)
    seconds_per_step = 1.0 / float(rate.group(1)) if rate else None
    peak = usage.ru_maxrss * 1024  # Linux reports kilobytes
    return {
        "atoms": len(atoms),
        "steps": steps,
        "peak_rss_bytes": peak,
        "bytes_per_atom": peak / len(atoms),
        "seconds_per_step": seconds_per_step,
        "wall_seconds": wall,
    }


def save(path: str, rows: list[dict]) -> None:
    """Write the rows and the machine to `path` (JSON)."""
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atoms", default="1000,4000,16000", help="comma-separated target sizes")
    parser.add_argument("--steps", type=int, default=4, help="MD steps per size (>= 4 gives a rate)")
    parser.add_argument("--model", default=None, help="model file (default: the built-in model)")
    parser.add_argument("--json", default=None, help="also write the rows (and the machine) to this file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'atoms':>8} {'peak GB':>8} {'kB/atom':>8} {'s/step':>8} {'wall s':>8}", flush=True)
        for target in (int(a) for a in args.atoms.split(",")):
            row = run_one(crystal(target), args.steps, args.model, pathlib.Path(tmp))
            rows.append(row)
            if args.json:  # after every size: a long run that is stopped keeps what it measured
                save(args.json, rows)
            step = f"{row['seconds_per_step']:8.2f}" if row["seconds_per_step"] else f"{'n/a':>8}"
            print(
                f"{row['atoms']:8d} {row['peak_rss_bytes'] / 1e9:8.2f} {row['bytes_per_atom'] / 1e3:8.1f} "
                f"{step} {row['wall_seconds']:8.1f}",
                flush=True,
            )
    if len(rows) >= 2:  # the marginal cost, without the fixed start-up memory
        a, b = rows[0], rows[-1]
        marginal = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["atoms"] - a["atoms"])
        print(f"marginal memory {marginal / 1e3:.1f} kB/atom between {a['atoms']} and {b['atoms']} atoms")


if __name__ == "__main__":
    main()
