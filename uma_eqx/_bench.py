"""Timing helpers for `uma-eqx bench` and `benchmarks/compare_fairchem.py`.

Everything here is deterministic (seeded structures and rattles) so that a timed call can
be reproduced exactly: every row records the energy of its last timed call and the rattle
`step` that produced it (see [`rattled`][]).

Timing protocol per size: the first call is reported as `compile_s` (tracing + XLA compile,
plus the MoLE merge when `merged`, plus one run) with `jax_compile_s`, the part of it that JAX
reports as tracing, lowering and compiling (see `_first_call`); then `warmup` untimed calls,
then `repeats` timed calls whose best and median are reported. Results are blocked on (`jax.block_until_ready`) before
the clock stops. Peak RSS is the process's `ru_maxrss` so far (it only grows), so run one
size per process when memory matters (as `benchmarks/compare_fairchem.py` does).
"""

import math
import resource
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

# jax, equinox and the rest of uma_eqx are imported inside the functions that need them: the
# structure and timing helpers (`cu_fcc`, `rattled`, `mixed_systems`, `peak_rss_mib`,
# `_time_calls`) must load without them, so that `benchmarks/compare_fairchem.py` can use
# them in its fairchem worker processes without jax's memory in their peak RSS.

# Displacement (Å, standard deviation) of the per-call rattle around the base structure.
RATTLE_STDEV = 0.01


# ----------------------------------------------------------------------------------------
# structures
# ----------------------------------------------------------------------------------------


def _three_factors(n: int) -> tuple[int, int, int]:
    """The most cubic `a <= b <= c` with `a * b * c == n`."""
    best = (1, 1, n)
    for a in range(1, round(n ** (1 / 3)) + 2):
        if n % a:
            continue
        for b in range(a, math.isqrt(n // a) + 1):
            if (n // a) % b == 0:
                c = n // a // b
                if c >= b and c - a < best[2] - best[0]:
                    best = (a, b, c)
    return best


def cu_fcc(num_atoms: int, *, seed: int = 0, stdev: float = 0.05, symbol: str = "Cu"):
    """A rattled periodic fcc crystal of exactly `num_atoms` atoms.

    Cubic 4-atom cells repeated as cubically as possible when `num_atoms % 4 == 0`, else the
    1-atom primitive cell; positions rattled with `stdev` Å (seeded by `seed`).
    """
    from ase.build import bulk

    if num_atoms < 1:
        raise ValueError(f"num_atoms must be >= 1, got {num_atoms}")
    if num_atoms % 4 == 0:
        atoms = bulk(symbol, "fcc", cubic=True).repeat(_three_factors(num_atoms // 4))
    else:
        atoms = bulk(symbol, "fcc").repeat(_three_factors(num_atoms))
    atoms.rattle(stdev=stdev, seed=seed)
    return atoms


def rattled(atoms, step: int, *, seed: int = 0, stdev: float = RATTLE_STDEV):
    """A copy of `atoms` with positions displaced by a seeded Gaussian (`stdev` Å) for call `step`."""
    rng = np.random.default_rng([seed, step])
    out = atoms.copy()
    out.positions = atoms.positions + rng.normal(0.0, stdev, atoms.positions.shape)
    return out


def mixed_systems(count: int = 8, atoms_per_system: int = 32, *, seed: int = 0) -> list:
    """`count` different periodic fcc systems of `atoms_per_system` atoms each.

    Each is an fcc crystal of one of Cu, Ag, Au, Ni, Pd, Pt, Al (in turn) with a seeded
    random fraction of its sites substituted by the next element of that list, then rattled:
    different compositions (so experts cannot be merged across the batch) and cells.
    """
    from ase.data import atomic_numbers

    elements = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]
    rng = np.random.default_rng(seed)
    systems = []
    for k in range(count):
        host, guest = elements[k % len(elements)], elements[(k + 1) % len(elements)]
        atoms = cu_fcc(atoms_per_system, seed=seed + k, symbol=host)
        numbers = atoms.get_atomic_numbers()
        swap = rng.random(len(atoms)) < 0.1 + 0.05 * k
        numbers[swap] = atomic_numbers[guest]
        atoms.set_atomic_numbers(numbers)
        systems.append(atoms)
    return systems


# ----------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (`ru_maxrss`)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a jitted `n x n` float32 matmul (2 n³ FLOPs) on the default device."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def xla_flops(model, graph, *, stress: bool = False) -> float | None:
    """FLOPs XLA counts for one jitted energy+forces(+stress) call (`cost_analysis()['flops']`).

    Counted on the unchunked program (one chunk of edges): XLA counts a loop body once, so the
    chunked program's count would miss all chunks but one. Compiled, never run.
    """
    import equinox as eqx
    import jax

    from ._settings import ExecutionSettings

    try:
        dynamic, static = eqx.partition((model, graph), eqx.is_array)
        efs = _efs_fn(stress, ExecutionSettings(edge_chunk_size=None))
        lowered = jax.jit(lambda d: efs(*eqx.combine(d, static))).lower(dynamic)
        cost = lowered.compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        flops = None if cost is None else cost.get("flops")
        return None if flops is None or flops <= 0 else float(flops)
    except Exception:  # cost analysis is best effort (backend dependent)
        return None


def _efs_fn(stress: bool, settings=None):
    from ._potential import energy_forces_stress
    from ._settings import DEFAULT_SETTINGS

    settings = DEFAULT_SETTINGS if settings is None else settings

    def efs(model, graph):
        return energy_forces_stress(model, graph, stress=stress, settings=settings)

    return efs


def _graph(atoms, model, task_name: str, *, pad):
    from ._graph import AtomicGraph

    return AtomicGraph.for_model(model, atoms, task_name, pad=pad)


def merged_model(model, graph):
    """`model` with its MoLE experts merged for the (single) system of `graph`; dense models unchanged."""
    from ._potential import merge_experts_for

    if model.backbone.router is None:
        return model
    return merge_experts_for(model, graph)


# JAX's monitoring events for the three stages of compiling a jitted function (`jax/_src/dispatch.py`).
JAX_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


def _first_call(call, step: int):
    """`(out, seconds, jax_compile_seconds)` of `call(step)`.

    `jax_compile_seconds` sums JAX's own tracing, lowering and XLA-compile durations reported
    during the call (`None` in a process that has not imported jax, e.g. a fairchem worker):
    the compile part of a first call, without the run and the host work around it.
    """
    if "jax" not in sys.modules:
        t0 = time.perf_counter()
        out = call(step)
        return out, time.perf_counter() - t0, None
    from jax import monitoring

    spent = []

    def listener(event: str, duration_secs: float, **_: str | int) -> None:
        if event in JAX_COMPILE_EVENTS:
            spent.append(duration_secs)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        t0 = time.perf_counter()
        out = call(step)
        seconds = time.perf_counter() - t0
    finally:
        monitoring.unregister_event_duration_listener(listener)
    return out, seconds, sum(spent)


def _time_calls(call, first_step: int, warmup: int, repeats: int):
    """First call, then warmup, then timed repeats.

    Returns `(compile_s, times, last, last_step, jax_compile_s)`: the first call's seconds and
    the JAX compile seconds inside it (see `_first_call`).
    """
    out, compile_s, jax_compile_s = _first_call(call, first_step)
    step = first_step
    for _ in range(warmup):
        step += 1
        out = call(step)
    times = []
    for _ in range(repeats):
        step += 1
        t0 = time.perf_counter()
        out = call(step)
        times.append(time.perf_counter() - t0)
    return compile_s, times, out, step, jax_compile_s


def _task(model, task_name: str | None) -> str:
    if task_name is not None:
        return task_name
    tasks = model.config.task_names
    return "omat" if "omat" in tasks else tasks[0]


def benchmark_uma_eqx(
    model,
    sizes: Sequence[int],
    *,
    merged: bool,
    repeats: int,
    task_name: str | None = None,
    mode: str = "calculator",
    stress: bool = False,
    warmup: int = 1,
    seed: int = 0,
    flops: bool = True,
) -> list[dict]:
    """Time uma_eqx energy+forces(+stress) on rattled fcc Cu of each size in `sizes`.

    **Arguments:**

    - `model`: a [`uma_eqx.UMA`][] (any float dtype; the graph uses `model.dtype`).
    - `sizes`: numbers of atoms (see [`cu_fcc`][]).
    - `merged`: merge the MoLE experts for the (fixed) composition (fairchem's `merge_mole`);
        the merge happens in the first call, so it counts in `compile_s`.
    - `repeats`: timed calls per size (after `warmup` untimed calls).
    - `task_name`: the dataset/task (default `"omat"` if the model has it, else its first).
    - `mode`: `"calculator"`: one `UMACalculator` call per step (`get_potential_energy`,
        `get_forces` and, with `stress`, `get_stress`) with positions rattled every call, so
        neighbour list, padding and host transfers count; `"raw"`:
        `eqx.filter_jit(energy_forces_stress)` on a graph built once.
    - `stress`: also compute the stress (raw mode; the calculator always computes it, as
        fairchem's does).
    - `warmup`, `seed`: untimed calls after the first; structure/rattle seed.
    - `flops`: add XLA's FLOP count of the jitted call on the unpadded graph of the base structure.

    **Returns:**

    One dict per size: `impl`, `variant`, `mode`, `merged`, `stress`, `atoms`, `edges`,
    `systems`, `compile_s`, `best_s`, `median_s`, `times_s`, `repeats`, `energy` (of the last
    timed call), `last_step` (its rattle step; `None` in raw mode: the unrattled base
    structure), `flops` (or `None`), `peak_rss_mib`.
    """
    import equinox as eqx
    import jax

    from .calculator import UMACalculator

    if mode not in ("calculator", "raw"):
        raise ValueError(f"mode must be 'calculator' or 'raw', got {mode!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    task = _task(model, task_name)
    merged = bool(merged and model.backbone.router is not None)
    efs = eqx.filter_jit(_efs_fn(stress))
    rows = []
    for n in sizes:
        base = cu_fcc(int(n), seed=seed)
        graph = _graph(base, model, task, pad=False)
        if mode == "calculator":
            calc = UMACalculator(model, task_name=task, merge_experts=merged)

            def call_calculator(step, base=base, calc=calc):
                atoms = rattled(base, step, seed=seed)
                atoms.calc = calc
                energy = atoms.get_potential_energy()
                atoms.get_forces()
                if stress:
                    atoms.get_stress()
                return energy

            compile_s, times, energy, last_step, jax_compile_s = _time_calls(call_calculator, 0, warmup, repeats)
            timed_model = calc.model_for(rattled(base, last_step, seed=seed))
        else:
            state = {}

            def call_raw(step, state=state, graph=graph):
                if "model" not in state:  # the merge counts as part of the first call
                    state["model"] = merged_model(model, graph) if merged else model
                out = efs(state["model"], graph)
                jax.block_until_ready(out)
                return float(out["energy"][0])

            compile_s, times, energy, _, jax_compile_s = _time_calls(call_raw, 0, warmup, repeats)
            last_step = None
            timed_model = state["model"]
        row = {
            "impl": "uma_eqx",
            "variant": f"{mode} {'merged' if merged else 'unmerged'}" + (" +stress" if stress else ""),
            "mode": mode,
            "merged": merged,
            "stress": bool(stress or mode == "calculator"),
            "atoms": int(n),
            "edges": int(graph.num_edges),
            "systems": 1,
            "compile_s": compile_s,
            "jax_compile_s": jax_compile_s,
            "best_s": min(times),
            "median_s": statistics.median(times),
            "times_s": times,
            "repeats": repeats,
            "energy": float(energy),
            "last_step": last_step,
            "flops": xla_flops(timed_model, graph, stress=stress or mode == "calculator") if flops else None,
            "peak_rss_mib": peak_rss_mib(),
        }
        rows.append(row)
    return rows


def benchmark_uma_eqx_batch(
    model,
    systems: Sequence,
    *,
    repeats: int,
    task_name: str | None = None,
    stress: bool = False,
    warmup: int = 1,
    flops: bool = True,
) -> dict:
    """Time one batched, padded energy+forces call on `systems` (unmerged experts: mixed compositions).

    The graph (`AtomicGraph.from_atoms(systems, pad=True)`) is built once; the timed call is
    `eqx.filter_jit(energy_forces_stress)`. Returns one row like [`benchmark_uma_eqx`][]'s, with
    `energy` the list of per-system energies. `flops` is the sum over the systems of XLA's count
    for each one alone with its experts merged: the model's math for the batch (what fairchem's
    per-system MoLE computes too), without the batch's padding.
    """
    import equinox as eqx
    import jax

    task = _task(model, task_name)
    graph = _graph(list(systems), model, task, pad=True)
    efs = eqx.filter_jit(_efs_fn(stress))

    def call(step):
        out = efs(model, graph)
        jax.block_until_ready(out)
        return [float(e) for e in out["energy"][: len(systems)]]

    compile_s, times, energy, _, jax_compile_s = _time_calls(call, 0, warmup, repeats)
    return {
        "impl": "uma_eqx",
        "variant": f"batch of {len(systems)} unmerged" + (" +stress" if stress else ""),
        "mode": "batch",
        "merged": False,
        "stress": bool(stress),
        "atoms": int(sum(len(s) for s in systems)),
        "edges": int(np.asarray(graph.edge_mask).sum()),
        "systems": len(systems),
        "compile_s": compile_s,
        "jax_compile_s": jax_compile_s,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "times_s": times,
        "repeats": repeats,
        "energy": energy,
        "last_step": None,
        "flops": _sum_of_system_flops(model, systems, task, stress) if flops else None,
        "peak_rss_mib": peak_rss_mib(),
    }


def _sum_of_system_flops(model, systems, task_name: str, stress: bool) -> float | None:
    total = 0.0
    for atoms in systems:
        graph = _graph(atoms, model, task_name, pad=False)
        count = xla_flops(merged_model(model, graph), graph, stress=stress)
        if count is None:
            return None
        total += count
    return total


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------


def _fmt_time(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_compile(row: dict) -> str:
    """The first call, and the JAX compile time inside it when measured."""
    first, jax_compile = _fmt_time(row["compile_s"]), row.get("jax_compile_s")
    return first if jax_compile is None else f"{first} ({_fmt_time(jax_compile)})"


def format_table(rows: Sequence[dict], *, peak_flops: float | None = None) -> str:
    """A markdown table of benchmark rows (time per call, throughput, FLOP/s, memory).

    With `peak_flops` (e.g. [`matmul_peak_flops`][]) a column gives the achieved FLOP/s as a
    fraction of it; a row's own `peak_flops` (measured in the run that produced the row, when
    rows of several runs are merged) takes precedence.
    """
    head = ["implementation", "variant", "atoms", "edges", "first call (JAX compile)", "best", "median"]
    head += ["µs/atom", "GFLOP/s"]
    if peak_flops:
        head.append("% of matmul peak")
    head.append("peak RSS (MiB)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("error"):
            cells = [r.get("impl", ""), r.get("variant", ""), str(r.get("atoms", "")), "", "", "", "", "", ""]
            if peak_flops:
                cells.append("")
            cells.append(str(r["error"]))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        rate = r["flops"] / r["best_s"] if r.get("flops") else None
        cells = [
            r["impl"],
            r["variant"],
            str(r["atoms"]),
            str(r.get("edges", "")),
            _fmt_compile(r),
            _fmt_time(r["best_s"]),
            _fmt_time(r["median_s"]),
            f"{r['best_s'] / r['atoms'] * 1e6:.0f}",
            "–" if rate is None else f"{rate / 1e9:.1f}",
        ]
        if peak_flops:
            peak = r.get("peak_flops") or peak_flops
            cells.append("–" if rate is None else f"{100 * rate / peak:.0f}")
        cells.append(f"{r['peak_rss_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
