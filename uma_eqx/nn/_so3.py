"""Node-wise SO(3) layers: `SO3Linear`, equivariant norms and the gate activation."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._constants import NORM_EPS
from ..so3 import coefficient_layout


class SO3Linear(eqx.Module):
    """Degree-wise linear map of node features, bias on `l = 0` only.

    Port of `fairchem.core.models.uma.nn.so3_layers.SO3_Linear`: `y_{lm} = W_l x_{lm}` for every
    order `m` of degree `l`, plus `b` on `y_{00}` (a bias on `l > 0` would break equivariance).
    """

    weight: Float[Array, "lmax_plus_1 out in"]
    bias: Float[Array, " out"]
    lmax: int = eqx.field(static=True)

    def __init__(self, in_features: int, out_features: int, lmax: int, dtype=None, *, key):
        """**Arguments:**

        - `in_features`, `out_features`: input and output channels.
        - `lmax`: maximum degree; the layer holds one `(out, in)` weight per degree `0..lmax`.
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for the weights, `U(-1/sqrt(in), 1/sqrt(in))` (bias 0, as fairchem;
          checkpoints overwrite both).
        """
        dtype = jnp.float32 if dtype is None else dtype
        bound = in_features**-0.5
        self.weight = jax.random.uniform(key, (lmax + 1, out_features, in_features), dtype, -bound, bound)
        self.bias = jnp.zeros(out_features, dtype)
        self.lmax = lmax

    def __call__(self, x: Float[Array, "*rows coeffs in"]) -> Float[Array, "*rows coeffs out"]:
        """**Arguments:**

        - `x`: `(*rows, coeffs, in)` l-major features with `coeffs = (lmax+1)**2`.

        **Returns:**

        `(*rows, coeffs, out)`.
        """
        w = self.weight[coefficient_layout(self.lmax, self.lmax).l_of_coeff]
        y = jnp.einsum("...mi,moi->...mo", x, w)
        return y.at[..., 0, :].add(self.bias)


def _balance_weights(l_of: np.ndarray, num_degrees: int, dtype) -> np.ndarray:
    # `1 / (2l+1) / num_degrees` computed in the run's dtype, as fairchem builds its buffer
    # (float32 in float32 runs, float64 in float64 runs).
    ft = np.dtype(dtype).type
    return (ft(1.0) / (2 * l_of + 1).astype(ft) / ft(num_degrees)).astype(ft)


class AbstractEquivariantNorm(eqx.Module):
    """Normalisation of `[coeffs, channels]` features that commutes with rotations.

    Port of the `norm_type` choices of `fairchem.core.models.uma.nn.layer_norm.get_normalization_layer`:
    [`uma_eqx.nn.EquivariantRMSNorm`][] (`rms_norm_sh`), [`uma_eqx.nn.EquivariantLayerNorm`][]
    (`layer_norm`) and [`uma_eqx.nn.EquivariantLayerNormSH`][] (`layer_norm_sh`), all built as
    `(lmax, channels, dtype=None)`.
    """

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "*rows coeffs channels"]) -> Float[Array, "*rows coeffs channels"]:
        """**Arguments:**

        - `x`: `(*rows, coeffs, channels)` l-major features, `coeffs = (lmax+1)**2`.

        **Returns:**

        `(*rows, coeffs, channels)`, normalised per row.
        """


class EquivariantRMSNorm(AbstractEquivariantNorm):
    """Degree-balanced RMS norm (`norm_type="rms_norm_sh"`).

    Port of `fairchem.core.models.uma.nn.layer_norm.EquivariantRMSNormArraySphericalHarmonicsV2`
    (centering, component normalisation, `std_balance_degrees`): subtract the channel mean of
    `l = 0`, then
    `n = mean_c sum_i w_i x_ic^2` with `w_i = 1 / ((2l+1)(lmax+1))`, and
    `y = x (n + eps)^-1/2 * affine_weight[l]`, plus `affine_bias` on `l = 0`.
    """

    affine_weight: Float[Array, "lmax_plus_1 channels"]
    affine_bias: Float[Array, " channels"]
    lmax: int = eqx.field(static=True)

    def __init__(self, lmax: int, channels: int, dtype=None):
        """**Arguments:**

        - `lmax`: maximum degree of the features.
        - `channels`: number of channels.
        - `dtype`: float dtype of the affine parameters (default float32; weights 1, biases 0).
        """
        dtype = jnp.float32 if dtype is None else dtype
        self.affine_weight = jnp.ones((lmax + 1, channels), dtype)
        self.affine_bias = jnp.zeros(channels, dtype)
        self.lmax = lmax

    def __call__(self, x: Float[Array, "*rows coeffs channels"]) -> Float[Array, "*rows coeffs channels"]:
        """**Arguments:**

        - `x`: `(*rows, coeffs, channels)` l-major features, `coeffs = (lmax+1)**2`.

        **Returns:**

        `(*rows, coeffs, channels)`, normalised per row.
        """
        l_of = coefficient_layout(self.lmax, self.lmax).l_of_coeff
        x0 = x[..., :1, :]
        x = jnp.concatenate([x0 - jnp.mean(x0, axis=-1, keepdims=True), x[..., 1:, :]], axis=-2)
        balance = _balance_weights(l_of, self.lmax + 1, x.dtype)
        norm = jnp.einsum("...ic,i->...c", x**2, jnp.asarray(balance))
        norm = jnp.mean(norm, axis=-1, keepdims=True)[..., None, :]  # [..., 1, 1]
        y = x * (jax.lax.rsqrt(norm + NORM_EPS) * self.affine_weight[l_of])
        return y.at[..., 0, :].add(self.affine_bias)


class EquivariantLayerNorm(AbstractEquivariantNorm):
    """Per-degree layer norm (`norm_type="layer_norm"`).

    Port of `fairchem.core.models.uma.nn.layer_norm.EquivariantLayerNormArray` (component
    normalisation): each degree is normalised by its own mean square over m and channels,
    `y_l = x_l (mean_{m,c} x_{lmc}^2 + eps)^-1/2 * affine_weight[l]`; `l = 0` is centred over
    channels first and gets `affine_bias`.
    """

    affine_weight: Float[Array, "lmax_plus_1 channels"]
    affine_bias: Float[Array, " channels"]
    lmax: int = eqx.field(static=True)

    def __init__(self, lmax: int, channels: int, dtype=None):
        """**Arguments:**

        - `lmax`: maximum degree of the features.
        - `channels`: number of channels.
        - `dtype`: float dtype of the affine parameters (default float32; weights 1, biases 0).
        """
        dtype = jnp.float32 if dtype is None else dtype
        self.affine_weight = jnp.ones((lmax + 1, channels), dtype)
        self.affine_bias = jnp.zeros(channels, dtype)
        self.lmax = lmax

    def __call__(self, x: Float[Array, "*rows coeffs channels"]) -> Float[Array, "*rows coeffs channels"]:
        """**Arguments:**

        - `x`: `(*rows, coeffs, channels)` l-major features, `coeffs = (lmax+1)**2`.

        **Returns:**

        `(*rows, coeffs, channels)`, normalised per row.
        """
        out = []
        for l in range(self.lmax + 1):
            f = x[..., l * l : (l + 1) ** 2, :]
            if l == 0:
                f = f - jnp.mean(f, axis=-1, keepdims=True)
            n = jnp.mean(jnp.mean(f**2, axis=-2, keepdims=True), axis=-1, keepdims=True)
            f = f * (jax.lax.rsqrt(n + NORM_EPS) * self.affine_weight[l])
            if l == 0:
                f = f + self.affine_bias
            out.append(f)
        return jnp.concatenate(out, axis=-2)


class EquivariantLayerNormSH(AbstractEquivariantNorm):
    """LayerNorm on `l = 0`, one shared degree-balanced RMS over `l > 0` (`"layer_norm_sh"`).

    Port of `fairchem.core.models.uma.nn.layer_norm.EquivariantLayerNormArraySphericalHarmonics`
    (`std_balance_degrees=True`, component normalisation): `y_0 = LayerNorm(x_0)` over channels,
    and for `l >= 1`, `y_l = x_l (n + eps)^-1/2 * affine_weight[l-1]` with
    `n = mean_c sum_{i: l_i >= 1} w_i x_ic^2`, `w_i = 1 / ((2 l_i + 1) lmax)`.
    """

    norm_l0_weight: Float[Array, " channels"]
    norm_l0_bias: Float[Array, " channels"]
    affine_weight: Float[Array, "lmax channels"]
    lmax: int = eqx.field(static=True)

    def __init__(self, lmax: int, channels: int, dtype=None):
        """**Arguments:**

        - `lmax`: maximum degree of the features.
        - `channels`: number of channels.
        - `dtype`: float dtype of the affine parameters (default float32; weights 1, biases 0).
        """
        dtype = jnp.float32 if dtype is None else dtype
        self.norm_l0_weight = jnp.ones(channels, dtype)
        self.norm_l0_bias = jnp.zeros(channels, dtype)
        self.affine_weight = jnp.ones((max(lmax, 0), channels), dtype)
        self.lmax = lmax

    def __call__(self, x: Float[Array, "*rows coeffs channels"]) -> Float[Array, "*rows coeffs channels"]:
        """**Arguments:**

        - `x`: `(*rows, coeffs, channels)` l-major features, `coeffs = (lmax+1)**2`.

        **Returns:**

        `(*rows, coeffs, channels)`, normalised per row.
        """
        x0 = x[..., :1, :]
        mean = jnp.mean(x0, axis=-1, keepdims=True)
        var = jnp.mean((x0 - mean) ** 2, axis=-1, keepdims=True)
        out = [(x0 - mean) * jax.lax.rsqrt(var + NORM_EPS) * self.norm_l0_weight + self.norm_l0_bias]
        if self.lmax > 0:
            l_of = coefficient_layout(self.lmax, self.lmax).l_of_coeff[1:]
            balance = _balance_weights(l_of, self.lmax, x.dtype)
            rest = x[..., 1:, :]
            n = jnp.einsum("...ic,i->...c", rest**2, jnp.asarray(balance))
            n = jnp.mean(n, axis=-1, keepdims=True)[..., None, :]
            out.append(rest * (jax.lax.rsqrt(n + NORM_EPS) * self.affine_weight[l_of - 1]))
        return jnp.concatenate(out, axis=-2)


def _gate(sig: Float[Array, "*rows lmax channels"], x: Float[Array, "*rows k channels"], l_of_row: np.ndarray):
    # SiLU on a leading l = 0 row, sigmoid gate `sig[l-1]` on every row of degree l >= 1.
    # Static slices (fused into the product) rather than a gather of the gate rows.
    silu_first = int(l_of_row[0]) == 0
    gated = l_of_row[1:] if silu_first else l_of_row
    g = jnp.stack([sig[..., int(l) - 1, :] for l in gated], axis=-2) if len(gated) else None
    if g is None:  # only with a leading l = 0 row (`l_of_row[0]` exists)
        return jax.nn.silu(x)
    if not silu_first:
        return x * g
    x0, rest = jnp.split(x, [1], axis=-2)  # one split: its transpose is one concatenation
    return jnp.concatenate([jax.nn.silu(x0), rest * g], axis=-2)


def gate_activation(
    gates: Float[Array, "*rows lmax_times_channels"],
    x: Float[Array, "*rows coeffs channels"],
    l_of_row: np.ndarray,
) -> Float[Array, "*rows coeffs channels"]:
    """SiLU on the first (`l = 0`) row, `sigmoid(gate[l-1])` times every row of degree `l >= 1`.

    Port of `fairchem.core.models.uma.nn.activation.GateActivation`: `y_0 = silu(x_0)` and
    `y_{lm} = sigmoid(gates[l-1]) x_{lm}` for `l >= 1`. `l_of_row` gives the degree of each row
    (l-major for node features, m-major in the edge frame, which is fairchem's `m_prime=True`).
    A block of rows without `l = 0` (e.g. one `m != 0` block of the edge frame) is gated
    throughout.

    **Arguments:**

    - `gates`: `(*rows, lmax * channels)` gate pre-activations, degree-major (`gates[l-1]` is
      the slice `(l-1) channels : l channels`).
    - `x`: `(*rows, k, channels)` features whose `k` rows have degrees `l_of_row`.
    - `l_of_row`: `(k,)` static numpy degrees of the rows of `x`.

    **Returns:**

    `(*rows, k, channels)`.
    """
    return gate_activation_blocks(gates, [x], (l_of_row,))[0]


def gate_activation_blocks(
    gates: Float[Array, "*rows lmax_times_channels"],
    blocks: list[Float[Array, "*rows _ channels"]],
    l_of_rows: tuple[np.ndarray, ...],
) -> list[Float[Array, "*rows _ channels"]]:
    """[`uma_eqx.nn.gate_activation`][] of each block of rows (degrees `l_of_rows[k]`), sigmoid taken once.

    **Arguments:**

    - `gates`: `(*rows, lmax * channels)` gate pre-activations, shared by the blocks.
    - `blocks`: feature blocks, each `(*rows, k_b, channels)`.
    - `l_of_rows`: per block, the `(k_b,)` static numpy degrees of its rows.

    **Returns:**

    The gated blocks, same shapes.
    """
    channels = blocks[0].shape[-1]
    sig = jax.nn.sigmoid(gates).reshape(*gates.shape[:-1], gates.shape[-1] // channels, channels)
    return [_gate(sig, b, l) for b, l in zip(blocks, l_of_rows)]
