"""SO(2) convolution in the edge frame (one implementation for plain and MoLE linears)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..so3 import coefficient_layout
from ._linear import Linear, MoLELinear, MoLERouting
from ._radial import EdgeScalars, FactoredRadialMLP, RadialMLP


class SO2Convolution(eqx.Module):
    """SO(2)-equivariant linear map of m-major edge features, optionally radially modulated.

    Port of `fairchem.core.models.uma.nn.so2_layers.SO2_Convolution` (+ `SO2_m_Conv`).
    For `m = 0` the `(lmax+1)` degrees are flattened and mapped by `fc_m0` (with bias); its first
    `extra_m0_channels` outputs are returned separately (gating scalars). For `m > 0` the `+m`
    and `-m` rows share one bias-free linear `fc_m[m-1]` producing `(a, b)` from `+m` and
    `(c, d)` from `-m`; the outputs are the complex product `(+m: a - d, -m: c + b)`, computed
    with three matmuls instead of four (see `_complex_product`).
    With a radial MLP, the flattened inputs of each `m` are multiplied by its slice of
    `rad(x_edge)` first (`x_edge`: the concatenated edge features, or [`uma_eqx.nn.EdgeScalars`][]
    once `rad` is factored).

    The `m > 0` products run in fairchem's four-product form, or, given the weights of
    [`uma_eqx.nn.SO2Convolution.gauss_fc_m`][] (which the model prepares once per call when
    `ExecutionSettings.gauss_form`), in Gauss's three-product form: same result, 3/4 of the
    matmul FLOPs.
    """

    fc_m0: Linear | MoLELinear
    fc_m: tuple[Linear | MoLELinear, ...]
    rad: RadialMLP | FactoredRadialMLP | None
    lmax: int = eqx.field(static=True)
    mmax: int = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    extra_m0_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        lmax: int,
        mmax: int,
        radial_channels: list[int] | None,
        extra_m0_channels: int = 0,
        num_experts: int = 0,
        dtype=None,
        *,
        key,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`: channels per coefficient in and out.
        - `lmax`, `mmax`: degrees and orders of the m-major edge features.
        - `radial_channels`: widths of the radial MLP before its output layer (its output
          width, the flattened input size of all `m`, is derived), or `None` for none.
        - `extra_m0_channels`: extra `m = 0` outputs returned separately (gating scalars).
        - `num_experts`: MoLE experts of the linears (0: plain `Linear`s).
        - `dtype`: parameter dtype.
        - `key`: PRNG key for the initialisation.
        """
        keys = jax.random.split(key, mmax + 2)

        def linear(i, o, bias, k):
            if num_experts > 0:
                return MoLELinear(num_experts, i, o, bias, dtype, key=k)
            return Linear(i, o, bias, dtype, key=k)

        self.fc_m0 = linear((lmax + 1) * in_channels, (lmax + 1) * out_channels + extra_m0_channels, True, keys[0])
        self.fc_m = tuple(
            linear((lmax - m + 1) * in_channels, 2 * (lmax - m + 1) * out_channels, False, keys[m])
            for m in range(1, mmax + 1)
        )
        total_in = sum((lmax - m + 1) * in_channels for m in range(mmax + 1))
        self.rad = None if radial_channels is None else RadialMLP([*radial_channels, total_in], dtype, key=keys[-1])
        self.lmax, self.mmax = lmax, mmax
        self.in_channels, self.out_channels = in_channels, out_channels
        self.extra_m0_channels = extra_m0_channels

    def gauss_fc_m(self) -> tuple[Linear | MoLELinear, ...]:
        """The `fc_m` linears with each weight `[W1; W2]` stored as `[W1 + W2; W1; W2]`.

        These are the three weights of `_complex_product`; preparing them once (per call,
        outside the edge loop, after merging experts) saves a pass over the weights per chunk.
        Expert merging and slicing are linear, so they commute with this.

        **Returns:**

        One linear per `m = 1..mmax`, for the `gauss_fc_m` argument of
        [`uma_eqx.nn.SO2Convolution.apply_blocks`][].
        """
        return tuple(_with_weight(layer, _gauss_weights) for layer in self.fc_m)

    def split_blocks(self, x: Float[Array, "edges m_coeffs channels"]) -> list[Float[Array, "edges _ channels"]]:
        """m-major rows as blocks: `m = 0`, then `+m` and `-m` for `m = 1..mmax`.

        One `split` rather than static slices: its transpose (the backward pass) is one
        concatenation, where slices would each be zero-padded to full size and summed.
        """
        return jnp.split(x, np.cumsum(coefficient_layout(self.lmax, self.mmax).m_block_sizes)[:-1], axis=1)

    def apply_blocks(
        self,
        blocks: list[Float[Array, "edges _ {self.in_channels}"]],
        x_edge: Float[Array, "edges edge_features"] | EdgeScalars | None = None,
        routing: MoLERouting | None = None,
        gauss_fc_m: tuple[Linear | MoLELinear, ...] | None = None,
    ) -> tuple[list[Float[Array, "edges _ {self.out_channels}"]], Float[Array, "edges {self.extra_m0_channels}"]]:
        """The convolution on [`uma_eqx.nn.SO2Convolution.split_blocks`][] blocks.

        **Arguments:**

        - `blocks`: the m-major blocks of the edge features, `(edges, rows_of_block, in_channels)`.
        - `x_edge`: the radial MLP's input (needed when the convolution has one, `rad`;
          ignored otherwise).
        - `routing`: MoLE expert coefficients (needed when the linears are `MoLELinear`;
          plain linears ignore it).
        - `gauss_fc_m`: `self.gauss_fc_m()` (possibly merged or sliced like `self`) to use
          Gauss's three-product form; `None`: fairchem's four-product form.

        **Returns:**

        The output blocks `(edges, rows_of_block, out_channels)` and the gating scalars
        `(edges, extra_m0_channels)` (the `m = 0` extra outputs).
        """
        num_edges = blocks[0].shape[0]
        sizes = coefficient_layout(self.lmax, self.mmax).m_sizes
        c_in, c_out = self.in_channels, self.out_channels
        flat = [b.reshape(num_edges, -1) for b in blocks]
        if self.rad is not None:
            if x_edge is None:
                raise ValueError("this SO2Convolution has a radial MLP: pass x_edge")
            widths = [n * c_in for n in sizes]
            mismatch = TypeError(
                f"this SO2Convolution's {type(self.rad).__name__} cannot take x_edge of type "
                f"{type(x_edge).__name__}: a FactoredRadialMLP takes EdgeScalars, a RadialMLP an array"
            )
            if isinstance(x_edge, EdgeScalars):
                if not isinstance(self.rad, FactoredRadialMLP):
                    raise mismatch
                edge_weights = self.rad(x_edge)
            else:
                if not isinstance(self.rad, RadialMLP):
                    raise mismatch
                edge_weights = self.rad(x_edge)
            radial = jnp.split(edge_weights, np.cumsum(widths)[:-1], axis=1)
            flat = [flat[0] * radial[0]] + [b * radial[1 + k // 2] for k, b in enumerate(flat[1:])]
        gating, y0 = jnp.split(self.fc_m0(flat[0], routing), [self.extra_m0_channels], axis=1)
        out = [y0.reshape(num_edges, -1, c_out)]
        for m in range(1, self.mmax + 1):
            x_plus, x_minus = flat[2 * m - 1], flat[2 * m]
            if gauss_fc_m is None:
                plus, minus = _four_product(self.fc_m[m - 1], x_plus, x_minus, routing)
            else:
                plus, minus = _complex_product(gauss_fc_m[m - 1], x_plus, x_minus, routing)
            out += [plus.reshape(num_edges, -1, c_out), minus.reshape(num_edges, -1, c_out)]
        return out, gating

    def __call__(
        self,
        x: Float[Array, "edges m_coeffs {self.in_channels}"],
        x_edge: Float[Array, "edges edge_features"] | EdgeScalars | None = None,
        routing: MoLERouting | None = None,
        gauss_fc_m: tuple[Linear | MoLELinear, ...] | None = None,
    ) -> tuple[Float[Array, "edges m_coeffs {self.out_channels}"], Float[Array, "edges {self.extra_m0_channels}"]]:
        """The convolution on m-major edge features.

        **Arguments:**

        - `x`: `(edges, m_coeffs, in_channels)` features in the edge frame, m-major rows.
        - `x_edge`, `routing`, `gauss_fc_m`: as in [`uma_eqx.nn.SO2Convolution.apply_blocks`][].

        **Returns:**

        `(edges, m_coeffs, out_channels)` features and the `(edges, extra_m0_channels)`
        gating scalars.
        """
        out, gating = self.apply_blocks(self.split_blocks(x), x_edge, routing, gauss_fc_m)
        return jnp.concatenate(out, axis=1), gating


def _weight_name(layer: Linear | MoLELinear) -> str:
    """The weight field: `(out, in)`, or `(experts, out, in)` for MoLE."""
    return "weights" if isinstance(layer, MoLELinear) else "weight"


def _with_weight(layer: Linear | MoLELinear, fn) -> Linear | MoLELinear:
    """`layer` with its weight replaced by `fn(weight)`."""
    name = _weight_name(layer)
    return eqx.tree_at(lambda l: getattr(l, name), layer, fn(getattr(layer, name)))


def _gauss_weights(w: Float[Array, "*experts out in"]) -> Float[Array, "*experts out_3_2 in"]:
    """`[W1; W2]` (two row blocks) to `[W1 + W2; W1; W2]` (see `_complex_product`)."""
    w_1, w_2 = jnp.split(w, 2, axis=-2)
    return jnp.concatenate([w_1 + w_2, w_1, w_2], axis=-2)


def _four_product(
    layer: Linear | MoLELinear,
    x_plus: Float[Array, "edges in"],
    x_minus: Float[Array, "edges in"],
    routing: MoLERouting | None,
) -> tuple[Float[Array, "edges half"], Float[Array, "edges half"]]:
    """`SO2_m_Conv`'s product as fairchem computes it: `(a, b) = W x+`, `(c, d) = W x-`,
    outputs `(a - d, c + b)` for a bias-free linear `W = [W1; W2]` (four real products)."""
    a, b = jnp.split(layer(x_plus, routing), 2, axis=-1)
    c, d = jnp.split(layer(x_minus, routing), 2, axis=-1)
    return a - d, c + b


def _complex_product(
    layer: Linear | MoLELinear,
    x_plus: Float[Array, "edges in"],
    x_minus: Float[Array, "edges in"],
    routing: MoLERouting | None,
) -> tuple[Float[Array, "edges half"], Float[Array, "edges half"]]:
    """`(W1 x+ - W2 x-, W2 x+ + W1 x-)` for a bias-free linear `[W1; W2]` in Gauss form.

    This is the complex product `(W1 + i W2)(x+ + i x-)` of `SO2_m_Conv`, which fairchem
    computes as one linear over both rows (four real products). Gauss's three-multiplication
    form, `k1 = (W1 + W2) x+`, `k2 = W1 (x- - x+)`, `k3 = W2 (x+ + x-)`, real `k1 - k3`,
    imaginary `k1 + k2`, gives the same result with 3/4 of the matmul FLOPs (forward and
    backward). `layer`'s weight is `[W1 + W2; W1; W2]` (`_gauss_weights`).
    """
    thirds = jnp.split(getattr(layer, _weight_name(layer)), 3, axis=-2)
    w_sum, w_1, w_2 = (_with_weight(layer, lambda _, w=w: w) for w in thirds)
    k1 = w_sum(x_plus, routing)
    k2 = w_1(x_minus - x_plus, routing)
    k3 = w_2(x_plus + x_minus, routing)
    return k1 - k3, k1 + k2
