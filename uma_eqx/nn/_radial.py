"""Radial functions: Gaussian basis, polynomial envelope, LayerNorm and the radial MLP."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int

from .._constants import ENVELOPE_EXPONENT, GAUSSIAN_BASIS_WIDTH, NORM_EPS
from ._linear import Linear


def torch_linspace(start: float, stop: float, num: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """`torch.linspace(start, stop, num)` as torch computes it in `dtype`.

    fairchem builds its buffers in the run's default dtype (float32, or float64 for a float64
    run), so the Gaussian offsets are float32-rounded in float32 runs. torch computes the lower
    half as `start + step*i` and the upper half as `stop - step*(num-1-i)`, each with a single
    (fused) rounding; this is reproduced bit for bit in float32 (float64: to round-off).

    **Arguments:**

    - `start`, `stop`: the end points (both included).
    - `num`: number of points.
    - `dtype`: numpy float dtype to compute and return in.

    **Returns:**

    A `(num,)` numpy array.
    """
    ft = np.dtype(dtype).type
    step = ft(ft(stop - start) / ft(num - 1)) if num > 1 else ft(0)
    i = np.arange(num)
    wide = np.longdouble
    low = wide(ft(start)) + wide(step) * i
    high = wide(ft(stop)) - wide(step) * (num - 1 - i)
    return np.where(i < num // 2, low, high).astype(ft)


class GaussianBasis(eqx.Module):
    """Gaussians of the edge length on evenly spaced offsets, no prefactor.

    Port of `fairchem.core.models.uma.nn.radial.GaussianSmearing` with `basis_width_scalar=2.0`:
    `phi_k(d) = exp(coeff (d - mu_k)^2)` for `mu_k = torch.linspace(0, cutoff, num_basis)[k]`,
    `coeff = -0.5 / (2.0 delta)^2`, `delta = mu_1 - mu_0` (offsets rounded in the input's dtype,
    as fairchem builds them in the run's dtype). No parameters.
    """

    cutoff: float = eqx.field(static=True)
    num_basis: int = eqx.field(static=True)

    def __init__(self, cutoff: float, num_basis: int):
        """**Arguments:**

        - `cutoff`: the last offset, in Angstrom (the model's cutoff radius).
        - `num_basis`: number of Gaussians (`basis`), at least 2.
        """
        if num_basis < 2:
            raise ValueError(f"GaussianBasis: num_basis={num_basis}; need at least 2 offsets to set the width")
        self.cutoff = cutoff
        self.num_basis = num_basis

    def __call__(self, distance: Float[Array, ""]) -> Float[Array, " {self.num_basis}"]:
        """**Arguments:**

        - `distance`: one edge length (scalar; `jax.vmap` over edges).

        **Returns:**

        `(basis,)` values `phi_k(distance)`.
        """
        offsets = torch_linspace(0.0, self.cutoff, self.num_basis, distance.dtype)
        delta = float(offsets[1] - offsets[0])
        coeff = -0.5 / (GAUSSIAN_BASIS_WIDTH * delta) ** 2
        diff = distance - jnp.asarray(offsets, distance.dtype)
        return jnp.exp(coeff * diff**2)


def polynomial_envelope(scaled_distance: Float[Array, "*b"]) -> Float[Array, "*b"]:
    """Smooth cutoff: `1 + x^p (a + x (b + c x))` for `x < 1`, else 0.

    Port of `fairchem.core.models.uma.nn.radial.PolynomialEnvelope` with `p = 5`:
    `a = -(p+1)(p+2)/2`, `b = p(p+2)`, `c = -p(p+1)/2` (value, slope and curvature vanish at
    `x = 1`). NaN-safe: `x >= 1` is replaced before the power.

    **Arguments:**

    - `scaled_distance`: edge lengths divided by the cutoff, any shape.

    **Returns:**

    The envelope, same shape.
    """
    p = float(ENVELOPE_EXPONENT)
    a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
    x = scaled_distance
    inside = x < 1
    xs = jnp.where(inside, x, 0.0)
    return jnp.where(inside, 1 + xs**p * (a + xs * (b + c * xs)), 0.0)


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis, with affine weight and bias.

    Port of `torch.nn.LayerNorm(channels)` (eps `1e-5`) as used in
    `fairchem.core.models.uma.nn.radial.RadialMLP`:
    `y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`, biased variance.
    """

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]

    def __init__(self, channels: int, dtype=None):
        """**Arguments:**

        - `channels`: width of the last axis.
        - `dtype`: float dtype of the parameters (default float32); weight 1, bias 0, as torch.
        """
        dtype = jnp.float32 if dtype is None else dtype
        self.weight = jnp.ones(channels, dtype)
        self.bias = jnp.zeros(channels, dtype)

    def __call__(self, x: Float[Array, "*rows channels"]) -> Float[Array, "*rows channels"]:
        """**Arguments:**

        - `x`: `(*rows, channels)` features.

        **Returns:**

        `(*rows, channels)`, each row normalised.
        """
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + NORM_EPS) * self.weight + self.bias


class RadialMLP(eqx.Module):
    """MLP of the edge scalars: `Linear -> LayerNorm -> SiLU -> ... -> Linear`.

    Port of `fairchem.core.models.uma.nn.radial.RadialMLP` (torch keys `net.0, net.1, net.3,
    net.4, net.6` for three linears): `h_1 = W_1 x + b_1`,
    `h_{k+1} = W_{k+1} silu(LayerNorm_k(h_k)) + b_{k+1}`, output `h_n`.
    """

    linears: tuple[Linear, ...]
    norms: tuple[LayerNorm, ...]

    def __init__(self, channels: list[int], dtype=None, *, key):
        """**Arguments:**

        - `channels`: layer widths `[in, hidden..., out]`, at least two entries (`n` entries give
          `n - 1` linears and `n - 2` layer norms).
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for the linears' initialisation (checkpoints overwrite it).
        """
        if len(channels) < 2:
            raise ValueError(f"RadialMLP: channels={list(channels)} needs at least [in, out]")
        keys = jax.random.split(key, len(channels) - 1)
        self.linears = tuple(
            Linear(channels[i], channels[i + 1], dtype=dtype, key=keys[i]) for i in range(len(channels) - 1)
        )
        self.norms = tuple(LayerNorm(c, dtype) for c in channels[1:-1])

    def __call__(self, x: Float[Array, "*rows in"]) -> Float[Array, "*rows out"]:
        """**Arguments:**

        - `x`: `(*rows, in)` inputs, e.g. the dense edge scalars (`rows = edges`).

        **Returns:**

        `(*rows, out)`.
        """
        return self.after_first_linear(self.linears[0](x))

    def after_first_linear(self, h: Float[Array, "*rows hidden"]) -> Float[Array, "*rows out"]:
        """The MLP from the first linear's output on (the rest of `__call__`).

        **Arguments:**

        - `h`: `(*rows, hidden)` output of the first linear (bias included).

        **Returns:**

        `(*rows, out)`.
        """
        for lin, norm in zip(self.linears[1:], self.norms):
            h = lin(jax.nn.silu(norm(h)))
        return h

    def factored(
        self, source_embedding: Float[Array, "elements channels"], target_embedding: Float[Array, "elements channels"]
    ) -> "FactoredRadialMLP":
        """This MLP on [`uma_eqx.nn.EdgeScalars`][], its input's element columns folded into tables.

        **Arguments:**

        - `source_embedding`, `target_embedding`: `(elements, channels)` per-element embeddings
          whose rows make the last `2 channels` input features (as in the backbone).

        **Returns:**

        A [`uma_eqx.nn.FactoredRadialMLP`][] computing the same function of the edge scalars.
        """
        first = self.linears[0]
        c = source_embedding.shape[-1]
        num_basis = first.weight.shape[-1] - 2 * c
        if num_basis < 0 or target_embedding.shape[-1] != c:
            raise ValueError(
                f"RadialMLP.factored: embeddings of widths {c} and {target_embedding.shape[-1]} do not fit a first "
                f"linear with {first.weight.shape[-1]} inputs; pass the backbone's source and target embeddings"
            )
        source_table = source_embedding @ first.weight[:, num_basis : num_basis + c].T
        target_table = target_embedding @ first.weight[:, num_basis + c :].T
        basis_linear = eqx.tree_at(lambda lin: lin.weight, first, first.weight[:, :num_basis])
        return FactoredRadialMLP(self, basis_linear, source_table, target_table)


class EdgeScalars(eqx.Module):
    """The radial MLPs' edge input `[basis, source_embedding[z_s], target_embedding[z_t]]`, factored.

    Port of `x_edge` in `fairchem.core.models.uma.escn_md.eSCNMDBackbone.forward`, kept as its
    parts (the dense concatenation is `dense`).

    Only `basis` depends on positions; the rest depends on the two elements. A radial MLP's first
    linear maps the element parts through `(elements, hidden)` tables built once per call (see
    [`uma_eqx.nn.RadialMLP.factored`][]) and gathers a row per edge: the same sum as the linear on
    the concatenated features, without the `(edges, 2 edge_channels)` product (or its gradient).

    **Attributes:**

    - `basis`: `(edges, num_basis)` radial basis of the edge length.
    - `source_element`, `target_element`: `(edges,)` atomic numbers of the edge's endpoints.
    """

    basis: Float[Array, "*edges num_basis"]
    source_element: Int[Array, "*edges"]
    target_element: Int[Array, "*edges"]

    def dense(
        self, source_embedding: Float[Array, "elements channels"], target_embedding: Float[Array, "elements channels"]
    ) -> Float[Array, "*edges features"]:
        """The concatenated features (fairchem's `x_edge`).

        **Arguments:**

        - `source_embedding`, `target_embedding`: `(elements, channels)` per-element embeddings.

        **Returns:**

        `(*edges, num_basis + 2 channels)`: `[basis, source_embedding[z_s], target_embedding[z_t]]`.
        """
        parts = [self.basis, source_embedding[self.source_element], target_embedding[self.target_element]]
        return jnp.concatenate(parts, axis=-1)


class FactoredRadialMLP(eqx.Module):
    """A [`uma_eqx.nn.RadialMLP`][] taking [`uma_eqx.nn.EdgeScalars`][]; built by `RadialMLP.factored`.

    Same function as `mlp(x.dense(source_embedding, target_embedding))`, with the first linear
    split by input columns: `h_1 = W_b basis + b + S[z_s] + T[z_t]`, where
    `S = source_embedding W_s^T`, `T = target_embedding W_t^T`.

    **Attributes:**

    - `mlp`: the radial MLP.
    - `basis_linear`: the first linear's basis columns, with its bias.
    - `source_table`, `target_table`: `(elements, hidden)` first-linear outputs of each element's
      embedding (no bias).
    """

    mlp: RadialMLP
    basis_linear: Linear
    source_table: Float[Array, "elements hidden"]
    target_table: Float[Array, "elements hidden"]

    def __call__(self, x: EdgeScalars) -> Float[Array, "*edges out"]:
        """**Arguments:**

        - `x`: the [`uma_eqx.nn.EdgeScalars`][] of the edges (basis width must match).

        **Returns:**

        `(*edges, out)`.
        """
        num_basis = self.basis_linear.weight.shape[-1]
        if x.basis.shape[-1] != num_basis:
            raise ValueError(
                f"FactoredRadialMLP: the edge basis has {x.basis.shape[-1]} functions, this MLP takes {num_basis}"
            )
        h = self.basis_linear(x.basis)
        h = h + self.source_table[x.source_element] + self.target_table[x.target_element]
        return self.mlp.after_first_linear(h)


def factor_radial_mlps(
    tree, source_embedding: Float[Array, "elements channels"], target_embedding: Float[Array, "elements channels"]
):
    """`tree` with every [`uma_eqx.nn.RadialMLP`][] replaced by its `factored` form.

    The backbone calls this once per call, inside jit, so the tables follow the weights.

    **Arguments:**

    - `tree`: any pytree of modules (e.g. the backbone's blocks).
    - `source_embedding`, `target_embedding`: see [`uma_eqx.nn.RadialMLP.factored`][].

    **Returns:**

    `tree` with its radial MLPs factored; other leaves unchanged.
    """
    is_mlp = lambda m: isinstance(m, RadialMLP)  # noqa: E731
    return jax.tree.map(
        lambda m: m.factored(source_embedding, target_embedding) if is_mlp(m) else m, tree, is_leaf=is_mlp
    )
