"""System embeddings: charge, spin and dataset."""

import abc
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._constants import CHARGE_INDEX_OFFSET, CHARGE_NUM_EMBEDDINGS, SPIN_INDEX_OFFSET, SPIN_NUM_EMBEDDINGS
from ._linear import Linear

ChargeSpinTarget = Literal["charge", "spin"]
"""What a charge/spin embedding embeds: the total charge or the spin multiplicity of a system."""


def _is_spin(layer: str, target: str) -> bool:
    """`target` checked once: `True` for `"spin"`, `False` for `"charge"`, anything else raises."""
    match target:
        case "charge":
            return False
        case "spin":
            return True
        case _:
            raise ValueError(f"{layer}: unknown target {target!r}; use 'charge' or 'spin'")


class AbstractChargeSpinEmbedding(eqx.Module):
    """Embeds an integer charge or spin per system.

    Port of `fairchem.core.models.uma.nn.embedding.ChgSpinEmbedding`; its three
    `embedding_type`s are the subclasses [`uma_eqx.nn.TableChargeSpinEmbedding`][] (`rand_emb`),
    [`uma_eqx.nn.FourierChargeSpinEmbedding`][] (`pos_emb`) and
    [`uma_eqx.nn.LinearChargeSpinEmbedding`][] (`lin_emb`). Each is built for one target,
    `"charge"` or `"spin"`, checked at construction.
    """

    @abc.abstractmethod
    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        """**Arguments:**

        - `value`: `(systems,)` integer charge (`-100..100`) or spin multiplicity (`0..100`;
          0 is "no spin given").

        **Returns:**

        `(systems, channels)` embeddings.
        """


class TableChargeSpinEmbedding(AbstractChargeSpinEmbedding):
    """A learned row per value (`embedding_type="rand_emb"`).

    Port of `ChgSpinEmbedding` with `rand_emb` (`torch.nn.Embedding`):
    `y = weight[v + offset]`, with 201 rows and `offset = 100` for charge (`v` in `-100..100`),
    101 rows and `offset = 0` for spin (`v` in `0..100`).
    """

    weight: Float[Array, "rows channels"]
    index_offset: int = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(self, target: ChargeSpinTarget, channels: int, dtype=None, trainable: bool = False, *, key):
        """**Arguments:**

        - `target`: `"charge"` or `"spin"`; sets the table's rows and the index offset. Any other
          value raises `ValueError`.
        - `channels`: embedding width (the backbone's `sphere_channels`).
        - `dtype`: float dtype of the table (default float32).
        - `trainable`: whether gradients reach the table (fairchem's `cs_emb_grad`; frozen by default,
          as in the released checkpoints).
        - `key`: PRNG key for the `N(0, 1)` initialisation (checkpoints overwrite it).
        """
        is_spin = _is_spin(type(self).__name__, target)
        rows = SPIN_NUM_EMBEDDINGS if is_spin else CHARGE_NUM_EMBEDDINGS
        self.index_offset = SPIN_INDEX_OFFSET if is_spin else CHARGE_INDEX_OFFSET
        self.trainable = trainable
        self.weight = jax.random.normal(key, (rows, channels), jnp.float32 if dtype is None else dtype)

    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        """**Arguments:**

        - `value`: `(systems,)` integer charge or spin, inside the table's range (the model
          checks the range once, at its entry).

        **Returns:**

        `(systems, channels)`: the rows `weight[value + index_offset]`.
        """
        w = self.weight if self.trainable else jax.lax.stop_gradient(self.weight)
        return w[value + self.index_offset]


class FourierChargeSpinEmbedding(AbstractChargeSpinEmbedding):
    """Random Fourier features of the value (`embedding_type="pos_emb"`).

    Port of `ChgSpinEmbedding` with `pos_emb`:
    `y = [sin(2 pi v W), cos(2 pi v W)]` with `W` of width `channels / 2`; for spin, `v = 0`
    ("no spin given") embeds to zeros.
    """

    W: Float[Array, " half_channels"]
    is_spin: bool = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(self, target: ChargeSpinTarget, channels: int, dtype=None, trainable: bool = False, *, key):
        """**Arguments:**

        - `target`: `"charge"` or `"spin"`; for spin, value 0 embeds to zeros. Any other value
          raises `ValueError`.
        - `channels`: embedding width, even (half sines, half cosines).
        - `dtype`: float dtype of `W` (default float32).
        - `trainable`: whether gradients reach `W` (fairchem's `cs_emb_grad`; frozen by default).
        - `key`: PRNG key for the `N(0, 1)` frequencies (checkpoints overwrite them).
        """
        self.is_spin = _is_spin(type(self).__name__, target)
        if channels % 2:
            raise ValueError(f"FourierChargeSpinEmbedding: channels={channels} must be even (half sin, half cos)")
        self.trainable = trainable
        self.W = jax.random.normal(key, (channels // 2,), jnp.float32 if dtype is None else dtype)

    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        """**Arguments:**

        - `value`: `(systems,)` integer charge or spin.

        **Returns:**

        `(systems, channels)`: sines then cosines (zeros for spin 0).
        """
        w = self.W if self.trainable else jax.lax.stop_gradient(self.W)
        proj = value[:, None].astype(w.dtype) * w[None, :] * 2 * jnp.pi
        emb = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
        return jnp.where((value == 0)[:, None], 0.0, emb) if self.is_spin else emb


class LinearChargeSpinEmbedding(AbstractChargeSpinEmbedding):
    """A linear map of the value (`embedding_type="lin_emb"`).

    Port of `ChgSpinEmbedding` with `lin_emb`: `y = Linear(1 -> channels)(v)`; for spin,
    `v = 0` ("no spin given") is replaced by -100 first.
    """

    linear: Linear
    is_spin: bool = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(self, target: ChargeSpinTarget, channels: int, dtype=None, trainable: bool = False, *, key):
        """**Arguments:**

        - `target`: `"charge"` or `"spin"`; for spin, value 0 is mapped as -100. Any other
          value raises `ValueError`.
        - `channels`: embedding width.
        - `dtype`: float dtype of the linear (default float32).
        - `trainable`: whether gradients reach the linear (fairchem's `cs_emb_grad`; frozen by default).
        - `key`: PRNG key for the linear's initialisation (checkpoints overwrite it).
        """
        self.is_spin = _is_spin(type(self).__name__, target)
        self.trainable = trainable
        self.linear = Linear(1, channels, dtype=dtype, key=key)

    def __call__(self, value: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        """**Arguments:**

        - `value`: `(systems,)` integer charge or spin.

        **Returns:**

        `(systems, channels)`: `linear(value)`.
        """
        if self.is_spin:
            value = jnp.where(value == 0, -100, value)
        lin = self.linear if self.trainable else jax.lax.stop_gradient(self.linear)
        return lin(value[:, None].astype(self.linear.weight.dtype))


class DatasetEmbedding(eqx.Module):
    """One learned row per dataset embedding name.

    Port of `fairchem.core.models.uma.nn.embedding.DatasetEmbedding`: `y = weight[row(d)]`.
    `weight[k]` belongs to `config.datasets[k]`; dataset `d` uses the row of its mapped
    embedding name (`dataset_mapping[d]`), given as `row_of_dataset`.
    """

    weight: Float[Array, "datasets channels"]
    row_of_dataset: tuple[int, ...] = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)

    def __init__(
        self,
        num_datasets: int,
        channels: int,
        row_of_dataset: tuple[int, ...],
        dtype=None,
        trainable: bool = False,
        *,
        key,
    ):
        """**Arguments:**

        - `num_datasets`: rows of the table (one per dataset name, `len(config.datasets)`).
        - `channels`: embedding width.
        - `row_of_dataset`: for each dataset index, the table row it reads (a dataset may share
          another's embedding through fairchem's `dataset_mapping`).
        - `dtype`: float dtype of the table (default float32).
        - `trainable`: whether gradients reach the table (fairchem's `dataset_emb_grad`).
        - `key`: PRNG key for the `N(0, 1)` initialisation (checkpoints overwrite it).
        """
        self.trainable = trainable
        self.weight = jax.random.normal(key, (num_datasets, channels), jnp.float32 if dtype is None else dtype)
        self.row_of_dataset = tuple(row_of_dataset)

    def __call__(self, dataset_index: Int[Array, " systems"]) -> Float[Array, "systems channels"]:
        """**Arguments:**

        - `dataset_index`: `(systems,)` index of each system's dataset in `config.datasets`.

        **Returns:**

        `(systems, channels)`: the row of each system's dataset.
        """
        rows = jnp.asarray(self.row_of_dataset)[dataset_index]
        w = self.weight if self.trainable else jax.lax.stop_gradient(self.weight)
        return w[rows]
