"""Filtered-jit training and fine-tuning with optax, EMA, checkpoints and metrics."""

import csv
import dataclasses
import json
import math
import os
import pathlib
import time
import tomllib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from .._config import UMAConfig
from .._graph import PaddingSpec
from .._io import load, save
from .._potential import UMA
from ..parallel._data import Device, batch_mesh, replicate, shard_stack
from ._data import Batch, batch_capacity, check_records, empty_batch, make_batch, pack_batches, read_dataset
from ._loss import LossWeights, errors_over, loss_over


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; readable from TOML (see `uma-eqx train`).

    **Fields:**

    - `train`, `valid`: dataset files (extxyz / ASE `.db`), lists of paths.
    - `out_dir`: where checkpoints, `metrics.csv`, `metrics.json`, `learning_curve.png` and
      `model.eqx` (the EMA weights, or the raw weights without EMA) go.
    - `init`: a `.eqx` model to fine-tune; else `model` (a dict of `UMAConfig` fields) builds
      a fresh one with random weights from `seed`.
    - `task`: task of records without `info["task"]`.
    - `epochs`, `batch_size`, `learning_rate`, `warmup_steps`, `weight_decay`, `grad_clip`.
    - `energy_weight`, `forces_weight`, `stress_weight`: loss weights.
    - `freeze`: `"none"`, `"backbone"` (train heads only), `"all_but_experts"` (train MoLE
      experts only), or `"embeddings"`.
    - `ema_decay`: EMA of weights (0 disables).
    - `fit_references`: before training, least-squares fit the per-element reference energies
      of `task` to the training energies (recommended from scratch).
    - `seed`, `dtype` (`float32`/`float64`), `eval_every` (epochs), `progress`.
    - `devices`: data parallel over this many local devices (`None`: all of them). Each step
      takes one packed batch of about `ceil(batch_size / devices)` structures per device
      (the `batch_size` structures of a step split over the devices); the gradient is that
      of the whole step's loss, as on one device.
    """

    train: list[str]
    valid: list[str] = dataclasses.field(default_factory=list)
    out_dir: str = "runs/uma_eqx"
    init: str | None = None
    model: dict | None = None
    task: str | None = None
    epochs: int = 10
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 0.0
    freeze: str = "none"
    ema_decay: float = 0.99
    fit_references: bool = False
    seed: int = 0
    dtype: str = "float32"
    eval_every: int = 1
    progress: bool = True
    devices: int | None = None

    @classmethod
    def from_toml(cls, path: "str | os.PathLike") -> "TrainConfig":
        data = tomllib.loads(pathlib.Path(path).read_text())
        base = pathlib.Path(path).parent
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}; known: {sorted(known)}")
        for key in ("train", "valid"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
            files = data.get(key, [])
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise ValueError(f"{path}: {key} = {files!r} must be a file name or a list of file names")
            data[key] = [str(base / f) for f in files]
        for key in ("init", "out_dir", "task"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{path}: {key} = {data[key]!r} must be a string")
        devices = data.get("devices")
        if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
            raise ValueError(f"{path}: devices = {devices!r} must be a positive int (omit it for all local devices)")
        if data.get("model") is not None and not isinstance(data["model"], dict):
            raise ValueError(f"{path}: model = {data['model']!r} must be a table of UMAConfig fields")
        for key in ("init", "out_dir"):
            if data.get(key):
                data[key] = str(base / data[key])
        if "train" not in data or not data["train"]:
            raise ValueError(f"{path}: `train` (a list of dataset files) is required")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in data.items():
            default = defaults[key]
            expected = float if isinstance(default, float) else type(default)
            if default is None or default is dataclasses.MISSING or expected in (list, dict):
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                data[key] = float(value)
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"{path}: {key} = {value!r} must be a {expected.__name__} (default {default!r})")
        return cls(**data)


def trainable_filter(model: UMA, freeze: str):
    """A bool pytree: which leaves are trained (`eqx.partition` filter spec)."""
    spec = jax.tree.map(eqx.is_inexact_array, model)
    none = lambda m: jax.tree.map(lambda _: False, m)  # noqa: E731
    spec = eqx.tree_at(lambda m: m.references, spec, none(model.references))  # fitted, never trained
    match freeze:
        case "none":
            return spec
        case "backbone":
            return eqx.tree_at(lambda m: m.backbone, spec, none(model.backbone))
        case "embeddings":
            return eqx.tree_at(
                lambda m: (m.backbone.sphere_embedding, m.backbone.source_embedding, m.backbone.target_embedding),
                spec,
                (False, False, False),
            )
        case "all_but_experts":
            from ..nn import MoLELinear

            is_mole = lambda x: isinstance(x, MoLELinear)  # noqa: E731
            experts = jax.tree.map(
                lambda x: jax.tree.map(eqx.is_inexact_array, x) if is_mole(x) else jax.tree.map(lambda _: False, x),
                model.backbone.blocks,
                is_leaf=is_mole,
            )
            return eqx.tree_at(lambda m: m.backbone.blocks, none(spec), experts)
        case other:
            raise ValueError(f"unknown freeze={other!r}: use none, backbone, embeddings or all_but_experts")


def fit_element_references(model: UMA, records, task: str) -> UMA:
    """Least-squares per-element reference energies of `task` (others keep theirs)."""
    cfg = model.config
    d = cfg.dataset_index(task)
    rows = [r for r in records if r.task == task]
    counts = np.zeros((len(rows), cfg.max_num_elements))
    for i, r in enumerate(rows):
        np.add.at(counts[i], r.atoms.get_atomic_numbers(), 1)
    used = counts.sum(0) > 0
    e = np.array([r.energy for r in rows])
    coef, *_ = np.linalg.lstsq(counts[:, used], e, rcond=None)
    refs = np.array(model.references.element_references)
    refs[d] = 0.0
    refs[d, used] = coef
    return eqx.tree_at(
        lambda m: m.references.element_references, model, jnp.asarray(refs, model.references.element_references.dtype)
    )


def _to_device(batch: Batch) -> dict:
    """A batch as the dict that `loss_fn` and `error_sums` take (host arrays; placed by `shard_stack`)."""
    return {
        "graph": batch.graph,
        "energy": batch.energy,
        "forces": batch.forces,
        "stress": batch.stress,
        "has_forces": batch.has_forces,
        "has_stress": batch.has_stress,
    }


def stack_batches(chunks, config: UMAConfig, padding: PaddingSpec, dtype, mesh: Mesh) -> dict:
    """One data-parallel step's batch: packed chunks of records, one per device, stacked and sharded.

    **Arguments:**

    - `chunks`: at most `mesh.size` lists of records (from [`pack_batches`][]); devices left
        without records get a batch of padding only ([`empty_batch`][]).
    - `config`, `padding`, `dtype`: as for [`make_batch`][] (`padding` is per device).
    - `mesh`: a 1-D mesh ([`uma_eqx.parallel.batch_mesh`][]).

    **Returns:**

    The batch dicts stacked along a leading axis of size `mesh.size`, sharded over `mesh`.
    """
    chunks = list(chunks)
    if len(chunks) > mesh.size:
        raise ValueError(f"stack_batches got {len(chunks)} chunks for {mesh.size} devices; give at most one each.")
    chunks += [[]] * (mesh.size - len(chunks))
    made = {d: make_batch(chunk, config, padding, dtype) for d, chunk in enumerate(chunks) if chunk}
    if not made:
        raise ValueError("stack_batches got no records; give at least one non-empty chunk.")
    like = next(iter(made.values())).graph
    batches = [made[d] if d in made else empty_batch(padding, dtype, like) for d in range(mesh.size)]
    return shard_stack([_to_device(b) for b in batches], mesh)


def _steps(chunks: list, num_devices: int) -> list[list]:
    """Packed chunks grouped `num_devices` at a time: one group per optimiser step."""
    return [chunks[i : i + num_devices] for i in range(0, len(chunks), num_devices)]


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        min(cfg.warmup_steps, max(total_steps - 1, 1)),
        max(total_steps, 2),
        cfg.learning_rate * 0.02,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(schedule, weight_decay=cfg.weight_decay))


@eqx.filter_jit(donate="all-except-first")
def _train_step(static, params, opt_state, ema, batch, optimizer, weights, ema_decay, mesh):
    def f(p):
        return loss_over(eqx.combine(p, static), batch, weights, mesh)

    (loss, errs), grads = eqx.filter_value_and_grad(f, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = eqx.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return params, opt_state, ema, loss, errs


@eqx.filter_jit
def _eval_step(model, batch, mesh):
    return errors_over(model, batch, mesh)


def evaluate(
    model: UMA, records, padding, dtype, batch_size: int, devices: "int | list[Device] | None" = None
) -> dict[str, float]:
    """MAEs on `records`: energy (meV/atom), forces (meV/Å), stress (meV/Å³).

    Records are packed into batches of `padding`'s capacity, `devices` batches at a time
    (`None`: all local devices; see [`uma_eqx.parallel.resolve_devices`][]).
    """
    sums = {"e": 0.0, "f": 0.0, "s": 0.0, "n": 0, "nf": 0, "ns": 0}
    from ._data import count_edges

    count_edges(records, model.config)
    mesh = batch_mesh(devices)
    model = replicate(model, mesh)
    for group in _steps(pack_batches(records, padding, None), mesh.size):
        errs = _eval_step(model, stack_batches(group, model.config, padding, dtype, mesh), mesh)
        sums["e"] += float(errs["energy_abs_sum"])
        sums["f"] += float(errs["forces_abs_sum"])
        sums["s"] += float(errs["stress_abs_sum"])
        sums["n"] += int(errs["n_systems"])
        sums["nf"] += int(errs["n_force_components"])
        sums["ns"] += int(errs["n_stress_components"])
    return {
        "energy_mae_meV_per_atom": 1000 * sums["e"] / max(sums["n"], 1),
        "forces_mae_meV_per_A": 1000 * sums["f"] / max(sums["nf"], 1),
        "stress_mae_meV_per_A3": 1000 * sums["s"] / max(sums["ns"], 1) if sums["ns"] else float("nan"),
    }


def _save_state(path, step, epoch, params, opt_state, ema, rng_state):
    with open(path, "wb") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, "rng": rng_state}).encode() + b"\n")
        eqx.tree_serialise_leaves(f, (params, opt_state, ema))


def _load_state(path, like):
    with open(path, "rb") as f:
        meta = json.loads(f.readline())
        state = eqx.tree_deserialise_leaves(f, like)
    return meta, state


def train(cfg: TrainConfig, resume: bool = True, stop_after_epochs: int | None = None) -> tuple[UMA, dict]:
    """Train (or fine-tune) a model; returns the final model (EMA weights if enabled) and metrics.

    Writes to `cfg.out_dir`: `checkpoint.state` + `checkpoint.eqx` after every epoch (a run
    restarted with `resume=True` and the same config continues exactly where it stopped),
    `metrics.csv`, `metrics.json`, `learning_curve.png` and `model.eqx`.

    **Arguments:**

    - `cfg`: the [`TrainConfig`][].
    - `resume`: continue from `out_dir`'s checkpoint if there is one.
    - `stop_after_epochs`: stop this call after that many epochs in total (e.g. to split a run
      over several jobs); the schedule still spans `cfg.epochs`.
    """
    if cfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    out = pathlib.Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.init:
        model = load(cfg.init, dtype=dtype)
    elif cfg.model:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
        model = UMA(UMAConfig(**fields), dtype, key=jax.random.key(cfg.seed))
    else:
        raise ValueError("TrainConfig needs `init` (a .eqx model to fine-tune) or `model` (UMAConfig fields)")
    train_set = read_dataset(cfg.train, cfg.task)
    valid_set = read_dataset(cfg.valid, cfg.task) if cfg.valid else []
    check_records(train_set + valid_set, model.config)
    if cfg.fit_references:
        for task in sorted({r.task for r in train_set}):
            model = fit_element_references(model, train_set, task)
    mesh = batch_mesh(cfg.devices)
    # one packed batch per device and step: each holds about batch_size / devices structures
    padding = batch_capacity(train_set + valid_set, model.config, math.ceil(cfg.batch_size / mesh.size))
    # packed batches vary a little in count per epoch: the schedule uses the first epoch's count
    steps_per_epoch = len(_steps(pack_batches(train_set, padding, np.random.default_rng(cfg.seed)), mesh.size))
    optimizer = make_optimizer(cfg, cfg.epochs * steps_per_epoch)
    params, static = eqx.partition(model, trainable_filter(model, cfg.freeze))
    opt_state = optimizer.init(params)
    ema = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    rng = np.random.default_rng(cfg.seed)
    weights = LossWeights(cfg.energy_weight, cfg.forces_weight, cfg.stress_weight)
    step, start_epoch, history = 0, 0, []
    state_path, metrics_path = out / "checkpoint.state", out / "metrics.json"
    if resume and state_path.exists():
        model = load(out / "checkpoint.eqx", dtype=dtype)
        params, static = eqx.partition(model, trainable_filter(model, cfg.freeze))
        meta, (params, opt_state, ema) = _load_state(state_path, (params, opt_state, ema))
        step = meta["step"]
        rng.bit_generator.state = meta["rng"]
        history = json.loads(metrics_path.read_text()) if metrics_path.exists() else []
        start_epoch = meta["epoch"]
    from tqdm import tqdm

    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=step, disable=not cfg.progress, desc="train", unit="step")
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
    params, opt_state, ema = replicate((params, opt_state, ema), mesh)  # on every device, once
    for epoch in range(start_epoch, last_epoch):
        t0, losses = time.time(), []
        for group in _steps(pack_batches(train_set, padding, rng), mesh.size):
            batch = stack_batches(group, model.config, padding, dtype, mesh)
            params, opt_state, ema, loss, _ = _train_step(
                static, params, opt_state, ema, batch, optimizer, weights, cfg.ema_decay, mesh
            )
            losses.append(float(loss))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4g}", epoch=epoch + 1)
        current = eqx.combine(ema if cfg.ema_decay > 0 else params, static)
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(np.mean(losses)),
            "epoch_seconds": time.time() - t0,
        }
        if valid_set and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            metrics = evaluate(current, valid_set, padding, dtype, cfg.batch_size, cfg.devices)
            row.update({f"val_{k}": v for k, v in metrics.items()})
        history.append(row)
        save(out / "checkpoint.eqx", eqx.combine(params, static))
        _save_state(state_path, step, epoch + 1, params, opt_state, ema, rng.bit_generator.state)
        _write_metrics(out, history)
    bar.close()
    final = eqx.combine(ema if cfg.ema_decay > 0 else params, static)
    save(out / "model.eqx", final)
    return final, {"history": history}


def _write_metrics(out: pathlib.Path, history: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps(history, indent=1))
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [r["epoch"] for r in history]
    ax[0].semilogy(ep, [r["train_loss"] for r in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key, label in (
        ("val_energy_mae_meV_per_atom", "E MAE (meV/atom)"),
        ("val_forces_mae_meV_per_A", "F MAE (meV/Å)"),
    ):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ax[1].semilogy(*zip(*pts), marker="o", label=label)
    ax[1].set_xlabel("epoch")
    if ax[1].get_legend_handles_labels()[1]:  # no validation metrics: nothing to label
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)
    plt.close(fig)
