"""System embeddings: charge, spin and dataset."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._constants import CHARGE_INDEX_OFFSET, CHARGE_NUM_EMBEDDINGS, SPIN_INDEX_OFFSET, SPIN_NUM_EMBEDDINGS
from ._linear import Linear


class AbstractChargeSpinEmbedding(eqx.Module):
    """Embeds an integer charge or spin per system (`nn/embedding.py:ChgSpinEmbedding`)."""

    @abc.abstractmethod
    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        ...


class TableChargeSpinEmbedding(AbstractChargeSpinEmbedding):
    """`rand_emb`: a learned row per value; row = charge + 100 (201 rows) or spin (101 rows)."""

    weight: Float[Array, "rows channels"]
    index_offset: int = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(self, target: str, channels: int, dtype=None, trainable: bool = False, *, key):
        self.trainable = trainable
        rows = CHARGE_NUM_EMBEDDINGS if target == "charge" else SPIN_NUM_EMBEDDINGS
        self.index_offset = CHARGE_INDEX_OFFSET if target == "charge" else SPIN_INDEX_OFFSET
        self.weight = jax.random.normal(key, (rows, channels), jnp.float32 if dtype is None else dtype)

    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        w = self.weight if self.trainable else jax.lax.stop_gradient(self.weight)
        return w[value + self.index_offset]


class FourierChargeSpinEmbedding(AbstractChargeSpinEmbedding):
    """`pos_emb`: `[sin(2 pi v W), cos(2 pi v W)]`; for spin, `v = 0` embeds to zeros."""

    W: Float[Array, " half_channels"]
    is_spin: bool = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(self, target: str, channels: int, dtype=None, trainable: bool = False, *, key):
        self.trainable = trainable
        self.W = jax.random.normal(key, (channels // 2,), jnp.float32 if dtype is None else dtype)
        self.is_spin = target == "spin"

    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        w = self.W if self.trainable else jax.lax.stop_gradient(self.W)
        proj = value[:, None].astype(w.dtype) * w[None, :] * 2 * jnp.pi
        emb = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
        return jnp.where((value == 0)[:, None], 0.0, emb) if self.is_spin else emb


class LinearChargeSpinEmbedding(AbstractChargeSpinEmbedding):
    """`lin_emb`: `Linear(1 -> channels)(v)`; for spin, `v = 0` is replaced by -100."""

    linear: Linear
    is_spin: bool = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(self, target: str, channels: int, dtype=None, trainable: bool = False, *, key):
        self.trainable = trainable
        self.linear = Linear(1, channels, dtype=dtype, key=key)
        self.is_spin = target == "spin"

    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        if self.is_spin:
            value = jnp.where(value == 0, -100, value)
        lin = self.linear if self.trainable else jax.lax.stop_gradient(self.linear)
        return lin(value[:, None].astype(self.linear.weight.dtype))


class DatasetEmbedding(eqx.Module):
    """One learned row per dataset name (`nn/embedding.py:DatasetEmbedding`).

    `weight[k]` belongs to `config.datasets[k]`; dataset `d` uses the row of its mapped
    embedding name (`dataset_mapping[d]`), given as `row_of_dataset`.
    """

    weight: Float[Array, "datasets channels"]
    row_of_dataset: tuple[int, ...] = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(
        self, num_datasets: int, channels: int, row_of_dataset: tuple[int, ...], dtype=None, trainable: bool = False, *, key
    ):
        self.trainable = trainable
        self.weight = jax.random.normal(key, (num_datasets, channels), jnp.float32 if dtype is None else dtype)
        self.row_of_dataset = tuple(row_of_dataset)

    def __call__(self, dataset_index: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        rows = jnp.asarray(self.row_of_dataset)[dataset_index]
        w = self.weight if self.trainable else jax.lax.stop_gradient(self.weight)
        return w[rows]
