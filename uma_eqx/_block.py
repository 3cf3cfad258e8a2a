"""`UMABlock`: norm -> edgewise SO(2) message passing -> norm -> atomwise feed-forward."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._config import UMAConfig
from .nn import (
    AbstractEquivariantNorm,
    EquivariantLayerNorm,
    EquivariantLayerNormSH,
    EquivariantRMSNorm,
    Linear,
    MoLERouting,
    SO2Convolution,
    SO3Linear,
    gate_activation,
)
from .so3 import coefficient_layout


def make_norm(config: UMAConfig, dtype=None) -> AbstractEquivariantNorm:
    """The norm class named by `config.norm_type` (`nn/layer_norm.py:get_normalization_layer`)."""
    match config.norm_type:
        case "rms_norm_sh":
            return EquivariantRMSNorm(config.lmax, config.sphere_channels, dtype)
        case "layer_norm":
            return EquivariantLayerNorm(config.lmax, config.sphere_channels, dtype)
        case "layer_norm_sh":
            return EquivariantLayerNormSH(config.lmax, config.sphere_channels, dtype)
        case other:
            raise ValueError(f"unknown norm_type {other!r}: use rms_norm_sh, layer_norm or layer_norm_sh")


class EdgeFrame(eqx.Module):
    """Per-edge quantities shared by every block.

    **Attributes:**

    - `wigner`: `(edges, m_coeffs, coeffs)` rotation into the edge frame (m-major rows).
    - `wigner_inv_envelope`: `(edges, coeffs, m_coeffs)` inverse rotation times the envelope.
    - `x_edge`: `(edges, basis + 2 edge_channels)` radial basis and element embeddings.
    - `source`, `target`: edge endpoints.
    """

    wigner: Float[Array, "edges m_coeffs coeffs"]
    wigner_inv_envelope: Float[Array, "edges coeffs m_coeffs"]
    x_edge: Float[Array, "edges edge_features"]
    source: Int[Array, " edges"]
    target: Int[Array, " edges"]


class Edgewise(eqx.Module):
    """Rotate `[x_j, x_i]` into the edge frame, SO(2) conv, gate, SO(2) conv, rotate back, sum.

    Port of `fairchem.core.models.uma.escn_md_block.Edgewise` (`act_type="gate"`,
    general execution backend). Messages aggregate on the target atom with no degree rescale.
    """

    so2_conv_1: SO2Convolution
    so2_conv_2: SO2Convolution
    lmax: int = eqx.field(static=True)
    mmax: int = eqx.field(static=True)

    def __init__(self, config: UMAConfig, num_experts: int, dtype=None, *, key):
        k1, k2 = jax.random.split(key)
        c, h = config.sphere_channels, config.hidden_channels
        radial = [config.num_distance_basis + 2 * config.edge_channels, config.edge_channels, config.edge_channels]
        self.so2_conv_1 = SO2Convolution(
            2 * c, h, config.lmax, config.mmax, radial, config.lmax * h, num_experts, dtype, key=k1
        )
        self.so2_conv_2 = SO2Convolution(h, c, config.lmax, config.mmax, None, 0, num_experts, dtype, key=k2)
        self.lmax, self.mmax = config.lmax, config.mmax

    def __call__(
        self, x: Float[Array, "atoms coeffs channels"], frame: EdgeFrame, routing: MoLERouting | None
    ) -> Float[Array, "atoms coeffs channels"]:
        with jax.named_scope("edgewise"):
            pair = jnp.concatenate([x[frame.source], x[frame.target]], axis=-1)
            msg = jnp.einsum("emk,ekc->emc", frame.wigner, pair)
            msg, gating = self.so2_conv_1(msg, frame.x_edge, routing)
            msg = gate_activation(gating, msg, coefficient_layout(self.lmax, self.mmax).l_of_m_row)
            msg, _ = self.so2_conv_2(msg, None, routing)
            msg = jnp.einsum("ekm,emc->ekc", frame.wigner_inv_envelope, msg)
            return jax.ops.segment_sum(msg, frame.target, num_segments=x.shape[0])


class AbstractAtomwise(eqx.Module):
    """Per-atom feed-forward network on `[coeffs, channels]` features."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms coeffs channels"]:
        ...


class SpectralAtomwise(AbstractAtomwise):
    """`SO3Linear -> gate(SiLU(Linear(x_0))) -> SO3Linear` (`ff_type="spectral"`).

    Port of `fairchem.core.models.uma.escn_md_block.SpectralAtomwise`.
    """

    scalar_mlp: Linear
    so3_linear_1: SO3Linear
    so3_linear_2: SO3Linear
    lmax: int = eqx.field(static=True)

    def __init__(self, config: UMAConfig, dtype=None, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        c, h, lmax = config.sphere_channels, config.hidden_channels, config.lmax
        self.scalar_mlp = Linear(c, lmax * h, dtype=dtype, key=k1)
        self.so3_linear_1 = SO3Linear(c, h, lmax, dtype, key=k2)
        self.so3_linear_2 = SO3Linear(h, c, lmax, dtype, key=k3)
        self.lmax = lmax

    def __call__(self, x: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms coeffs channels"]:
        gates = jax.nn.silu(self.scalar_mlp(x[:, 0, :]))
        y = self.so3_linear_1(x)
        y = gate_activation(gates, y, coefficient_layout(self.lmax, self.lmax).l_of_coeff)
        return self.so3_linear_2(y)


class GridAtomwise(AbstractAtomwise):
    """Point-wise MLP on an S2 grid (`ff_type="grid"`).

    Port of `fairchem.core.models.uma.escn_md_block.GridAtomwise`: project to the
    `2(lmax+1) x (2(lmax+1)+1)` grid of e3nn's `ToS2Grid` (integral normalisation), apply
    `Linear -> SiLU -> Linear -> SiLU -> Linear` (no biases) per grid point, project back.
    """

    grid_mlp: tuple[Linear, Linear, Linear]
    lmax: int = eqx.field(static=True)

    def __init__(self, config: UMAConfig, dtype=None, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        c, h = config.sphere_channels, config.hidden_channels
        self.grid_mlp = (
            Linear(c, h, False, dtype, key=k1),
            Linear(h, h, False, dtype, key=k2),
            Linear(h, c, False, dtype, key=k3),
        )
        self.lmax = config.lmax

    def __call__(self, x: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms coeffs channels"]:
        from .so3._grid import s2_grid_matrices

        to_grid, from_grid = s2_grid_matrices(self.lmax)
        g = jnp.einsum("bai,nic->nbac", jnp.asarray(to_grid, x.dtype), x)
        g = jax.nn.silu(self.grid_mlp[0](g))
        g = jax.nn.silu(self.grid_mlp[1](g))
        g = self.grid_mlp[2](g)
        return jnp.einsum("bai,nbac->nic", jnp.asarray(from_grid, x.dtype), g)


class UMABlock(eqx.Module):
    """One UMA layer.

    Port of `fairchem.core.models.uma.escn_md_block.eSCNMD_Block`:
    `x = x + Edgewise(norm_1(x) + csd on l=0)`, then `x = x + Atomwise(norm_2(x))`.
    """

    norm_1: AbstractEquivariantNorm
    edge_wise: Edgewise
    norm_2: AbstractEquivariantNorm
    atom_wise: AbstractAtomwise

    def __init__(self, config: UMAConfig, num_experts: int, dtype=None, *, key):
        k1, k2 = jax.random.split(key)
        self.norm_1 = make_norm(config, dtype)
        self.edge_wise = Edgewise(config, num_experts, dtype, key=k1)
        self.norm_2 = make_norm(config, dtype)
        match config.ff_type:
            case "spectral":
                self.atom_wise = SpectralAtomwise(config, dtype, key=k2)
            case "grid":
                self.atom_wise = GridAtomwise(config, dtype, key=k2)
            case other:
                raise ValueError(f"unknown ff_type {other!r}: use spectral or grid")

    def __call__(
        self,
        x: Float[Array, "atoms coeffs channels"],
        system_embedding: Float[Array, "atoms channels"],
        frame: EdgeFrame,
        routing: MoLERouting | None,
    ) -> Float[Array, "atoms coeffs channels"]:
        with jax.named_scope("uma_block"):
            h = self.norm_1(x)
            h = h.at[:, 0, :].add(system_embedding)
            x = x + self.edge_wise(h, frame, routing)
            return x + self.atom_wise(self.norm_2(x))
