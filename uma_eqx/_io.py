"""Torch-free `.eqx` model files: a JSON header with the config, then Equinox leaves."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp

from ._config import UMAConfig
from ._heads import EnergyReferences
from ._potential import UMA, merge_experts

MAGIC = b"UMA-EQX\n"
FORMAT_VERSION = 1


def save(path: str | os.PathLike, model: UMA) -> None:
    """Write `model` to `path` (`.eqx`): magic line, header length, JSON header, leaves.

    The header records the format version, the full [`UMAConfig`][], the dtype and whether the
    experts were merged; the leaves are written with `eqx.tree_serialise_leaves`.
    """
    header = {
        "format": "uma_eqx",
        "format_version": FORMAT_VERSION,
        "dtype": jnp.dtype(model.dtype).name,
        "references_dtype": jnp.dtype(model.references.energy_rmsd.dtype).name,
        "merged": model.is_merged,
        "config": json.loads(model.config.to_json()),
    }
    blob = json.dumps(header, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        eqx.tree_serialise_leaves(f, model)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of an `.eqx` model file (config, dtype, format version)."""
    with open(path, "rb") as f:
        return _read_header(f, path)


def _read_header(f, path) -> dict:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise ValueError(f"{path!r} is not a uma_eqx model file (no {MAGIC!r} header); convert a .pt with uma_eqx.convert")
    size = int.from_bytes(f.read(8), "little")
    try:
        header = json.loads(f.read(size))
    except ValueError as e:
        raise ValueError(f"{path!r}: corrupt header ({e})") from e
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} has format version {header['format_version']}; upgrade uma_eqx to read it")
    return header


def load(path: str | os.PathLike, dtype=None) -> UMA:
    """Read a model written by [`save`][]; torch is not needed.

    **Arguments:**

    - `path`: the `.eqx` file.
    - `dtype`: cast the floating-point leaves (e.g. `jnp.float64` for a float64 model, which
      needs `jax_enable_x64`); default: as stored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path!r}")
    with open(path, "rb") as f:
        header = _read_header(f, path)
        config = UMAConfig.from_json(json.dumps(header["config"]))
        stored = jnp.dtype(header["dtype"])
        skeleton = eqx.filter_eval_shape(UMA, config, stored, key=jax.random.key(0))
        ref_dtype = jnp.dtype(header.get("references_dtype", header["dtype"]))
        if ref_dtype == jnp.float64 and not jax.config.jax_enable_x64:
            ref_dtype = jnp.dtype(jnp.float32)  # read as float32 when JAX runs without x64
        refs = eqx.filter_eval_shape(EnergyReferences, len(config.datasets), config.max_num_elements, ref_dtype)
        skeleton = eqx.tree_at(lambda m: m.references, skeleton, refs)
        if header.get("merged"):
            skeleton = eqx.filter_eval_shape(merge_experts, skeleton, jnp.zeros(config.num_experts, stored))
        try:
            model = eqx.tree_deserialise_leaves(f, skeleton)
        except Exception as e:
            raise ValueError(f"{path!r}: truncated or corrupt model leaves ({e})") from e
    if dtype is not None:
        if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError("dtype=float64 needs jax.config.update('jax_enable_x64', True) first")
        refs = model.references
        model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
        # energy references keep their stored precision (float64 when saved from a float64 run)
        model = eqx.tree_at(lambda m: m.references, model, refs)
    return model
