"""Graph-parallel scaling facts: halo volume per layer and compiled memory per device.

Two measurements, both exact on any machine (no timing):

- `volume`: for cubic fcc Cu crystals of about 10k, 100k and 1M atoms partitioned over 8, 64
  and 256 devices (`uma_eqx.parallel.exchange_volume`: the partition and halo that
  `energy_forces_stress_sharded` would use, from the geometry and the 6 Å cutoff alone), the
  halo atoms per device and the bytes each device receives per layer: uma_eqx's halo exchange
  (`exchange="halo"`, padded ppermute rounds), the halo rows themselves (an unpadded
  all-to-all's volume), uma_eqx's `exchange="all_gather"` and fairchem's all-gather of every
  atom's node embedding (`N (lmax+1)^2 C` per device per layer), for the uma-s and uma-m
  feature shapes (float32).
- `memory`: XLA's compiled memory analysis (`Compiled.memory_analysis()`: arguments, outputs,
  temporaries of the per-device program) of one energy+forces+stress step of
  `energy_forces_stress_sharded` on 1, 2, 4 and 8 simulated CPU devices, for a fixed structure
  (strong scaling) and for a fixed number of atoms per device (weak scaling), uma-s shape with
  random weights (experts merged: the shape the sharded program runs). It compiles only.

    python benchmarks/scaling.py volume --json docs/assets/scaling/volume.json
    python benchmarks/scaling.py memory --json docs/assets/scaling/memory_default.json
    python benchmarks/scaling.py memory --residual-budget 0 --json docs/assets/scaling/memory_budget0.json
    python benchmarks/scaling.py table      # docs/scaling.md's tables from those files (+ md_scaling.py's md.json)

Shapes. uma-s-1p1: lmax 2, 128 sphere channels, 4 layers (its checkpoint). uma-m-1p1: lmax 4,
mmax 2, 128 sphere channels, 10 layers -- ASSUMED from the UMA paper's description; no uma-m
checkpoint was available here to confirm channels and layers. Per step (energy and forces) a
layer's halo refresh runs once forward and its transpose once backward, so bytes per MD step are
`2 x layers x` the per-layer figure.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

#: fcc Cu lattice constant (Å), experimental (Kittel, Introduction to Solid State Physics, 8th ed.).
CU_LATTICE_CONSTANT = 3.61
#: UMA's cutoff (Å) (uma-s-1p1 and uma-m-1p1 checkpoints: `cutoff: 6.0`).
UMA_CUTOFF = 6.0
#: Bytes of one float32 feature value.
FLOAT32_BYTES = 4
#: Feature shapes: (lmax, sphere channels, layers). uma-s-1p1 from its checkpoint; uma-m assumed
#: (see the module docstring).
SHAPES = {"uma-s": (2, 128, 4), "uma-m": (4, 128, 10)}


def crystal(target_atoms: int):
    """The cubic fcc Cu supercell `k x k x k` (4 k^3 atoms) closest to `target_atoms`, rattled."""
    import ase.build

    k = max(1, round((target_atoms / 4) ** (1 / 3)))
    atoms = ase.build.bulk("Cu", "fcc", a=CU_LATTICE_CONSTANT, cubic=True).repeat((k, k, k))
    atoms.rattle(0.02, seed=0)
    return atoms


def row_bytes(shape: str) -> int:
    """Bytes of one atom's node features, `(lmax + 1)^2 C` float32."""
    lmax, channels, _ = SHAPES[shape]
    return (lmax + 1) ** 2 * channels * FLOAT32_BYTES


def volume(atom_counts, device_counts, methods) -> list[dict]:
    """Rows of halo/all-gather volume per layer for every size, device count and method."""
    from uma_eqx.parallel import exchange_volume

    rows = []
    for target in atom_counts:
        atoms = crystal(target)
        n = len(atoms)
        for devices in device_counts:
            for method in methods:
                start = time.perf_counter()
                # the geometry is shared by both shapes: compute with 1-byte rows, scale after
                v = exchange_volume(atoms.positions, atoms.cell.array, atoms.pbc, UMA_CUTOFF, devices, 1, method)
                elapsed = time.perf_counter() - start
                halo_rows_padded = v.halo_bytes_per_device  # rows, as row_bytes == 1
                row = {
                    "atoms": n,
                    "devices": devices,
                    "method": method,
                    "owned_max": int(np.max(v.owned_atoms)),
                    "halo_atoms_max": int(np.max(v.halo_atoms)),
                    "halo_atoms_mean": float(np.mean(v.halo_atoms)),
                    "halo_rounds": len(v.rounds),
                    "seconds": elapsed,
                }
                for shape in SHAPES:
                    b = row_bytes(shape)
                    row[shape] = {
                        "row_bytes": b,
                        "halo_padded_per_device": halo_rows_padded * b,
                        "halo_needed_max_per_device": int(np.max(v.halo_atoms)) * b,
                        "all_gather_per_device": v.all_gather_bytes_per_device * b,
                        "fairchem_all_gather_per_device": n * b,
                    }
                rows.append(row)
                print(
                    f"{n:>8} atoms {devices:>4} devices {method:>6}: owned <= {row['owned_max']:>7}, halo <= "
                    f"{row['halo_atoms_max']:>7} atoms ({len(v.rounds)} rounds); uma-s per device per layer: "
                    f"halo {row['uma-s']['halo_padded_per_device'] / 1e6:9.1f} MB (needed "
                    f"{row['uma-s']['halo_needed_max_per_device'] / 1e6:8.1f} MB), fairchem all-gather "
                    f"{row['uma-s']['fairchem_all_gather_per_device'] / 1e6:9.1f} MB  [{elapsed:.0f} s]",
                    flush=True,
                )
    return rows


_MEMORY_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import uma_eqx
from uma_eqx.parallel import ShardedStructure, make_mesh
from uma_eqx.parallel._graph_parallel import _sharded_efs
sys.path.insert(0, {bench!r})
from scaling import crystal

lmax, channels, layers = {shape!r}
config = uma_eqx.UMAConfig(
    sphere_channels=channels, hidden_channels=channels, edge_channels=channels, lmax=lmax, mmax=2,
    num_layers=layers, num_distance_basis=64, cutoff={cutoff!r}, datasets=("omat",),
)
model = uma_eqx.UMA(config, jnp.float32, key=jax.random.key(0))
rows = []
for atoms_target, devices in {cases!r}:
    atoms = crystal(atoms_target)
    graph = uma_eqx.AtomicGraph.for_model(model, atoms, "omat")
    structure = ShardedStructure.build(graph, make_mesh(jax.devices()[:devices]), "morton")
    args = (model, structure.mesh, structure.partition.capacity, "halo" if devices > 1 else "all_gather",
            uma_eqx.ExecutionSettings(residual_budget_bytes={budget!r}), True, structure.positions, structure.tables, graph.cell[:1],
            graph.charge[:1], graph.spin[:1], graph.dataset_index[:1], jnp.asarray(0.0, jnp.float32))
    m = _sharded_efs.lower(*args).compile().compiled.memory_analysis()
    cap = structure.partition.capacity
    rows.append(dict(atoms=len(atoms), devices=devices, residual_budget_bytes={budget!r}, owned=cap.owned, halo=cap.halo, edges=cap.edges,
                     argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                     temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes,
                     total=m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes))
    print(json.dumps(rows[-1]), flush=True)
"""


def memory(strong_atoms: int, weak_atoms_per_device: int, device_counts, shape: str, budget: int) -> list[dict]:
    """Compiled per-device memory of the sharded E+F+S program (simulated devices, a child process)."""
    labels = ["strong"] * len(device_counts) + ["weak"] * len(device_counts)
    cases = [(strong_atoms, d) for d in device_counts] + [(weak_atoms_per_device * d, d) for d in device_counts]
    code = _MEMORY_CHILD.format(
        bench=str(pathlib.Path(__file__).parent), shape=SHAPES[shape], cutoff=UMA_CUTOFF, cases=cases, budget=budget
    )
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={max(device_counts)}")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r, label in zip(rows, labels):
        r["scaling"] = label
        r["shape"] = shape
        print(
            f"{r['scaling']:>6} {r['atoms']:>6} atoms {r['devices']} devices: owned {r['owned']}, halo {r['halo']}, "
            f"edges {r['edges']}; per device: args {r['argument'] / 1e6:.1f} MB, temp {r['temp'] / 1e6:.1f} MB, "
            f"total {r['total'] / 1e6:.1f} MB",
            flush=True,
        )
    return rows


#: Link bandwidths of the modelled communication time (bytes/s, one direction, per GPU): NVLink 4
#: on H100/H200 SXM, 900 GB/s bidirectional (NVIDIA H100/H200 datasheets); one NDR InfiniBand
#: port per GPU, 400 Gb/s (NVIDIA ConnectX-7 datasheet).
NVLINK_BYTES_PER_S = 450e9
INFINIBAND_BYTES_PER_S = 50e9
#: GPUs per node (HGX H100/H200): up to this many devices, traffic stays on NVLink.
GPUS_PER_NODE = 8
#: Seconds per collective round (message latency), an assumption of the model (order of NCCL's
#: small-message latency between nodes).
ROUND_LATENCY_S = 10e-6
#: Compute time of one uma-s MD step with 4,000 atoms on one H200, an anchor of the model:
#: fairchem's published weak scaling, 0.67 ns/day at 32k atoms on 8 H200 (4k atoms per GPU),
#: read with an assumed 1 fs timestep (86,400 s / 670,000 steps), communication included.
ANCHOR_STEP_S = 86400 / 670_000
ANCHOR_ATOMS = 4000


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def table(volume_json: str, memory_jsons: list[str], md_json: str | None) -> dict[str, str]:
    """The scaling page's tables (markdown) from this script's and md_scaling.py's JSON files:
    `{"VOLUME": ..., "COMM": ..., "MODEL": ..., "MEMORY": ..., "MD": ...}`."""
    sections: dict[str, str] = {}
    out = []
    rows = json.loads(pathlib.Path(volume_json).read_text())["rows"]
    by = {(r["atoms"], r["devices"], r["method"]): r for r in rows}
    for shape, (lmax, channels, layers) in SHAPES.items():
        out += [
            f"**{shape}** (lmax {lmax}, {channels} channels, {layers} layers; {row_bytes(shape):,} bytes per "
            "atom row): MB received per device per layer",
            "",
            "| atoms | devices | owned/device | halo atoms (morton / slab) | uma_eqx halo, morton (rounds) "
            "| halo rows alone, morton | uma_eqx halo, slab (rounds) | fairchem all-gather |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for atoms, devices in sorted({(r["atoms"], r["devices"]) for r in rows}):
            m, s = by[(atoms, devices, "morton")], by[(atoms, devices, "slab")]
            out.append(
                f"| {atoms:,} | {devices} | {m['owned_max']:,} | {m['halo_atoms_max']:,} / {s['halo_atoms_max']:,} "
                f"| {_mb(m[shape]['halo_padded_per_device'])} ({m['halo_rounds']}) "
                f"| {_mb(m[shape]['halo_needed_max_per_device'])} "
                f"| {_mb(s[shape]['halo_padded_per_device'])} ({s['halo_rounds']}) "
                f"| {_mb(m[shape]['fairchem_all_gather_per_device'])} |"
            )
        out.append("")
    sections["VOLUME"], out = "\n".join(out), []
    out += [
        "Modelled communication time per MD step (energy and forces: each layer's exchange forward and its "
        f"transpose backward, `2 x layers` exchanges), no overlap with compute, at {NVLINK_BYTES_PER_S / 1e9:.0f} "
        f"GB/s (NVLink, up to {GPUS_PER_NODE} devices) or {INFINIBAND_BYTES_PER_S / 1e9:.0f} GB/s (InfiniBand "
        "NDR, more devices) per device:",
        "",
        "| shape | atoms | devices | uma_eqx halo (morton) | halo rows alone | fairchem all-gather |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape, (_, _, layers) in SHAPES.items():
        for atoms, devices in sorted({(r["atoms"], r["devices"]) for r in rows}):
            m = by[(atoms, devices, "morton")]
            bw = NVLINK_BYTES_PER_S if devices <= GPUS_PER_NODE else INFINIBAND_BYTES_PER_S

            def ms(b, bw=bw, layers=layers):
                return f"{2 * layers * b / bw * 1e3:,.1f} ms"

            out.append(
                f"| {shape} | {atoms:,} | {devices} | {ms(m[shape]['halo_padded_per_device'])} "
                f"| {ms(m[shape]['halo_needed_max_per_device'])} | {ms(m[shape]['fairchem_all_gather_per_device'])} |"
            )
    out.append("")
    sections["COMM"], out = "\n".join(out), []
    out += [
        "Modelled time per uma-s MD step: compute scaled linearly from the anchor "
        f"({ANCHOR_STEP_S * 1e3:.0f} ms for {ANCHOR_ATOMS:,} atoms per device, see above), plus communication "
        f"(bytes at the bandwidths above and {ROUND_LATENCY_S * 1e6:.0f} µs per round: `2 x layers x rounds` rounds "
        "for the halo exchange, `2 x layers x log2(devices)` for a ring/tree all-gather), no overlap; "
        "efficiency = compute / (compute + communication):",
        "",
        "| atoms | devices | atoms/device | compute | uma_eqx halo: comm, efficiency | "
        "halo rows alone, one round per neighbour: comm, efficiency | fairchem all-gather: comm, efficiency |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    layers = SHAPES["uma-s"][2]
    for atoms, devices in sorted({(r["atoms"], r["devices"]) for r in rows}):
        m = by[(atoms, devices, "morton")]
        bw = NVLINK_BYTES_PER_S if devices <= GPUS_PER_NODE else INFINIBAND_BYTES_PER_S
        compute = ANCHOR_STEP_S * m["owned_max"] / ANCHOR_ATOMS
        v = m["uma-s"]
        neighbours = min(m["halo_rounds"], 26)  # a 3-D block has at most 26 neighbouring blocks
        comms = [
            2 * layers * (v["halo_padded_per_device"] / bw + m["halo_rounds"] * ROUND_LATENCY_S),
            2 * layers * (v["halo_needed_max_per_device"] / bw + neighbours * ROUND_LATENCY_S),
            2 * layers * (v["fairchem_all_gather_per_device"] / bw + np.log2(devices) * ROUND_LATENCY_S),
        ]
        cells = " | ".join(f"{c * 1e3:,.1f} ms, {compute / (compute + c):.0%}" for c in comms)
        out.append(f"| {atoms:,} | {devices} | {m['owned_max']:,} | {compute * 1e3:,.1f} ms | {cells} |")
    out.append("")
    sections["MODEL"], out = "\n".join(out), []
    for path in memory_jsons:
        mem = json.loads(pathlib.Path(path).read_text())["rows"]
        budget = mem[0]["residual_budget_bytes"]
        out += [
            f"Compiled memory per device ({mem[0]['shape']}, float32, `residual_budget_bytes={budget}`), energy + "
            "forces + stress:",
            "",
            "| scaling | atoms | devices | owned + halo rows | edges/device | arguments MB | temporaries MB "
            "| total MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mem:
            out.append(
                f"| {r['scaling']} | {r['atoms']:,} | {r['devices']} | {r['owned']:,} + {r['halo']:,} | "
                f"{r['edges']:,} | {_mb(r['argument'])} | {_mb(r['temp'])} | {_mb(r['total'])} |"
            )
        out.append("")
    sections["MEMORY"], out = "\n".join(out), []
    if md_json:
        md = json.loads(pathlib.Path(md_json).read_text())
        out += [
            "`uma-eqx md --engine jax-md --ensemble nve` (built-in model, cell-list neighbour list), "
            f"{md['machine']['cpus']} CPU cores:",
            "",
            "| atoms | peak memory GB | kB per atom | s per step | wall s (start, allocation, compile, steps) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in md["rows"]:
            step = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "n/a"
            out.append(
                f"| {r['atoms']:,} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['bytes_per_atom'] / 1e3:.1f} | {step} "
                f"| {r['wall_seconds']:.0f} |"
            )
        out.append("")
    sections["MD"] = "\n".join(out)
    return sections


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["volume", "memory", "table"])
    parser.add_argument("--atoms", default="10000,100000,1000000", help="volume: target sizes")
    parser.add_argument("--devices", default=None, help="device counts (volume: 8,64,256; memory: 1,2,4,8)")
    parser.add_argument("--methods", default="morton,slab", help="volume: partition methods")
    parser.add_argument("--strong-atoms", type=int, default=4000, help="memory: the fixed structure's size")
    parser.add_argument("--weak-atoms", type=int, default=500, help="memory: atoms per device (weak scaling)")
    parser.add_argument("--shape", default="uma-s", choices=sorted(SHAPES), help="memory: model shape")
    parser.add_argument(
        "--residual-budget",
        type=int,
        default=None,
        help="memory: ExecutionSettings.residual_budget_bytes (default: the library's; 0 = least memory)",
    )
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.what == "table":  # the docs page's tables from the JSON files under docs/assets/scaling
        folder = pathlib.Path(__file__).parent.parent / "docs" / "assets" / "scaling"
        memories = sorted(str(p) for p in folder.glob("memory*.json"))
        md = folder / "md.json"
        sections = table(str(folder / "volume.json"), memories, str(md) if md.exists() else None)
        print("\n".join(sections.values()))
        return
    if args.what == "volume":
        devices = [int(d) for d in (args.devices or "8,64,256").split(",")]
        rows = volume([int(a) for a in args.atoms.split(",")], devices, args.methods.split(","))
    else:
        devices = [int(d) for d in (args.devices or "1,2,4,8").split(",")]
        from uma_eqx._settings import DEFAULT_RESIDUAL_BUDGET_BYTES

        budget = DEFAULT_RESIDUAL_BUDGET_BYTES if args.residual_budget is None else args.residual_budget
        rows = memory(args.strong_atoms, args.weak_atoms, devices, args.shape, budget)
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"shapes": SHAPES, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
