"""fairchem state dict -> `UMA`: a weightless skeleton filled with `eqx.tree_at`, strictly.

The key table below is the whole converter: each entry names the Equinox leaf (a path from the
`UMA` root), the fairchem key(s) it is built from, and how (almost always: as is; Equinox and
torch both store linear weights `(out, in)`).
"""

import dataclasses
import os
import re
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._config import UMAConfig
from .._heads import EnergyReferences
from .._potential import UMA
from ._checkpoint import FairchemCheckpoint, load_pytorch_checkpoint
from ._config import _parse_heads, config_from_pytorch_checkpoint, parse_tasks


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One leaf of the model and the checkpoint tensors that fill it."""

    path: str
    keys: tuple[str, ...]
    combine: Callable[[list[np.ndarray]], np.ndarray] = lambda xs: xs[0]


def _x64_enabled() -> bool:
    """Whether `jax_enable_x64` is on now."""
    return jax.config.jax_enable_x64  # pyright: ignore[reportAttributeAccessIssue]  # jax adds config options as attributes at run time


def _resolve(root, path: str):
    obj = root
    for part in re.findall(r"[A-Za-z_][A-Za-z_0-9]*|\[\d+\]", path):
        obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
    return obj


def derived_buffer_keys(config: UMAConfig) -> tuple[str, ...]:
    """Checkpoint keys that are buffers derived from the architecture, not parameters.

    `backbone.Jd_l` are fairchem's constant Euler-path Wigner tables (`models/uma/Jd.pt`);
    `n_averaged` is the EMA counter.
    """
    return ("n_averaged", *(f"backbone.Jd_{l}" for l in range(config.lmax + 1)))


def _radial(path: str, prefix: str, num_linears: int) -> list[KeyEntry]:
    out = []
    for i in range(num_linears):
        out += [
            KeyEntry(f"{path}.linears[{i}].weight", (f"{prefix}.net.{3 * i}.weight",)),
            KeyEntry(f"{path}.linears[{i}].bias", (f"{prefix}.net.{3 * i}.bias",)),
        ]
        if i < num_linears - 1:
            out += [
                KeyEntry(f"{path}.norms[{i}].weight", (f"{prefix}.net.{3 * i + 1}.weight",)),
                KeyEntry(f"{path}.norms[{i}].bias", (f"{prefix}.net.{3 * i + 1}.bias",)),
            ]
    return out


def _norm(config: UMAConfig, path: str, prefix: str) -> list[KeyEntry]:
    if config.norm_type == "layer_norm_sh":
        return [
            KeyEntry(f"{path}.norm_l0_weight", (f"{prefix}.norm_l0.weight",)),
            KeyEntry(f"{path}.norm_l0_bias", (f"{prefix}.norm_l0.bias",)),
            KeyEntry(f"{path}.affine_weight", (f"{prefix}.affine_weight",)),
        ]
    return [
        KeyEntry(f"{path}.affine_weight", (f"{prefix}.affine_weight",)),
        KeyEntry(f"{path}.affine_bias", (f"{prefix}.affine_bias",)),
    ]


def _charge_spin(config: UMAConfig, path: str, prefix: str) -> list[KeyEntry]:
    match config.chg_spin_emb_type:
        case "rand_emb":
            return [KeyEntry(f"{path}.weight", (f"{prefix}.rand_emb.weight",))]
        case "pos_emb":
            return [KeyEntry(f"{path}.W", (f"{prefix}.W",))]
        case "lin_emb":
            return [
                KeyEntry(f"{path}.linear.weight", (f"{prefix}.lin_emb.weight",)),
                KeyEntry(f"{path}.linear.bias", (f"{prefix}.lin_emb.bias",)),
            ]
    raise ValueError(f"unknown chg_spin_emb_type {config.chg_spin_emb_type!r}")


def key_table(config: UMAConfig, heads: dict) -> list[KeyEntry]:
    """The full fairchem-key -> Equinox-leaf table for `config` (`heads` from the model config)."""
    t: list[KeyEntry] = [
        KeyEntry("backbone.sphere_embedding", ("backbone.sphere_embedding.weight",)),
        *_charge_spin(config, "backbone.charge_embedding", "backbone.charge_embedding"),
        *_charge_spin(config, "backbone.spin_embedding", "backbone.spin_embedding"),
        KeyEntry("backbone.mix_csd.weight", ("backbone.mix_csd.weight",)),
        KeyEntry("backbone.mix_csd.bias", ("backbone.mix_csd.bias",)),
        KeyEntry("backbone.source_embedding", ("backbone.source_embedding.weight",)),
        KeyEntry("backbone.target_embedding", ("backbone.target_embedding.weight",)),
        *_radial("backbone.edge_degree_rad", "backbone.edge_degree_embedding.rad_func", 3),
        *_norm(config, "backbone.norm", "backbone.norm"),
    ]
    if config.dataset_embedding_names is not None:
        keys = tuple(f"backbone.dataset_embedding.dataset_emb_dict.{d}.weight" for d in config.datasets)
        t.append(KeyEntry("backbone.dataset_embedding.weight", keys, lambda xs: np.concatenate(xs, axis=0)))
    if config.num_experts > 0:
        for i, j in enumerate((0, 2, 4)):
            t += [
                KeyEntry(f"backbone.router.routing_mlp[{i}].weight", (f"backbone.routing_mlp.{j}.weight",)),
                KeyEntry(f"backbone.router.routing_mlp[{i}].bias", (f"backbone.routing_mlp.{j}.bias",)),
            ]
        if config.use_composition_embedding:
            t.append(KeyEntry("backbone.router.composition_embedding", ("backbone.composition_embedding.weight",)))
    moe = set(config.moe_layers)
    for i in range(config.num_layers):
        p, k = f"backbone.blocks[{i}]", f"backbone.blocks.{i}"
        w = "weights" if i in moe else "weight"
        t += _norm(config, f"{p}.norm_1", f"{k}.norm_1") + _norm(config, f"{p}.norm_2", f"{k}.norm_2")
        for conv in ("so2_conv_1", "so2_conv_2"):
            cp, ck = f"{p}.edge_wise.{conv}", f"{k}.edge_wise.{conv}"
            t += [
                KeyEntry(f"{cp}.fc_m0.{w}", (f"{ck}.fc_m0.{w}",)),
                KeyEntry(f"{cp}.fc_m0.bias", (f"{ck}.fc_m0.bias",)),
            ]
            t += [KeyEntry(f"{cp}.fc_m[{m}].{w}", (f"{ck}.so2_m_conv.{m}.fc.{w}",)) for m in range(config.mmax)]
            if conv == "so2_conv_1":
                t += _radial(f"{cp}.rad", f"{ck}.rad_func", 3)
        ap, ak = f"{p}.atom_wise", f"{k}.atom_wise"
        if config.ff_type == "spectral":
            t += [
                KeyEntry(f"{ap}.scalar_mlp.weight", (f"{ak}.scalar_mlp.0.weight",)),
                KeyEntry(f"{ap}.scalar_mlp.bias", (f"{ak}.scalar_mlp.0.bias",)),
            ]
            for lin in ("so3_linear_1", "so3_linear_2"):
                t += [
                    KeyEntry(f"{ap}.{lin}.weight", (f"{ak}.{lin}.weight",)),
                    KeyEntry(f"{ap}.{lin}.bias", (f"{ak}.{lin}.bias",)),
                ]
        else:
            t += [
                KeyEntry(f"{ap}.grid_mlp[{n}].weight", (f"{ak}.grid_mlp.{j}.weight",)) for n, j in enumerate((0, 2, 4))
            ]
    hk = f"output_heads.{heads['energy_head_name']}" + (".head" if heads["head_wrapped"] else "")
    hw = "weights" if config.head_dataset_experts is not None else "weight"
    if config.head_type == "mlp_energy":
        for n, j in enumerate((0, 2, 4)):
            t += [
                KeyEntry(f"energy_head.layers[{n}].{hw}", (f"{hk}.energy_block.{j}.{hw}",)),
                KeyEntry(f"energy_head.layers[{n}].bias", (f"{hk}.energy_block.{j}.bias",)),
            ]
    else:
        t += [
            KeyEntry(f"energy_head.layer.{hw}", (f"{hk}.energy_block.{hw}",)),
            KeyEntry("energy_head.layer.bias", (f"{hk}.energy_block.bias",)),
        ]
    if config.direct_forces:
        fk = f"output_heads.{heads['force_head_name']}"
        t += [
            KeyEntry("force_head.linear.weight", (f"{fk}.linear.weight",)),
            KeyEntry("force_head.linear.bias", (f"{fk}.linear.bias",)),
        ]
    return t


def _references(config: UMAConfig, tasks: dict, dtype) -> dict[str, np.ndarray]:
    n = len(config.datasets)
    mean, rmsd = np.zeros(n), np.ones(n)
    refs = np.zeros((n, config.max_num_elements))
    for i, ds in enumerate(config.datasets):
        entry = tasks.get(ds, {})
        if "energy" in entry:
            mean[i], rmsd[i] = entry["energy"]["mean"], entry["energy"]["rmsd"]
        er = entry.get("element_references")
        if er is not None:
            if er.shape != (config.max_num_elements,):
                raise ValueError(
                    f"task {ds}_energy: element_references has shape {er.shape}, expected ({config.max_num_elements},)"
                )
            refs[i] = er
    return {"references.energy_mean": mean, "references.energy_rmsd": rmsd, "references.element_references": refs}


def convert_pytorch_state_dict(
    state_dict: dict[str, np.ndarray],
    config: UMAConfig,
    heads: dict,
    tasks: dict | None = None,
    dtype=jnp.float32,
) -> UMA:
    """Build a `UMA` from a fairchem (EMA) state dict, strictly.

    Builds a weightless skeleton with `eqx.filter_eval_shape`, checks every tensor against the
    leaf it fills (a mismatch names the key and both shapes), injects all of them with one
    `eqx.tree_at`, and fails if any checkpoint key is left unused (other than
    [`derived_buffer_keys`][]) or any leaf is left unfilled.

    **Arguments:**

    - `state_dict`: keys without the `module.` prefix, numpy values.
    - `config`: the architecture (see `config_from_pytorch_checkpoint`).
    - `heads`: the parsed head config (`_parse_heads(model_config["heads"])`).
    - `tasks`: parsed tasks (`parse_tasks(tasks_config)`) for normalisers and element references.
    - `dtype`: `jnp.float32` or `jnp.float64` (float64 needs `jax_enable_x64`).
    """
    if dtype == jnp.float64 and not _x64_enabled():
        raise ValueError("dtype=float64 needs jax.config.update('jax_enable_x64', True) first")
    skeleton = eqx.filter_eval_shape(UMA, config, dtype, key=jax.random.key(0))
    ref_dtype = jnp.float64 if _x64_enabled() else jnp.float32
    skeleton = eqx.tree_at(
        lambda m: m.references,
        skeleton,
        eqx.filter_eval_shape(EnergyReferences, len(config.datasets), config.max_num_elements, ref_dtype),
    )
    table = key_table(config, heads)
    used: set[str] = set()
    paths, values = [], []
    for entry in table:
        missing = [k for k in entry.keys if k not in state_dict]
        if missing:
            raise ValueError(f"checkpoint is missing key {missing[0]!r} (needed for {entry.path})")
        value = entry.combine([np.asarray(state_dict[k]) for k in entry.keys])
        expected = _resolve(skeleton, entry.path)
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(
                f"shape mismatch for {entry.keys[0]!r} -> {entry.path}: expected {tuple(expected.shape)}, "
                f"found {tuple(value.shape)} (checkpoint and config disagree)"
            )
        used.update(entry.keys)
        paths.append(entry.path)
        values.append(jnp.asarray(value, dtype=expected.dtype))
    extra = sorted(set(state_dict) - used - set(derived_buffer_keys(config)))
    if extra:
        raise ValueError(f"checkpoint has unexpected key(s) {extra[:5]} not used by a {config.num_layers}-layer UMA")
    # references keep full precision where JAX allows it (they are float64 in the checkpoint).
    ref_dtype = jnp.float64 if _x64_enabled() else jnp.float32
    for path, value in _references(config, tasks or {}, dtype).items():
        paths.append(path)
        values.append(jnp.asarray(value, dtype=ref_dtype))
    model = eqx.tree_at(lambda m: [_resolve(m, p) for p in paths], skeleton, values)
    unfilled = [leaf for leaf in jax.tree.leaves(model) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unfilled:
        raise ValueError(f"{len(unfilled)} model leaves were not filled by the checkpoint (first: {unfilled[0]})")
    return model


@dataclasses.dataclass
class WeightReport:
    """Per-key verification of a converted model against its checkpoint."""

    rows: list[tuple[str, str, tuple[int, ...], float]]
    unused_keys: list[str]
    derived_keys: list[str]

    @property
    def ok(self) -> bool:
        return not self.unused_keys and all(err == 0.0 for *_, err in self.rows)

    def __str__(self) -> str:
        lines = [f"{'fairchem key':70s} {'equinox leaf':60s} {'shape':18s} max|diff|"]
        for key, path, shape, err in self.rows:
            lines.append(f"{key:70s} {path:60s} {str(shape):18s} {err:.1e}")
        lines.append(f"{len(self.rows)} tensors checked; derived buffers skipped: {self.derived_keys}")
        lines.append("unused checkpoint keys: " + (", ".join(self.unused_keys) if self.unused_keys else "none"))
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def verify_weight_loading(model: UMA, checkpoint: "FairchemCheckpoint | str | os.PathLike") -> WeightReport:
    """Compare every leaf of `model` with the checkpoint tensor(s) it came from.

    The comparison is exact (after casting the checkpoint tensor to the model's dtype).
    """
    if not isinstance(checkpoint, FairchemCheckpoint):
        checkpoint = load_pytorch_checkpoint(checkpoint)
    config = model.config
    heads = _parse_heads(checkpoint.model_config["heads"])
    sd = checkpoint.ema_state_dict
    rows, used = [], set()
    for entry in key_table(config, heads):
        leaf = np.asarray(_resolve(model, entry.path))
        ref = entry.combine([sd[k] for k in entry.keys]).astype(leaf.dtype)
        err = float(np.max(np.abs(leaf - ref))) if leaf.size else 0.0
        if leaf.shape != ref.shape:
            err = float("inf")
        rows.append(
            (
                ",".join(entry.keys) if len(entry.keys) < 3 else f"{entry.keys[0]} (+{len(entry.keys) - 1})",
                entry.path,
                tuple(leaf.shape),
                err,
            )
        )
        used.update(entry.keys)
    derived = [k for k in derived_buffer_keys(config) if k in sd]
    unused = sorted(set(sd) - used - set(derived))
    return WeightReport(rows, unused, derived)


def load_fairchem_checkpoint(path: "str | os.PathLike", dtype=jnp.float32, *, verify: bool = True) -> UMA:
    """Read, convert and (by default) verify a fairchem UMA inference checkpoint.

    Uses the EMA weights, as fairchem's inference does. torch is needed only here.

    **Arguments:**

    - `path`: a fairchem `.pt` inference checkpoint (e.g. `uma-s-1p1.pt`).
    - `dtype`: `jnp.float32` (default) or `jnp.float64`.
    - `verify`: re-check every leaf against the checkpoint after conversion.

    **Returns:**

    A [`UMA`][] model.
    """
    ckpt = load_pytorch_checkpoint(path)
    config = config_from_pytorch_checkpoint(ckpt)
    heads = _parse_heads(ckpt.model_config["heads"])
    model = convert_pytorch_state_dict(ckpt.ema_state_dict, config, heads, parse_tasks(ckpt.tasks_config), dtype)
    if verify:
        report = verify_weight_loading(model, ckpt)
        if not report.ok:
            raise ValueError(f"weight verification failed for {os.fspath(path)!r}:\n{report}")
    return model
