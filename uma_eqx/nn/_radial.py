"""Radial functions: Gaussian basis, polynomial envelope, LayerNorm and the radial MLP."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._constants import ENVELOPE_EXPONENT, GAUSSIAN_BASIS_WIDTH, NORM_EPS
from ._linear import Linear


def torch_linspace(start: float, stop: float, num: int, dtype=np.float32) -> np.ndarray:
    """`torch.linspace(start, stop, num)` as torch computes it in `dtype`.

    fairchem builds its buffers in the run's default dtype (float32, or float64 for a float64
    run), so the Gaussian offsets are float32-rounded in float32 runs. torch computes the lower
    half as `start + step*i` and the upper half as `stop - step*(num-1-i)`, each with a single
    (fused) rounding; this is reproduced bit for bit in float32 (float64: to round-off).
    """
    ft = np.dtype(dtype).type
    step = ft(ft(stop - start) / ft(num - 1)) if num > 1 else ft(0)
    i = np.arange(num)
    wide = np.longdouble
    low = wide(ft(start)) + wide(step) * i
    high = wide(ft(stop)) - wide(step) * (num - 1 - i)
    return np.where(i < num // 2, low, high).astype(ft)


class GaussianBasis(eqx.Module):
    """`exp(coeff (d - mu_k)^2)` on `num_basis` offsets in `[0, cutoff]`, no prefactor.

    Port of `fairchem.core.models.uma.nn.radial.GaussianSmearing` with `basis_width_scalar=2.0`:
    `coeff = -0.5 / (2.0 * delta)^2`, `delta` the (float32) offset spacing.
    """

    cutoff: float = eqx.field(static=True)
    num_basis: int = eqx.field(static=True)

    def __call__(self, distance: Float[Array, ""]) -> Float[Array, " {self.num_basis}"]:
        offsets = torch_linspace(0.0, self.cutoff, self.num_basis, distance.dtype)
        delta = float(offsets[1] - offsets[0])
        coeff = -0.5 / (GAUSSIAN_BASIS_WIDTH * delta) ** 2
        diff = distance - jnp.asarray(offsets, distance.dtype)
        return jnp.exp(coeff * diff**2)


def polynomial_envelope(scaled_distance: Float[Array, "*b"]) -> Float[Array, "*b"]:
    """`1 + x^p (a + x (b + c x))` for `x < 1`, else 0 (`nn/radial.py:PolynomialEnvelope`, p=5)."""
    p = float(ENVELOPE_EXPONENT)
    a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
    x = scaled_distance
    inside = x < 1
    xs = jnp.where(inside, x, 0.0)
    return jnp.where(inside, 1 + xs**p * (a + xs * (b + c * xs)), 0.0)


class LayerNorm(eqx.Module):
    """`torch.nn.LayerNorm(channels)` over the last axis (eps 1e-5, affine)."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]

    def __init__(self, channels: int, dtype=None):
        dtype = jnp.float32 if dtype is None else dtype
        self.weight = jnp.ones(channels, dtype)
        self.bias = jnp.zeros(channels, dtype)

    def __call__(self, x: Float[Array, "*rows channels"]) -> Float[Array, "*rows channels"]:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + NORM_EPS) * self.weight + self.bias


class RadialMLP(eqx.Module):
    """Linear -> LayerNorm -> SiLU -> ... -> Linear.

    Port of `fairchem.core.models.uma.nn.radial.RadialMLP` (torch keys `net.0, net.1, net.3,
    net.4, net.6` for three linears).
    """

    linears: tuple[Linear, ...]
    norms: tuple[LayerNorm, ...]

    def __init__(self, channels: list[int], dtype=None, *, key):
        keys = jax.random.split(key, len(channels) - 1)
        self.linears = tuple(
            Linear(channels[i], channels[i + 1], dtype=dtype, key=keys[i]) for i in range(len(channels) - 1)
        )
        self.norms = tuple(LayerNorm(c, dtype) for c in channels[1:-1])

    def __call__(self, x: Float[Array, "*rows in"]) -> Float[Array, "*rows out"]:
        return self.after_first_linear(self.linears[0](x))

    def after_first_linear(self, h: Float[Array, "*rows hidden"]) -> Float[Array, "*rows out"]:
        """The MLP from the first linear's output on (the rest of `__call__`)."""
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
        """The concatenated features (fairchem's `x_edge`)."""
        parts = [self.basis, source_embedding[self.source_element], target_embedding[self.target_element]]
        return jnp.concatenate(parts, axis=-1)


class FactoredRadialMLP(eqx.Module):
    """A [`uma_eqx.nn.RadialMLP`][] taking [`uma_eqx.nn.EdgeScalars`][]; built by `RadialMLP.factored`.

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
