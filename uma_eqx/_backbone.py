"""`UMABackbone`: embeddings, expert routing, edge frames, blocks, final norm."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._block import EdgeFrame, UMABlock, edge_degree_sum, make_norm
from ._config import ChargeSpinEmbeddingType, ExpertNorm, UMAConfig
from ._constants import EDGE_DEGREE_RESCALE, MOLE_SOFTMAX_OFFSET
from ._graph import AtomicGraph
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .nn import (
    AbstractChargeSpinEmbedding,
    AbstractEquivariantNorm,
    DatasetEmbedding,
    EdgeScalars,
    FourierChargeSpinEmbedding,
    GaussianBasis,
    Linear,
    LinearChargeSpinEmbedding,
    MoLERouting,
    RadialMLP,
    TableChargeSpinEmbedding,
    factor_radial_mlps,
    polynomial_envelope,
)
from .nn._embedding import ChargeSpinTarget
from .so3 import safe_norm


def make_charge_spin_embedding(config: UMAConfig, target: ChargeSpinTarget, dtype, key) -> AbstractChargeSpinEmbedding:
    """The charge or spin embedding named by `config.chg_spin_emb_type` (the one dispatch on it)."""
    trainable = config.charge_spin_embedding_trainable
    match config.chg_spin_emb_type:
        case "rand_emb":
            return TableChargeSpinEmbedding(target, config.sphere_channels, dtype, trainable, key=key)
        case "pos_emb":
            return FourierChargeSpinEmbedding(target, config.sphere_channels, dtype, trainable, key=key)
        case "lin_emb":
            return LinearChargeSpinEmbedding(target, config.sphere_channels, dtype, trainable, key=key)
        case other:
            raise ValueError(
                f"unknown chg_spin_emb_type {other!r}: use one of {list(ChargeSpinEmbeddingType.__args__)}"
            )


class ExpertRouter(eqx.Module):
    """Computes MoLE expert coefficients from composition and the system embedding.

    Port of `escn_moe.py:eSCNMDMoeBackbone.set_MOLE_coefficients` (eval mode):
    `c = norm(MLP([mean_atoms comp_emb(Z), csd]))` with the MLP
    `Linear, SiLU, Linear, SiLU, Linear, SiLU` and `norm = softmax + 0.005` (or `pnorm`).
    """

    composition_embedding: Float[Array, "elements channels"] | None
    routing_mlp: tuple[Linear, Linear, Linear]
    composition_mean_includes_self: bool = eqx.field(static=True)
    coefficient_norm: str = eqx.field(static=True)

    def __init__(self, config: UMAConfig, dtype=None, *, key):
        k0, k1, k2, k3 = jax.random.split(key, 4)
        c, e = config.sphere_channels, config.num_experts
        dtype = jnp.float32 if dtype is None else dtype
        self.composition_embedding = (
            jax.random.normal(k0, (config.max_num_elements, c), dtype) if config.use_composition_embedding else None
        )
        width = (2 if config.use_composition_embedding else 1) * c
        self.routing_mlp = (
            Linear(width, 2 * e, dtype=dtype, key=k1),
            Linear(2 * e, 2 * e, dtype=dtype, key=k2),
            Linear(2 * e, e, dtype=dtype, key=k3),
        )
        self.composition_mean_includes_self = config.composition_mean_includes_self
        if config.expert_coefficient_norm not in ExpertNorm.__args__:
            raise ValueError(
                f"unknown expert_coefficient_norm {config.expert_coefficient_norm!r}: "
                f"use one of {list(ExpertNorm.__args__)}"
            )
        self.coefficient_norm = config.expert_coefficient_norm

    def __call__(
        self, graph: AtomicGraph, system_embedding: Float[Array, "systems channels"]
    ) -> Float[Array, "systems experts"]:
        features = [system_embedding]
        if self.composition_embedding is not None:
            num_systems = system_embedding.shape[0]
            per_atom = self.composition_embedding[graph.atomic_numbers] * graph.atom_mask[:, None]
            total = jax.ops.segment_sum(per_atom, graph.system_index, num_segments=num_systems)
            count = jax.ops.segment_sum(
                graph.atom_mask.astype(total.dtype), graph.system_index, num_segments=num_systems
            )
            if self.composition_mean_includes_self:
                count = count + 1
            features.insert(0, total / jnp.where(count > 0, count, 1)[:, None])
        h = jnp.concatenate(features, axis=-1)
        for lin in self.routing_mlp:
            h = jax.nn.silu(lin(h))
        match self.coefficient_norm:
            case "softmax":
                return jax.nn.softmax(h, axis=-1) + MOLE_SOFTMAX_OFFSET
            case "pnorm":
                a = jnp.abs(h) + 2.0 / h.shape[0]
                return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-12)
            case other:
                raise ValueError(f"unknown expert coefficient norm {other!r}")


class AbstractGraphExchange(eqx.Module):
    """What a backbone evaluating one part of a partitioned graph needs from the other parts.

    The hook of graph parallelism (`uma_eqx.parallel`): each device holds a local graph of the
    atoms it owns followed by its halo (remote source atoms of its edges). The backbone's
    maths is unchanged; it asks this object for the two things that cross parts:

    - `refresh`: before each block, the halo rows of
      the node features are replaced by their owners' rows (the owners hold complete sums of
      incoming messages);
    - `system_sum`: per-system sums (atom counts,
      the charge/spin channel sums of `_balance_channels`, energies) are summed over parts.

    A part's local graph holds its `owned` rows first; every edge's target is among them. The
    blocks update only those rows (the halo rows are message sources, refreshed before each
    block), so the backbone's output has `owned` rows.

    `None` (the default of [`UMABackbone.__call__`][]) is one part holding everything. With
    an exchange, the backbone does not run [`uma_eqx.AtomicGraph.checked`][] on its part
    (its run-time error branch cannot live inside `shard_map`): the caller checks the whole
    graph once.
    """

    #: Rows of the local graph this part owns (the first rows; every edge targets one of them).
    owned: eqx.AbstractVar[int]

    @abc.abstractmethod
    def refresh(self, x: Float[Array, "atoms ..."]) -> Float[Array, "rows ..."]:
        """**Arguments:**

        - `x`: per-row values of the local graph, owned rows first (any rows after the
          `owned` ones are ignored).

        **Returns:**

        `(owned + halo, ...)`: the owned rows, then every halo row from its owner.
        """

    @abc.abstractmethod
    def system_sum(self, s: Float[Array, "systems ..."]) -> Float[Array, "systems ..."]:
        """**Arguments:**

        - `s`: this part's per-system partial sums (over its owned atoms).

        **Returns:**

        The sums over all parts (the same on every part).
        """


class UMABackbone(eqx.Module):
    """The UMA (eSCN-MD) backbone: graph -> node features `(atoms, coeffs, channels)`.

    Port of `fairchem.core.models.uma.escn_md.eSCNMDBackbone.forward` and its MoLE variant
    `escn_moe.py:eSCNMDMoeBackbone`. Expert coefficients are an explicit array (see
    [`UMABackbone.expert_coefficients`][]); a merged model (see `uma_eqx.merge_experts`) has
    `router = None` and plain linears.
    """

    sphere_embedding: Float[Array, "elements channels"]
    charge_embedding: AbstractChargeSpinEmbedding
    spin_embedding: AbstractChargeSpinEmbedding
    dataset_embedding: DatasetEmbedding | None
    mix_csd: Linear
    router: ExpertRouter | None
    source_embedding: Float[Array, "elements edge_channels"]
    target_embedding: Float[Array, "elements edge_channels"]
    edge_degree_rad: RadialMLP
    blocks: tuple[UMABlock, ...]
    norm: AbstractEquivariantNorm
    config: UMAConfig = eqx.field(static=True)

    def __init__(self, config: UMAConfig, dtype=None, *, key):
        keys = jax.random.split(key, 10 + config.num_layers)
        dtype = jnp.float32 if dtype is None else dtype
        c, ce = config.sphere_channels, config.edge_channels
        self.sphere_embedding = jax.random.normal(keys[0], (config.max_num_elements, c), dtype)
        self.charge_embedding = make_charge_spin_embedding(config, "charge", dtype, keys[1])
        self.spin_embedding = make_charge_spin_embedding(config, "spin", dtype, keys[2])
        if config.dataset_embedding_names is not None:
            rows = tuple(config.datasets.index(name) for name in config.dataset_embedding_names)
            self.dataset_embedding = DatasetEmbedding(
                len(config.datasets), c, rows, dtype, config.dataset_embedding_trainable, key=keys[3]
            )
        else:
            self.dataset_embedding = None
        self.mix_csd = Linear((3 if self.dataset_embedding is not None else 2) * c, c, dtype=dtype, key=keys[4])
        self.router = ExpertRouter(config, dtype, key=keys[5]) if config.num_experts > 0 else None
        self.source_embedding = jax.random.uniform(keys[6], (config.max_num_elements, ce), dtype, -1e-3, 1e-3)
        self.target_embedding = jax.random.uniform(keys[7], (config.max_num_elements, ce), dtype, -1e-3, 1e-3)
        radial = [config.num_distance_basis + 2 * ce, ce, ce, (config.lmax + 1) * c]
        self.edge_degree_rad = RadialMLP(radial, dtype, key=keys[8])
        moe = set(config.moe_layers)
        self.blocks = tuple(
            UMABlock.from_config(config, config.num_experts if i in moe else 0, dtype, key=keys[10 + i])
            for i in range(config.num_layers)
        )
        self.norm = make_norm(config.norm_type, config.lmax, c, dtype)
        self.config = config

    def system_embedding(self, graph: AtomicGraph) -> Float[Array, "systems channels"]:
        """`SiLU(mix_csd([charge, spin, dataset]))` (`escn_md.py:csd_embedding`)."""
        parts = [self.charge_embedding(graph.charge), self.spin_embedding(graph.spin)]
        if self.dataset_embedding is not None:
            parts.append(self.dataset_embedding(graph.dataset_index))
        return jax.nn.silu(self.mix_csd(jnp.concatenate(parts, axis=-1)))

    def expert_coefficients(self, graph: AtomicGraph) -> Float[Array, "systems experts"]:
        """MoLE mixing coefficients of each system of `graph` (composition, charge, spin, task)."""
        if self.router is None:
            raise ValueError("this backbone has no experts (dense or already merged)")
        return self.router(graph, self.system_embedding(graph))

    def edge_frame(
        self,
        graph: AtomicGraph,
        roll: Float[Array, ""] | float = 0.0,
        strain: Float[Array, "systems 3 3"] | None = None,
    ) -> tuple[EdgeFrame, Float[Array, " edges"]]:
        """Edge rotations, envelope-weighted inverse rotations and edge scalars.

        `strain` (optional) deforms every edge vector of system `s` as `r (I + eps_s)`: the
        energy depends on positions and cell only through edge vectors, so this is the
        homogeneous deformation used for the stress, without the round-off of straining
        absolute positions.
        """
        cfg = self.config
        # padded edges get fairchem's fake-edge vector (cutoff + 1 per component): envelope 0.
        vec = graph.edge_vectors(far=cfg.cutoff + 1.0)
        if strain is not None:
            deform = jnp.eye(3, dtype=vec.dtype) + strain.astype(vec.dtype)
            edge_system = graph.system_index[graph.edge_index[1]]
            strained = jnp.einsum("ed,edk->ek", vec, deform[edge_system])
            vec = jnp.where(graph.edge_mask[:, None], strained, vec)
        distance = safe_norm(vec)
        envelope = polynomial_envelope(distance / cfg.cutoff)
        source, target = graph.edge_index[0], graph.edge_index[1]
        z = graph.atomic_numbers
        basis = jax.vmap(GaussianBasis(cfg.cutoff, cfg.num_distance_basis))(distance)
        frame = EdgeFrame(
            vec,
            jnp.broadcast_to(jnp.asarray(roll, vec.dtype), distance.shape),
            envelope,
            EdgeScalars(basis, z[source], z[target]),
            source,
            target,
            graph.system_index[target],
            cfg.lmax,
            cfg.mmax,
        )
        return frame, envelope

    def __call__(
        self,
        graph: AtomicGraph,
        roll: Float[Array, ""] | float = 0.0,
        expert_coefficients: Float[Array, "systems experts"] | None = None,
        strain: Float[Array, "systems 3 3"] | None = None,
        settings: ExecutionSettings = DEFAULT_SETTINGS,
        exchange: AbstractGraphExchange | None = None,
    ) -> Float[Array, "atoms coeffs channels"]:
        """Node features after the final norm.

        **Arguments:**

        - `graph`: the (batched, possibly padded) [`AtomicGraph`][].
        - `roll`: rotation about the edge axis (fairchem draws it at random; default 0).
        - `expert_coefficients`: override the routed MoLE coefficients (default: computed).
        - `strain`: homogeneous deformation of each system's edge vectors (for the stress).
        - `settings`: how to execute (see [`uma_eqx.ExecutionSettings`][]).
        - `exchange`: for a part of a partitioned graph (graph parallelism), how halo rows and
          per-system sums are completed (see `uma_eqx._backbone.AbstractGraphExchange`); `None` for
          a whole graph. Needs a model without a router (dense, or experts merged).

        **Returns:**

        `(atoms, (lmax+1)**2, sphere_channels)` node features (with an `exchange`, only the
        `exchange.owned` rows of this part).
        """
        cfg = self.config
        dtype = self.sphere_embedding.dtype
        if jnp.finfo(graph.positions.dtype).bits < jnp.finfo(dtype).bits:
            raise ValueError(
                f"the graph's positions are {jnp.dtype(graph.positions.dtype).name} but the model is "
                f"{jnp.dtype(dtype).name}: the geometry would lose precision silently; build the graph with "
                "AtomicGraph.for_model(model, ...) or from_atoms(..., dtype=model.dtype)"
            )
        if exchange is not None and self.router is not None:
            raise ValueError(
                "a partitioned graph (exchange=...) needs a model without MoLE routing: merge the experts "
                "first, e.g. uma_eqx.merge_experts_for(model, graph) on the whole structure"
            )
        if exchange is None:  # a partitioned graph's caller checks the whole graph once
            graph = graph.checked(cfg.max_num_elements, len(cfg.datasets))
        num_atoms = graph.atomic_numbers.shape[0]
        num_systems = graph.charge.shape[0]
        csd = self.system_embedding(graph)
        routing = None
        if self.router is not None:
            coefficients = self.router(graph, csd) if expert_coefficients is None else expert_coefficients
            # each system's edges, in whatever order they come, are gathered into chunks of their
            # own (`_block._split_edges`); no host callback here, so the compiled program can be
            # kept in the on-disk cache (`enable_compilation_cache`)
            edge_system = graph.system_index[graph.edge_index[1]]
            group_sizes = jax.ops.segment_sum(jnp.ones_like(edge_system), edge_system, num_segments=num_systems)
            routing = MoLERouting(coefficients, group_sizes)

        frame, _ = self.edge_frame(graph, roll, strain)
        x = jnp.zeros((num_atoms, (cfg.lmax + 1) ** 2, cfg.sphere_channels), dtype)
        atom_csd = csd[graph.system_index]
        x = x.at[:, 0, :].set(self.sphere_embedding[graph.atomic_numbers] + atom_csd)

        # the radial MLPs take the edge scalars factored (`EdgeScalars`): element tables built once
        edge_degree_rad, blocks = factor_radial_mlps(
            (self.edge_degree_rad, self.blocks), self.source_embedding, self.target_embedding
        )
        # edge-degree embedding (`nn/embedding.py:EdgeDegreeEmbedding`, rescale 5.0)
        degree = edge_degree_sum(frame, edge_degree_rad, num_atoms, cfg.sphere_channels, dtype, settings)
        x = x + degree / EDGE_DEGREE_RESCALE

        natoms = jax.ops.segment_sum(graph.atom_mask.astype(dtype), graph.system_index, num_segments=num_systems)
        if exchange is not None:
            natoms = exchange.system_sum(natoms)
        targets = None
        if exchange is not None:
            targets = exchange.owned  # the blocks update the owned rows only
            x = x[:targets]  # (refresh ignores the other rows)

        def step(block, x):
            if exchange is not None:  # the sources' rows, complete, from their owners
                x = exchange.refresh(x)
            x = block(x, atom_csd, frame, routing, settings, targets)
            return self._balance_channels(x, graph, natoms, exchange)

        if settings.scans_blocks(routing is not None) and _same_structure(blocks):
            # one traced and compiled block for all of them: the weights stacked per call
            arrays, static = eqx.partition(list(blocks), eqx.is_array)
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *arrays)
            x, _ = jax.lax.scan(lambda x, block: (step(eqx.combine(block, static[0]), x), None), x, stacked)
        else:
            for block in blocks:
                x = step(block, x)
        return self.norm(x)

    def _balance_channels(self, x, graph: AtomicGraph, natoms, exchange: AbstractGraphExchange | None = None):
        # `escn_md.py:balance_channels_batched`: shift l=0 channels so that their per-system
        # sum equals the charge (spin channels: spin - 1).
        cfg = self.config
        for (start, end), target in (
            (cfg.charge_balanced_channels, graph.charge),
            (cfg.spin_balanced_channels, graph.spin - 1),
        ):
            if end <= start:
                continue
            rows = x.shape[0]  # all atoms, or a part's owned rows (the first ones)
            mask, system_index = graph.atom_mask[:rows], graph.system_index[:rows]
            ch = x[:, 0, start:end]
            sums = jax.ops.segment_sum(ch * mask[:, None], system_index, num_segments=natoms.shape[0])
            if exchange is not None:
                sums = exchange.system_sum(sums)
            corr = (sums - target[:, None].astype(x.dtype)) / jnp.where(natoms > 0, natoms, 1)[:, None]
            x = x.at[:, 0, start:end].set(ch - corr[system_index])
        return x


def _same_structure(blocks) -> bool:
    """Whether `blocks` differ only in their arrays' values (so a `lax.scan` can run them)."""
    arrays, static = eqx.partition(list(blocks), eqx.is_array)
    shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), leaves) for leaves in arrays]
    return len(blocks) > 1 and all(
        eqx.tree_equal(static[0], other) is True and eqx.tree_equal(shapes[0], shape) is True
        for other, shape in zip(static[1:], shapes[1:])
    )
