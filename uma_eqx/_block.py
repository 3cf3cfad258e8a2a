"""`UMABlock`: norm -> edgewise SO(2) message passing -> norm -> atomwise feed-forward."""

import abc
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from ._config import FFType, NormType, UMAConfig
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
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
    map_mole,
)
from .so3 import Rotation, coefficient_layout, edge_rotation_matrix, s2_grid_matrices, wigner_d_from_matrix


def make_norm(norm_type: NormType, lmax: int, channels: int, dtype=None) -> AbstractEquivariantNorm:
    """The equivariant norm named `norm_type` (`nn/layer_norm.py:get_normalization_layer`).

    The one dispatch on `UMAConfig.norm_type`.

    **Arguments:**

    - `norm_type`: `"rms_norm_sh"`, `"layer_norm"` or `"layer_norm_sh"`.
    - `lmax`, `channels`: feature shape `((lmax + 1)**2, channels)`.
    - `dtype`: parameter dtype.

    **Returns:**

    The norm layer; an unknown name raises `ValueError` listing the known ones.
    """
    match norm_type:
        case "rms_norm_sh":
            return EquivariantRMSNorm(lmax, channels, dtype)
        case "layer_norm":
            return EquivariantLayerNorm(lmax, channels, dtype)
        case "layer_norm_sh":
            return EquivariantLayerNormSH(lmax, channels, dtype)
        case other:
            raise ValueError(f"unknown norm_type {other!r}: use one of {list(NormType.__args__)}")


class EdgeFrame(eqx.Module):
    """Per-edge geometry shared by every block; the rotations are made from it chunk by chunk.

    The Wigner-D rotations into and out of each edge's frame are `(m_coeffs, coeffs)` matrices
    per edge, about 50x the bytes of the edge vector they come from. Keeping them for the
    whole graph (and their cotangents, per block, in the backward pass) is what made memory
    grow by about 7 kB per edge; [`rotations`][uma_eqx._block.EdgeFrame.rotations] instead
    builds them where they are used, one edge chunk at a time, inside the chunk's
    `jax.checkpoint`, so that only the vectors stay alive between blocks. Same maths, same
    numbers; the rotations are computed once per block instead of once per call.

    **Attributes:**

    - `vector`: `(edges, 3)` edge vectors `r_source - r_target` (strained for the stress;
      padded edges carry fairchem's far vector beyond the cutoff; null slots of a chunk
      layout are zero).
    - `roll`: `(edges,)` rotation about the edge axis (the same for every edge of a call).
    - `envelope`: `(edges,)` polynomial envelope of the edge length (0 beyond the cutoff and
      on null slots).
    - `x_edge`: the radial MLPs' input (radial basis and the endpoints' elements).
    - `source`, `target`: edge endpoints (edges sorted by `target`).
    - `system`: system of each edge (of its target atom).
    - `lmax`, `mmax`: node degrees and orders kept in the edge frame.
    """

    vector: Float[Array, "edges 3"]
    roll: Float[Array, " edges"]
    envelope: Float[Array, " edges"]
    x_edge: EdgeScalars
    source: Int[Array, " edges"]
    target: Int[Array, " edges"]
    system: Int[Array, " edges"]
    lmax: int = eqx.field(static=True)
    mmax: int = eqx.field(static=True)

    def rotations(self) -> tuple[Rotation, Rotation]:
        """The rotation into each edge's frame and the envelope-weighted rotation back.

        `to_edge = D(R_e)` restricted to the `|m| <= mmax` rows (m-major) and
        `from_edge = envelope_e D(R_e)^T` (orthogonal: the transpose is the inverse), with
        `R_e = edge_rotation_matrix(vector_e, roll_e)`. A null slot (zero vector) gets an
        arbitrary valid direction; its zero envelope makes its messages and their gradients 0.

        **Returns:**

        `(to_edge, from_edge)`: [`uma_eqx.so3.Rotation`][]s of shapes
        `(edges, m_coeffs, coeffs)` and `(edges, coeffs, m_coeffs)`.
        """
        null = jnp.all(self.vector == 0, axis=-1, keepdims=True)
        vector = jnp.where(null, jnp.ones_like(self.vector), self.vector)
        rot = jax.vmap(edge_rotation_matrix)(vector, self.roll)
        wigner = jax.vmap(wigner_d_from_matrix, in_axes=(0, None))(rot, self.lmax)
        wigner = wigner[:, coefficient_layout(self.lmax, self.mmax).m_major_rows, :]
        inverse = jnp.swapaxes(wigner, 1, 2) * self.envelope[:, None, None]
        return Rotation.of(wigner), Rotation.of(inverse)


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


def _split_edges(frame: EdgeFrame, chunk_size: int, num_groups: int) -> tuple[EdgeFrame, Int[Array, " chunks"]]:
    """The edges of `frame` that carry a message, laid out as `(chunks, chunk, ...)`, no chunk
    mixing two groups.

    An edge carries a message when its envelope is not 0: a masked (padded) edge or a
    candidate pair beyond the cutoff (a Verlet list's skin) has envelope 0, so its message
    and its gradients are exactly 0 and it is left out. The groups are the systems
    (`frame.system`) when `num_groups > 1`, else all edges form one group; the edges may come
    in any order (a stable sort by group, live edges first, gathers them). Each group starts
    a new chunk; slots left over are null edges (zero vector, envelope and radial features,
    hence zero messages and zero gradients), and chunks past the last group's hold only null
    edges: [`skip_unused`][uma_eqx._block.skip_unused] skips those, so a graph costs its live
    edges, not its edge capacity.

    **Returns:**

    The chunked frame and the group of each chunk (`num_groups` for unused chunks, which
    hold only null edges).
    """
    num_edges = frame.source.shape[0]
    live = frame.envelope != 0  # (float32 round-off can make an envelope just inside the cutoff negative)
    group_of_edge = frame.system if num_groups > 1 else jnp.zeros_like(frame.system)
    counts = jax.ops.segment_sum(live.astype(jnp.int32), group_of_edge, num_segments=num_groups)
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
    # the live edges by group (each group's in their order), then every other edge
    edge = jnp.argsort(group_of_edge + num_groups * (~live).astype(group_of_edge.dtype), stable=True)[edge]

    def place(a):
        a = a[edge]
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = jnp.where(valid.reshape(-1, *([1] * (a.ndim - 1))), a, 0)
        return a.reshape(num_chunks, chunk, *a.shape[1:])

    return jax.tree.map(place, frame), chunk_group


def scatter_chunks(
    messages: Callable[[EdgeFrame, Int[Array, ""]], Float[Array, "chunk_edges ..."]],
    chunks: EdgeFrame,
    chunk_groups: Int[Array, " chunks"],
    init: Float[Array, "atoms ..."],
) -> Float[Array, "atoms ..."]:
    """`init` plus every chunk's messages summed onto their target atoms, one chunk at a time.

    A `lax.scan` over the chunks of [`_split_edges`][uma_eqx._block._split_edges]: only one
    chunk's per-edge arrays (its rotations, its messages) exist at a time.

    **Arguments:**

    - `messages`: `(chunk, group) -> (chunk_edges, ...)` messages of one chunk (wrap it with
      [`skip_unused`][uma_eqx._block.skip_unused]).
    - `chunks`: the chunked frame.
    - `chunk_groups`: the group (system) of each chunk.
    - `init`: `(atoms, ...)` the sum to add to.

    **Returns:**

    `(atoms, ...)`: `init + sum_e messages_e` on each target.
    """

    def step(total, chunk_and_group):
        chunk, group = chunk_and_group
        return total.at[chunk.target].add(messages(chunk, group)), None

    total, _ = jax.lax.scan(step, init, (chunks, chunk_groups))
    return total


def skip_unused(
    run: Callable[[Int[Array, ""]], Float[Array, "chunk_edges ..."]],
    group: Int[Array, ""],
    num_groups: int,
    like: jax.ShapeDtypeStruct,
) -> Float[Array, "chunk_edges ..."]:
    """`run(group)` for a used chunk, zeros (without computing) for an unused one.

    Call it inside the chunk's `jax.checkpoint`: a `lax.cond` outside it, in the scan's body,
    makes JAX keep the branch's operands (the weights) once per chunk for the backward pass.
    Under `vmap` the `cond` becomes a select, which computes both branches.

    **Arguments:**

    - `run`: `group -> messages` of a chunk of `group` (`0 <= group < num_groups`).
    - `group`: the chunk's group from [`_split_edges`][uma_eqx._block._split_edges]
      (`num_groups` for an unused chunk).
    - `num_groups`: groups of the layout.
    - `like`: shape and dtype of the messages.

    **Returns:**

    The chunk's messages.
    """
    return jax.lax.cond(
        group < num_groups,
        run,
        lambda _: jnp.zeros(like.shape, like.dtype),
        jnp.minimum(group, num_groups - 1),
    )


def edge_degree_sum(
    frame: EdgeFrame,
    radial: Callable[[EdgeScalars], Float[Array, "edges features"]],
    num_atoms: int,
    channels: int,
    dtype,
    settings: ExecutionSettings = DEFAULT_SETTINGS,
) -> Float[Array, "atoms coeffs channels"]:
    """The edge-degree embedding's messages summed on each target atom (before the rescale).

    Port of `fairchem.core.models.uma.nn.embedding.EdgeDegreeEmbedding.forward` (without its
    division by `rescale_factor`): the radial MLP's `(lmax + 1) x channels` outputs are the
    `m = 0` coefficients in the edge frame, rotated back with the envelope-weighted inverse
    rotation, `m_e = envelope_e D(R_e)^T[:, :lmax+1] rad(x_edge)_e`. Runs edge chunk by edge
    chunk (`settings.edge_chunk_size`) under `jax.checkpoint`, like the blocks' messages.

    **Arguments:**

    - `frame`: every edge of the graph.
    - `radial`: the edge-degree radial MLP, `(edges, (lmax + 1) channels)`.
    - `num_atoms`: atoms of the graph.
    - `channels`: `sphere_channels`.
    - `dtype`: the node features' dtype (promoted with the geometry's).
    - `settings`: the chunk size.

    **Returns:**

    `(atoms, (lmax + 1)**2, channels)`.
    """
    m0 = frame.lmax + 1
    chunks, groups = _split_edges(frame, settings.chunk_size_for(frame.source.shape[0]), 1)

    dtype = jnp.result_type(frame.envelope.dtype, dtype)
    init = jnp.zeros((num_atoms, (frame.lmax + 1) ** 2, channels), dtype)

    def messages(chunk: EdgeFrame, group) -> Float[Array, "chunk_edges coeffs channels"]:
        def run(_):
            _, from_edge = chunk.rotations()
            return from_edge.columns(m0)(radial(chunk.x_edge).reshape(-1, m0, channels)).astype(dtype)

        return skip_unused(run, group, 1, jax.ShapeDtypeStruct((chunk.source.shape[0], *init.shape[1:]), dtype))

    return scatter_chunks(jax.checkpoint(messages, prevent_cse=False), chunks, groups, init)


class Edgewise(eqx.Module):
    """Rotate `[x_j, x_i]` into the edge frame, SO(2) conv, gate, SO(2) conv, rotate back, sum.

    Port of `fairchem.core.models.uma.escn_md_block.Edgewise` (`act_type="gate"`,
    general execution backend). Messages aggregate on the target atom with no degree rescale.

    How it runs is set by [`uma_eqx.ExecutionSettings`][]: edges are processed in chunks of
    at most `edge_chunk_size` (a `lax.scan` that scatter-adds each chunk's messages: the same
    sum in a different order). Each chunk's messages are under `jax.checkpoint`: the backward
    pass keeps only the SO(2)-convolution outputs that fit `residual_budget_bytes` and
    recomputes the rest of the chunk, so memory stays a small multiple of the edge count. With
    MoLE routing (unmerged experts) the experts are merged once per system and no chunk mixes
    two systems (see `_split_edges`), so a batch of different systems costs one matmul per
    chunk, like a single system.
    """

    so2_conv_1: SO2Convolution
    so2_conv_2: SO2Convolution
    lmax: int = eqx.field(static=True)
    mmax: int = eqx.field(static=True)

    def __init__(
        self,
        sphere_channels: int,
        hidden_channels: int,
        lmax: int,
        mmax: int,
        radial_channels: Sequence[int],
        num_experts: int = 0,
        dtype=None,
        *,
        key,
    ):
        """**Arguments:**

        - `sphere_channels`: node feature channels (the messages' input is both endpoints',
          `2 sphere_channels`, and their output `sphere_channels`).
        - `hidden_channels`: channels between the two SO(2) convolutions.
        - `lmax`, `mmax`: node degrees and orders kept in the edge frame.
        - `radial_channels`: widths of the first convolution's radial MLP before its output
          layer (`[basis + 2 edge_channels, edge_channels, edge_channels]` in UMA).
        - `num_experts`: MoLE experts of the SO(2) linears (0: plain linears).
        - `dtype`: parameter dtype.
        - `key`: PRNG key for the initialisation.
        """
        k1, k2 = jax.random.split(key)
        c, h = sphere_channels, hidden_channels
        self.so2_conv_1 = SO2Convolution(
            2 * c, h, lmax, mmax, list(radial_channels), lmax * h, num_experts, dtype, key=k1
        )
        self.so2_conv_2 = SO2Convolution(h, c, lmax, mmax, None, 0, num_experts, dtype, key=k2)
        self.lmax, self.mmax = lmax, mmax

    def messages(
        self,
        x: Float[Array, "atoms coeffs channels"],
        frame: EdgeFrame,
        routing: MoLERouting | None = None,
        gauss_fc_m: tuple[tuple, tuple] | None = None,
    ) -> Float[Array, "edges coeffs channels"]:
        """The message of each edge of `frame`, rotated back and envelope-weighted.

        **Arguments:**

        - `x`: `(atoms, coeffs, sphere_channels)` node features (after the block's first norm).
        - `frame`: the edges (all of them, or one chunk).
        - `routing`: MoLE coefficients when the SO(2) linears are MoLE (else ignored).
        - `gauss_fc_m`: `(so2_conv_1.gauss_fc_m(), so2_conv_2.gauss_fc_m())` for Gauss's
          three-product form, `None` for fairchem's four products.

        **Returns:**

        `(edges, coeffs, sphere_channels)` messages.
        """
        gauss_1, gauss_2 = (None, None) if gauss_fc_m is None else gauss_fc_m
        to_edge, from_edge = frame.rotations()
        pair = jnp.concatenate([x[frame.source], x[frame.target]], axis=-1)
        msg = to_edge(pair)
        # the m blocks stay separate arrays from the first convolution's input to the second's
        # output: no concatenation and re-split around the gate
        blocks = self.so2_conv_1.split_blocks(msg)
        blocks, gating = checkpoint_name(
            self.so2_conv_1.apply_blocks(blocks, frame.x_edge, routing, gauss_1), "so2_conv_1"
        )
        blocks = gate_activation_blocks(gating, blocks, coefficient_layout(self.lmax, self.mmax).m_block_degrees)
        blocks, _ = self.so2_conv_2.apply_blocks(blocks, None, routing, gauss_2)
        msg = checkpoint_name(jnp.concatenate(blocks, axis=1), "so2_conv_2")
        return from_edge(msg)

    def saved_names(self, num_edges: int, dtype, budget_bytes: int) -> tuple[str, ...]:
        """SO(2)-convolution outputs the backward pass keeps within `budget_bytes`.

        Cheapest first to drop; everything else of a chunk is recomputed.

        **Arguments:**

        - `num_edges`: edges of the whole graph (all chunks).
        - `dtype`: feature dtype.
        - `budget_bytes`: [`uma_eqx.ExecutionSettings`][]`.residual_budget_bytes`.

        **Returns:**

        The `checkpoint_name`s to save: both, the first, or none.
        """
        rows = coefficient_layout(self.lmax, self.mmax).num_m_coeffs
        conv_1 = rows * self.so2_conv_1.out_channels + self.so2_conv_1.extra_m0_channels
        conv_2 = rows * self.so2_conv_2.out_channels
        per_edge = num_edges * jnp.dtype(dtype).itemsize
        if (conv_1 + conv_2) * per_edge <= budget_bytes:
            return ("so2_conv_1", "so2_conv_2")
        if conv_1 * per_edge <= budget_bytes:
            return ("so2_conv_1",)
        return ()

    def __call__(
        self,
        x: Float[Array, "atoms coeffs channels"],
        frame: EdgeFrame,
        routing: MoLERouting | None,
        settings: ExecutionSettings = DEFAULT_SETTINGS,
        targets: int | None = None,
    ) -> Float[Array, "targets coeffs channels"]:
        """Sum of the messages of each atom's incoming edges.

        **Arguments:**

        - `x`: `(atoms, coeffs, sphere_channels)` node features.
        - `frame`: every edge of the graph.
        - `routing`: MoLE coefficients and edges per system (`None` for plain linears).
        - `settings`: chunk size, residual budget and Gauss form.
        - `targets`: only the first `targets` rows receive messages (every edge's target is
          below it: a partitioned graph's owned rows); `None` for all rows.

        **Returns:**

        `(targets, coeffs, sphere_channels)` (`targets = atoms` when `None`).
        """
        with jax.named_scope("edgewise"):
            num_edges = frame.source.shape[0]
            chunk_size = settings.chunk_size_for(num_edges)
            if routing is None:
                num_systems = 1
                chunks, chunk_systems = _split_edges(frame, chunk_size, 1)
                per_system = self
            else:
                # Merge the experts once per system, and lay the edges out so that every chunk
                # belongs to one system: a chunk then costs one matmul with its system's weights
                # (the per-system grouped matmul of fairchem's MOLE, without ragged shapes).
                num_systems = routing.coefficients.shape[0]
                chunks, chunk_systems = _split_edges(frame, chunk_size, num_systems)
                per_system = map_mole(lambda m: m.merge_per_system(routing.coefficients), self)
            # the complex products' weights, once per call rather than per chunk
            gauss = None
            if settings.gauss_form:
                gauss = (per_system.so2_conv_1.gauss_fc_m(), per_system.so2_conv_2.gauss_fc_m())
            weights = (per_system, gauss)

            def system_messages(weights, x, chunk, system):
                # The system's weights are sliced inside the checkpoint (the backward pass slices
                # them again instead of keeping a weight copy per chunk). The layout reserves the
                # worst case of chunks; unused ones are skipped (padding systems have no live
                # edges, hence no chunks).
                def run(system):
                    layer, gauss = map_mole(lambda m: m.expert(system), weights)
                    return layer.messages(x, chunk, None, gauss).astype(x.dtype)

                like = jax.ShapeDtypeStruct((chunk.source.shape[0], *x.shape[1:]), x.dtype)
                return skip_unused(run, system, num_systems, like)

            saved = self.saved_names(chunks.source.size, x.dtype, settings.residual_budget_bytes)
            policy = jax.checkpoint_policies.save_only_these_names(*saved)
            messages = jax.checkpoint(system_messages, prevent_cse=False, policy=policy)

            rows = x.shape[0] if targets is None else targets
            return scatter_chunks(
                lambda chunk, system: messages(weights, x, chunk, system),
                chunks,
                chunk_systems,
                jnp.zeros((rows, *x.shape[1:]), x.dtype),
            )


class AbstractAtomwise(eqx.Module):
    """Per-atom feed-forward network on `[coeffs, channels]` features."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms coeffs channels"]:
        """**Arguments:**

        - `x`: `(atoms, (lmax + 1)**2, sphere_channels)` node features.

        **Returns:**

        Features of the same shape.
        """


class SpectralAtomwise(AbstractAtomwise):
    """`SO3Linear -> gate(SiLU(Linear(x_0))) -> SO3Linear` (`ff_type="spectral"`).

    Port of `fairchem.core.models.uma.escn_md_block.SpectralAtomwise`.
    """

    scalar_mlp: Linear
    so3_linear_1: SO3Linear
    so3_linear_2: SO3Linear
    lmax: int = eqx.field(static=True)

    def __init__(self, sphere_channels: int, hidden_channels: int, lmax: int, dtype=None, *, key):
        """**Arguments:**

        - `sphere_channels`: node feature channels (input and output).
        - `hidden_channels`: channels of the gated hidden features.
        - `lmax`: node degrees.
        - `dtype`: parameter dtype.
        - `key`: PRNG key for the initialisation.
        """
        k1, k2, k3 = jax.random.split(key, 3)
        c, h = sphere_channels, hidden_channels
        self.scalar_mlp = Linear(c, lmax * h, dtype=dtype, key=k1)
        self.so3_linear_1 = SO3Linear(c, h, lmax, dtype, key=k2)
        self.so3_linear_2 = SO3Linear(h, c, lmax, dtype, key=k3)
        self.lmax = lmax

    def __call__(self, x: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms coeffs channels"]:
        """**Arguments:**

        - `x`: `(atoms, (lmax + 1)**2, sphere_channels)` node features.

        **Returns:**

        Features of the same shape.
        """
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

    def __init__(self, sphere_channels: int, hidden_channels: int, lmax: int, dtype=None, *, key):
        """**Arguments:**

        - `sphere_channels`: node feature channels (input and output).
        - `hidden_channels`: width of the per-grid-point MLP.
        - `lmax`: node degrees (sets the grid).
        - `dtype`: parameter dtype.
        - `key`: PRNG key for the initialisation.
        """
        k1, k2, k3 = jax.random.split(key, 3)
        c, h = sphere_channels, hidden_channels
        self.grid_mlp = (
            Linear(c, h, False, dtype, key=k1),
            Linear(h, h, False, dtype, key=k2),
            Linear(h, c, False, dtype, key=k3),
        )
        self.lmax = lmax

    def __call__(self, x: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms coeffs channels"]:
        """**Arguments:**

        - `x`: `(atoms, (lmax + 1)**2, sphere_channels)` node features.

        **Returns:**

        Features of the same shape.
        """
        to_grid, from_grid = s2_grid_matrices(self.lmax)
        g = jnp.einsum("bai,nic->nbac", jnp.asarray(to_grid, x.dtype), x)
        g = jax.nn.silu(self.grid_mlp[0](g))
        g = jax.nn.silu(self.grid_mlp[1](g))
        g = self.grid_mlp[2](g)
        return jnp.einsum("bai,nbac->nic", jnp.asarray(from_grid, x.dtype), g)


def make_atomwise(ff_type: FFType, sphere_channels: int, hidden_channels: int, lmax: int, dtype=None, *, key):
    """The atomwise feed-forward layer named `ff_type`: the one dispatch on `UMAConfig.ff_type`.

    **Arguments:**

    - `ff_type`: `"spectral"` ([`SpectralAtomwise`][uma_eqx._block.SpectralAtomwise]) or
      `"grid"` ([`GridAtomwise`][uma_eqx._block.GridAtomwise]).
    - `sphere_channels`, `hidden_channels`, `lmax`, `dtype`, `key`: the layer's arguments.

    **Returns:**

    The layer; an unknown name raises `ValueError` listing the known ones.
    """
    match ff_type:
        case "spectral":
            return SpectralAtomwise(sphere_channels, hidden_channels, lmax, dtype, key=key)
        case "grid":
            return GridAtomwise(sphere_channels, hidden_channels, lmax, dtype, key=key)
        case other:
            raise ValueError(f"unknown ff_type {other!r}: use one of {list(FFType.__args__)}")


class UMABlock(eqx.Module):
    """One UMA layer.

    Port of `fairchem.core.models.uma.escn_md_block.eSCNMD_Block`:
    `x = x + Edgewise(norm_1(x) + csd on l=0)`, then `x = x + Atomwise(norm_2(x))`.

    Built from its parts (`UMABlock(norm_1, edge_wise, norm_2, atom_wise)`) or from a
    config with [`UMABlock.from_config`][uma_eqx.UMABlock.from_config].
    """

    norm_1: AbstractEquivariantNorm
    edge_wise: Edgewise
    norm_2: AbstractEquivariantNorm
    atom_wise: AbstractAtomwise

    @classmethod
    def from_config(cls, config: UMAConfig, num_experts: int, dtype=None, *, key) -> "UMABlock":
        """The block of a UMA model with architecture `config`.

        **Arguments:**

        - `config`: the architecture (widths, degrees, norm and feed-forward variants).
        - `num_experts`: MoLE experts of this block's SO(2) linears (0: plain).
        - `dtype`: parameter dtype.
        - `key`: PRNG key for the initialisation.

        **Returns:**

        The `UMABlock`.
        """
        k1, k2 = jax.random.split(key)
        c, h, lmax = config.sphere_channels, config.hidden_channels, config.lmax
        radial = [config.num_distance_basis + 2 * config.edge_channels, config.edge_channels, config.edge_channels]
        return cls(
            make_norm(config.norm_type, lmax, c, dtype),
            Edgewise(c, h, lmax, config.mmax, radial, num_experts, dtype, key=k1),
            make_norm(config.norm_type, lmax, c, dtype),
            make_atomwise(config.ff_type, c, h, lmax, dtype, key=k2),
        )

    def __call__(
        self,
        x: Float[Array, "atoms coeffs channels"],
        system_embedding: Float[Array, "atoms channels"],
        frame: EdgeFrame,
        routing: MoLERouting | None,
        settings: ExecutionSettings = DEFAULT_SETTINGS,
        targets: int | None = None,
    ) -> Float[Array, "targets coeffs channels"]:
        """**Arguments:**

        - `x`: `(atoms, coeffs, channels)` node features.
        - `system_embedding`: `(atoms, channels)` charge/spin/dataset embedding of each atom's
          system, added to the `l = 0` features before the edgewise layer.
        - `frame`: the graph's edges.
        - `routing`: MoLE coefficients (`None` for plain or merged models).
        - `settings`: how the edgewise layer runs.
        - `targets`: update only the first `targets` rows (every edge's target is below it);
          the other rows are message sources only. A partitioned graph's halo rows are
          replaced before the next block anyway, so their feed-forward work would be wasted.
          `None` for all rows.

        **Returns:**

        `(targets, coeffs, channels)` updated features (`targets = atoms` when `None`).
        """
        with jax.named_scope("uma_block"):
            h = self.norm_1(x)
            h = h.at[:, 0, :].add(system_embedding)
            if targets is not None:
                x = x[:targets]
            x = x + self.edge_wise(h, frame, routing, settings, targets)
            return x + self.atom_wise(self.norm_2(x))
