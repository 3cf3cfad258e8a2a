"""`run_sharded`: many structures over a Ray cluster, each result written exactly once.

The driver splits the input into shards of `shard_size` structures and hands them to a pool
of Ray actors, one per worker slot; each actor loads the model once and runs the work
function (by default the batched relaxation [`uma_eqx.relax_batch`][]) on every shard it is
given. The driver alone writes: each finished shard becomes one result file, written
atomically (temporary file, `fsync`, rename) in `OUTPUT.shards/`; when all are there they are
merged into `OUTPUT` in input order. A worker that dies (killed, out of memory, node lost)
is replaced and its shard runs again; a driver restarted with the same command skips the
shards whose files exist. Every input ends with exactly one result.

Ray is an optional dependency (`pip install 'uma_eqx[ray]'`); nothing else imports this module.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ase
import numpy as np

from ._potential import UMA

#: Format tag of the shard directory's manifest (bumped if the layout changes).
_MANIFEST_VERSION = 1
#: Suffixes of the merged output that `run_sharded` writes.
OUTPUT_SUFFIXES = (".extxyz", ".xyz", ".json", ".jsonl")

WorkFn = Callable[..., list[dict]]


def relax_work(model: UMA, structures: list[ase.Atoms], **kwargs) -> list[dict]:
    """Default work: [`uma_eqx.relax_batch`][] of one shard (keyword arguments passed on)."""
    from .relax import relax_batch

    return relax_batch(model, structures, progress=False, **kwargs)


def predict_work(model: UMA, structures: list[ase.Atoms], **kwargs) -> list[dict]:
    """Single points of one shard: [`uma_eqx.predict`][] with bad structures as error rows."""
    from ._predict import predict

    return predict(model, structures, progress=False, on_error="skip", **kwargs)


#: Work functions by name (`uma-eqx optimize --ray` uses "relax").
WORK = {"relax": relax_work, "predict": predict_work}


@dataclasses.dataclass(frozen=True)
class ShardReport:
    """What [`uma_eqx.cluster.run_sharded`][] did: `shards` in all, `skipped` (finished before this call),
    `ran` (shards run now), `retried` (shard runs repeated after a worker died), `output`."""

    shards: int
    skipped: int
    ran: int
    retried: int
    output: str


class _Worker:
    """A Ray actor body: loads the model once, then runs the work function on shards."""

    def __init__(self, model_path: str | None, dtype: str | None, work: WorkFn):
        import jax

        from ._default import default_model
        from ._io import load

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        if model_path is None:
            self.model = default_model()
        else:
            self.model = load(model_path, dtype=None if dtype is None else np.dtype(dtype))
        self.work = work

    def run(self, shard: int, structures: list[ase.Atoms], kwargs: dict) -> tuple[int, list[dict]]:
        results = self.work(self.model, structures, **kwargs)
        if len(results) != len(structures):
            raise RuntimeError(f"work returned {len(results)} results for {len(structures)} structures (shard {shard})")
        return shard, [_encode(r) for r in results]


def _encode(value: Any) -> Any:
    """A result as JSON-able values (arrays as nested lists, `ase.Atoms` as a tagged dict)."""
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, ase.Atoms):
        return {
            "__atoms__": True,
            "numbers": value.numbers.tolist(),
            "positions": value.positions.tolist(),
            "cell": np.asarray(value.cell).tolist(),
            "pbc": value.pbc.tolist(),
            "info": _encode({k: v for k, v in value.info.items() if _jsonable(v)}),
        }
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if hasattr(value, "__array__"):  # jax arrays
        return np.asarray(value).tolist()
    return value


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, tuple, dict, np.ndarray, np.generic))


def _decode(value: Any) -> Any:
    """Inverse of `_encode` for dicts of results: forces/stress/positions back to numpy."""
    if isinstance(value, dict):
        if value.get("__atoms__"):
            atoms = ase.Atoms(numbers=value["numbers"], positions=value["positions"], cell=value["cell"])
            atoms.pbc = value["pbc"]
            atoms.info.update(value["info"])
            return atoms
        return {k: np.asarray(v) if k in ("forces", "stress") else _decode(v) for k, v in value.items()}
    return value


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` so that `path` is either absent or complete (rename is atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _fingerprint(structures: Sequence[ase.Atoms]) -> str:
    """A hash of the input (numbers, positions, cell, pbc), so a restart with other input is refused."""
    h = hashlib.sha256()
    for a in structures:
        for array in (a.numbers, a.positions, np.asarray(a.cell), a.pbc):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _read_input(structures) -> list[ase.Atoms]:
    if isinstance(structures, (str, os.PathLike)):
        from ase.io import read

        if not os.path.exists(structures):
            raise FileNotFoundError(f"structure file not found: {os.fspath(structures)}")
        frames = read(os.fspath(structures), index=":")
        return list(frames) if isinstance(frames, list) else [frames]
    if isinstance(structures, ase.Atoms):
        return [structures]
    return list(structures)


def _frame(result: dict, original: ase.Atoms) -> ase.Atoms:
    """One output frame: the final structure (or the input's), its results as calculator and info."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = result["atoms"].copy() if isinstance(result.get("atoms"), ase.Atoms) else original.copy()
    atoms.calc = None
    for key in ("index", "task", "natoms", "steps", "converged", "fmax", "error"):
        if key in result and result[key] is not None:
            atoms.info[key] = result[key]
    if "energy" in result and "error" not in result:
        stress = result.get("stress")
        voigt = None
        if stress is not None:
            s = np.asarray(stress)
            voigt = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(result["energy"]), forces=np.asarray(result["forces"]), stress=voigt
        )
    return atoms


def _merge(output: pathlib.Path, results: list[dict], structures: list[ase.Atoms]) -> None:
    if output.suffix in (".json", ".jsonl"):
        encoded = [_encode(r) for r in results]
        text = json.dumps(encoded) if output.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in encoded)
        _write_atomic(output, text)
        return
    from ase.io import write

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp{output.suffix}")
    write(tmp, [_frame(r, a) for r, a in zip(results, structures)], format="extxyz")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, output)


def read_results(path: "str | os.PathLike") -> list[dict]:
    """The results of a finished `run_sharded` `.json`/`.jsonl` output, in input order."""
    path = pathlib.Path(path)
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
    return [_decode(r) for r in rows]


def run_sharded(
    structures: "str | os.PathLike | ase.Atoms | Iterable[ase.Atoms]",
    output: "str | os.PathLike",
    *,
    model: "str | os.PathLike | None" = None,
    dtype: str | None = None,
    work: "WorkFn | str" = "relax",
    work_kwargs: dict | None = None,
    shard_size: int = 64,
    num_workers: int | None = None,
    address: str | None = None,
    worker_options: dict | None = None,
    max_retries: int = 3,
    progress: bool = False,
) -> ShardReport:
    """Run `work` over `structures` in shards on a Ray cluster; merge the results into `output`.

    Each of `num_workers` Ray actors loads the model once (from `model`, a path every worker
    can read, or the built-in model) and then runs `work(model, shard, **work_kwargs)` for
    each shard it is given, one at a time. The driver writes each finished shard to
    `OUTPUT.shards/NNNNNN.json` (atomically), then merges all shards into `output` in input
    order, each record carrying its input `index`. If a worker dies, a new actor takes its
    place and the shard runs again (at most `max_retries` times); the file of a shard is
    written once, by the driver, when its result arrives. Running the same call again after
    the driver itself died skips the shards already written (the input must be the same: a
    hash of it is kept in `OUTPUT.shards/manifest.json`).

    Within a worker the work function uses the devices Ray gives it (e.g. `worker_options=
    {"num_gpus": 1}`), data parallel over them.

    **Arguments:**

    - `structures`: a path to any file ASE reads (all frames), a list of `ase.Atoms`, or one.
    - `output`: the merged results: `.extxyz`/`.xyz` (final structures with energy, forces,
        stress and `info` index, steps, converged, fmax, error) or `.json`/`.jsonl` (the work
        function's records, arrays as lists; read back with [`uma_eqx.cluster.read_results`][]).
    - `model`: a `.eqx` (or fairchem `.pt`) path; `None` for the built-in model.
    - `dtype`: load the model in this dtype (`"float32"`/`"float64"`); default the file's.
    - `work`: `"relax"` (`uma_eqx.relax_batch`, default), `"predict"` ([`uma_eqx.predict`][])
        or a function `work(model, structures, **work_kwargs) -> list[dict]` (one dict per
        structure, in order; it runs on the workers, so it must pickle).
    - `work_kwargs`: keyword arguments of `work` (e.g. `task_name`, `fmax`, `batch_size`).
    - `shard_size`: structures per shard.
    - `num_workers`: actors to start; default the cluster's CPUs divided by the CPUs each
        actor asks for (`worker_options`, default 1), at most the number of shards.
    - `address`: `None` to use the running Ray instance or start a local one, `"auto"` to join
        the cluster on this node, or `"ray://host:port"` / `"host:port"`.
    - `worker_options`: Ray actor options (`num_cpus`, `num_gpus`, `memory`, ...).
    - `max_retries`: runs of one shard after the first, when workers die or raise.
    - `progress`: show a tqdm progress bar of shards.

    **Returns:**

    A [`uma_eqx.cluster.ShardReport`][].

    **Raises:**

    `ValueError` for a bad `shard_size`, `output` suffix or `work` name, or a restart with
    different input; `RuntimeError` when a shard failed `1 + max_retries` times (the finished
    shards stay written; fix the cause and run again to finish the rest).
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}.")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}.")
    output = pathlib.Path(output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {str(output)!r} must end in one of {list(OUTPUT_SUFFIXES)}.")
    if isinstance(work, str):
        if work not in WORK:
            raise ValueError(f"work={work!r} is not one of {sorted(WORK)}; or pass a function.")
        work = WORK[work]
    kwargs = dict(work_kwargs or {})
    inputs = _read_input(structures)
    if not inputs:
        raise ValueError("run_sharded got no structures.")
    shards = [list(range(i, min(i + shard_size, len(inputs)))) for i in range(0, len(inputs), shard_size)]

    folder = output.with_name(output.name + ".shards")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": _MANIFEST_VERSION,
        "structures": len(inputs),
        "shard_size": shard_size,
        "input_sha256": _fingerprint(inputs),
    }
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        found = json.loads(manifest_path.read_text())
        if found != manifest:
            raise ValueError(
                f"{manifest_path} belongs to another run ({found}); this one is {manifest}. Use another output "
                "path, or delete that folder to start over."
            )
    else:
        _write_atomic(manifest_path, json.dumps(manifest))

    def shard_path(s: int) -> pathlib.Path:
        return folder / f"{s:06d}.json"

    todo = [s for s in range(len(shards)) if not shard_path(s).exists()]
    skipped = len(shards) - len(todo)
    retried = 0
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        options = {"num_cpus": 1, "max_restarts": 0, **(worker_options or {})}
        if num_workers is None:
            per = float(options.get("num_cpus", 1)) or 1.0
            num_workers = max(1, int(ray.cluster_resources().get("CPU", 1) // per))
        num_workers = max(1, min(num_workers, len(todo)))
        actor: Any = ray.remote(_Worker).options(**options)  # Ray's actor typing does not cover .options
        model_path = None if model is None else os.fspath(model)

        def start():
            return actor.remote(model_path, dtype, work)

        pending = list(reversed(todo))  # pop() from the end: input order first
        attempts = {s: 0 for s in todo}
        running: dict[Any, tuple[Any, int]] = {}  # object ref -> (actor, shard)
        idle = [start() for _ in range(num_workers)]
        bar = tqdm(total=len(shards), initial=skipped, desc="shards", disable=not progress)

        def submit(worker) -> None:
            s = pending.pop()
            attempts[s] += 1
            ref = worker.run.remote(s, [inputs[i] for i in shards[s]], kwargs)
            running[ref] = (worker, s)

        try:
            while pending or running:
                while pending and idle:
                    submit(idle.pop())
                done, _ = ray.wait(list(running), num_returns=1)
                ref = done[0]
                worker, s = running.pop(ref)
                try:
                    _, records = ray.get(ref)
                except (RayActorError, RayTaskError) as e:
                    if attempts[s] > max_retries:
                        raise RuntimeError(
                            f"shard {s} (structures {shards[s][0]}..{shards[s][-1]}) failed {attempts[s]} times; "
                            f"last error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from e
                    retried += 1
                    pending.append(s)
                    if isinstance(e, RayActorError):
                        idle.append(start())  # the worker is gone: a new one loads the model
                    else:
                        idle.append(worker)
                    continue
                for i, record in zip(shards[s], records):
                    record["index"] = i
                _write_atomic(shard_path(s), json.dumps(records))
                bar.update(1)
                idle.append(worker)
        finally:
            bar.close()
            for worker in idle + [w for w, _ in running.values()]:
                ray.kill(worker)

    results: list[dict] = []
    for s in range(len(shards)):
        results += [_decode(r) for r in json.loads(shard_path(s).read_text())]
    if [r["index"] for r in results] != list(range(len(inputs))):
        raise RuntimeError(
            f"the shard files in {folder} do not cover the input once each; delete the folder and rerun."
        )
    _merge(output, results, inputs)
    return ShardReport(len(shards), skipped, len(shards) - skipped, retried, str(output))
