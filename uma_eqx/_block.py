"""`UMABlock`: norm -> edgewise SO(2) message passing -> norm -> atomwise feed-forward."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from ._config import UMAConfig
from .nn import (
    AbstractEquivariantNorm,
    EdgeScalars,
    EquivariantLayerNorm,
    EquivariantLayerNormSH,
    EquivariantRMSNorm,
    Linear,
    MoLERouting,
    SO2Convolution,
    SO3Linear,
    gate_activation,
    gate_activation_blocks,
)
from .nn._linear import map_mole
from .so3 import coefficient_layout, rotate

# Edges per chunk of the edgewise message passing. A chunk's widest features,
# `(chunk, m_coeffs, 2 sphere_channels)` float32 (~4.7 MB for uma-s at 512 edges), stay in
# cache, and the backward pass recomputes one chunk at a time instead of keeping every
# layer's edge activations: memory is O(edges) with a small constant, time about the same.
EDGE_CHUNK_SIZE = 512
# Bytes per layer of SO(2)-convolution outputs that the backward pass may keep (summed over
# edges); beyond it they are recomputed chunk by chunk (see `Edgewise`). For uma-s (float32)
# 512 MiB keeps both convolutions' outputs up to ~500 atoms (40k edges), the first one's up
# to ~1000 atoms, and recomputes everything beyond, where memory matters more.
EDGE_RESIDUAL_BUDGET = 2**29


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
    - `wigner_t`, `wigner_inv_envelope_t`: the same two, transposed (for the backward pass of
      [`uma_eqx.so3.rotate`][]).
    - `x_edge`: the radial MLPs' input (radial basis and the endpoints' elements).
    - `source`, `target`: edge endpoints (edges sorted by `target`).
    - `system`: system of each edge (of its target atom).
    """

    wigner: Float[Array, "edges m_coeffs coeffs"]
    wigner_inv_envelope: Float[Array, "edges coeffs m_coeffs"]
    wigner_t: Float[Array, "edges coeffs m_coeffs"]
    wigner_inv_envelope_t: Float[Array, "edges m_coeffs coeffs"]
    x_edge: EdgeScalars
    source: Int[Array, " edges"]
    target: Int[Array, " edges"]
    system: Int[Array, " edges"]


def _chunk_layout(num_edges: int, num_groups: int, chunk_size: int) -> tuple[int, int]:
    """`(num_chunks, chunk)`: enough `chunk`-edge chunks for `num_edges` edges in `num_groups`
    contiguous groups when no chunk may hold edges of two groups.

    One group: `chunk <= chunk_size` is balanced so that padding is below one edge per chunk.
    Several: each group wastes less than one chunk, so `(edges + groups (chunk - 1)) // chunk`
    chunks always suffice; the chunk is at most the mean group size, so that batches of small
    systems do not fill most of each chunk with null edges.
    """
    if num_groups == 1:
        num_chunks = max(1, -(-num_edges // chunk_size))
        return num_chunks, max(1, -(-num_edges // num_chunks))
    chunk = max(1, min(chunk_size, -(-num_edges // num_groups)))
    return max(1, (num_edges + num_groups * (chunk - 1)) // chunk), chunk


def _split_edges(
    frame: EdgeFrame, chunk_size: int, counts: Int[Array, " groups"] | None
) -> tuple[EdgeFrame, Int[Array, " chunks"]]:
    """`frame` laid out as `(chunks, chunk, ...)` so that no chunk mixes two groups.

    The groups are the systems (`frame.system`), of `counts` edges each (`None`: one group of
    all edges); the edges may come in any order (a stable sort by system groups them, which is
    the identity for graphs built by `AtomicGraph.from_atoms`). Each group starts a new chunk;
    slots left over are null edges (zero rotations and radial features, hence zero messages and
    zero gradients).

    **Returns:**

    The chunked frame and the group of each chunk (`num_groups` for unused chunks, which
    hold only null edges).
    """
    num_edges = frame.source.shape[0]
    if counts is None:
        counts = jnp.array([num_edges])
    num_groups = counts.shape[0]
    num_chunks, chunk = _chunk_layout(num_edges, num_groups, chunk_size)
    group_chunks = -(-counts // chunk)
    chunks_end = jnp.cumsum(group_chunks)
    chunk_group = jnp.searchsorted(chunks_end, jnp.arange(num_chunks), side="right")
    # the group of each slot, its position inside the group, and the edge it holds
    slot = jnp.arange(num_chunks * chunk)
    slot_group = jnp.minimum(chunk_group, num_groups - 1)[slot // chunk]
    k = slot - (chunks_end - group_chunks)[slot_group] * chunk
    valid = (chunk_group[slot // chunk] < num_groups) & (k < counts[slot_group])
    edge = jnp.where(valid, (jnp.cumsum(counts) - counts)[slot_group] + k, 0)
    if num_groups > 1:
        edge = jnp.argsort(frame.system, stable=True)[edge]

    def place(a):
        a = a[edge]
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = jnp.where(valid.reshape(-1, *([1] * (a.ndim - 1))), a, 0)
        return a.reshape(num_chunks, chunk, *a.shape[1:])

    return jax.tree.map(place, frame), chunk_group


class Edgewise(eqx.Module):
    """Rotate `[x_j, x_i]` into the edge frame, SO(2) conv, gate, SO(2) conv, rotate back, sum.

    Port of `fairchem.core.models.uma.escn_md_block.Edgewise` (`act_type="gate"`,
    general execution backend). Messages aggregate on the target atom with no degree rescale.

    Edges are processed in chunks of at most `edge_chunk_size` (a `lax.scan` that scatter-adds
    each chunk's messages: the same sum in a different order). Each chunk's messages are under
    `jax.checkpoint`: the backward pass keeps only the SO(2)-convolution outputs that fit
    `EDGE_RESIDUAL_BUDGET` and recomputes the rest of the chunk, so memory stays a small
    multiple of the edge count. With MoLE routing (unmerged experts) the experts are merged
    once per system and no chunk mixes two systems (see `_split_edges`), so a batch of
    different systems costs one matmul per chunk, like a single system.
    """

    so2_conv_1: SO2Convolution
    so2_conv_2: SO2Convolution
    lmax: int = eqx.field(static=True)
    mmax: int = eqx.field(static=True)
    edge_chunk_size: int = eqx.field(static=True)

    def __init__(self, config: UMAConfig, num_experts: int, dtype=None, *, key):
        k1, k2 = jax.random.split(key)
        c, h = config.sphere_channels, config.hidden_channels
        radial = [config.num_distance_basis + 2 * config.edge_channels, config.edge_channels, config.edge_channels]
        self.so2_conv_1 = SO2Convolution(
            2 * c, h, config.lmax, config.mmax, radial, config.lmax * h, num_experts, dtype, key=k1
        )
        self.so2_conv_2 = SO2Convolution(h, c, config.lmax, config.mmax, None, 0, num_experts, dtype, key=k2)
        self.lmax, self.mmax = config.lmax, config.mmax
        self.edge_chunk_size = EDGE_CHUNK_SIZE

    def messages(
        self, x: Float[Array, "atoms coeffs channels"], frame: EdgeFrame, routing: MoLERouting | None
    ) -> Float[Array, "edges coeffs channels"]:
        """The message of each edge of `frame`, rotated back and envelope-weighted."""
        pair = jnp.concatenate([x[frame.source], x[frame.target]], axis=-1)
        msg = rotate(frame.wigner, frame.wigner_t, pair)
        # the m blocks stay separate arrays from the first convolution's input to the second's
        # output: no concatenation and re-split around the gate
        blocks = self.so2_conv_1.split_blocks(msg)
        blocks, gating = checkpoint_name(self.so2_conv_1.apply_blocks(blocks, frame.x_edge, routing), "so2_conv_1")
        blocks = gate_activation_blocks(gating, blocks, coefficient_layout(self.lmax, self.mmax).m_block_degrees)
        blocks, _ = self.so2_conv_2.apply_blocks(blocks, None, routing)
        msg = checkpoint_name(jnp.concatenate(blocks, axis=1), "so2_conv_2")
        return rotate(frame.wigner_inv_envelope, frame.wigner_inv_envelope_t, msg)

    def _saved_names(self, num_edges: int, dtype) -> tuple[str, ...]:
        # SO(2)-convolution outputs kept for the backward pass, cheapest first to drop, within
        # `EDGE_RESIDUAL_BUDGET`; everything else of a chunk is recomputed.
        rows = coefficient_layout(self.lmax, self.mmax).num_m_coeffs
        conv_1 = rows * self.so2_conv_1.out_channels + self.so2_conv_1.extra_m0_channels
        conv_2 = rows * self.so2_conv_2.out_channels
        per_edge = num_edges * jnp.dtype(dtype).itemsize
        if (conv_1 + conv_2) * per_edge <= EDGE_RESIDUAL_BUDGET:
            return ("so2_conv_1", "so2_conv_2")
        if conv_1 * per_edge <= EDGE_RESIDUAL_BUDGET:
            return ("so2_conv_1",)
        return ()

    def __call__(
        self, x: Float[Array, "atoms coeffs channels"], frame: EdgeFrame, routing: MoLERouting | None
    ) -> Float[Array, "atoms coeffs channels"]:
        with jax.named_scope("edgewise"):
            if routing is None:
                num_systems = 1
                chunks, chunk_systems = _split_edges(frame, self.edge_chunk_size, None)
                per_system = self
            else:
                # Merge the experts once per system, and lay the edges out so that every chunk
                # belongs to one system: a chunk then costs one matmul with its system's weights
                # (the per-system grouped matmul of fairchem's MOLE, without ragged shapes).
                num_systems = routing.coefficients.shape[0]
                chunks, chunk_systems = _split_edges(frame, self.edge_chunk_size, routing.group_sizes)
                per_system = map_mole(lambda m: m.merge_per_system(routing.coefficients), self)
            # the complex products' weight sums, once per call rather than per chunk
            per_system = eqx.tree_at(
                lambda e: (e.so2_conv_1, e.so2_conv_2),
                per_system,
                (per_system.so2_conv_1.with_gauss_weights(), per_system.so2_conv_2.with_gauss_weights()),
            )

            def system_messages(per_system, x, chunk, system):
                # The system's weights are sliced inside the checkpoint (the backward pass slices
                # them again instead of keeping a weight copy per chunk). The layout reserves the
                # worst case of chunks; unused ones (`system == num_systems`) and those of
                # padding systems (`routing.active`) are skipped.
                def run(system):
                    return map_mole(lambda m: m.expert(system), per_system).messages(x, chunk, None)

                if num_systems == 1:
                    return run(0)
                used = system < num_systems
                if routing.active is not None:  # padding systems' edges only reach padding atoms
                    used = used & routing.active[jnp.minimum(system, num_systems - 1)]
                return jax.lax.cond(
                    used,
                    run,
                    lambda _: jnp.zeros((chunk.source.shape[0], *x.shape[1:]), x.dtype),
                    jnp.minimum(system, num_systems - 1),
                )

            policy = jax.checkpoint_policies.save_only_these_names(*self._saved_names(chunks.source.size, x.dtype))
            messages = jax.checkpoint(system_messages, prevent_cse=False, policy=policy)

            def step(total, chunk_and_system):
                chunk, system = chunk_and_system
                return total.at[chunk.target].add(messages(per_system, x, chunk, system)), None

            total, _ = jax.lax.scan(step, jnp.zeros_like(x), (chunks, chunk_systems))
            return total


def with_edge_chunk_size(tree, size: int):
    """A copy of `tree` (a model or any pytree of modules) whose `Edgewise` layers use `size`-edge chunks.

    `edge_chunk_size` is static (part of the compiled program), so it is set on a rebuilt copy.
    A size at least the edge count gives the unchunked program: one `scan` step, whose FLOPs
    XLA's cost analysis counts correctly (it counts a loop body once).
    """
    tree = jax.tree.map(lambda leaf: leaf, tree)  # new module instances, same arrays
    for module in jax.tree.leaves(tree, is_leaf=lambda m: isinstance(m, Edgewise)):
        if isinstance(module, Edgewise):
            object.__setattr__(module, "edge_chunk_size", size)
    return tree


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
