"""`UMA` = backbone + heads, and its derivatives: forces, stress, hessian."""

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._backbone import AbstractGraphExchange, UMABackbone
from ._config import UMAConfig
from ._graph import AtomicGraph
from ._heads import AbstractEnergyHead, EnergyReferences, LinearEnergyHead, LinearForceHead, MLPEnergyHead
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .nn import MoLERouting, map_mole


class UMA(eqx.Module):
    """A UMA interatomic potential: `model(graph)` returns one energy (eV) per system.

    Port of fairchem's `HydraModel(eSCNMDMoeBackbone, DatasetSpecificMoEWrapper(MLP_EFS_Head))`
    plus the predict unit's post-processing (normaliser and element references), so that the
    energy equals `FAIRChemCalculator`'s.

    **Attributes:**

    - `backbone`: the [`UMABackbone`][].
    - `energy_head`: per-atom energy head (per-dataset experts when `config.head_dataset_experts`).
    - `force_head`: direct-force head, if the checkpoint has one.
    - `references`: per-task energy normalisation and element references.
    """

    backbone: UMABackbone
    energy_head: AbstractEnergyHead
    force_head: LinearForceHead | None
    references: EnergyReferences

    def __init__(self, config: UMAConfig, dtype=None, *, key):
        kb, kh, kf = jax.random.split(key, 3)
        self.backbone = UMABackbone(config, dtype, key=kb)
        num_heads = 0 if config.head_dataset_experts is None else config.num_head_experts
        match config.head_type:
            case "mlp_energy":
                self.energy_head = MLPEnergyHead(
                    config.sphere_channels, config.hidden_channels, num_heads, dtype, key=kh
                )
            case "linear_energy":
                self.energy_head = LinearEnergyHead(config.sphere_channels, num_heads, dtype, key=kh)
            case other:
                raise ValueError(f"unknown head_type {other!r}: use mlp_energy or linear_energy")
        self.force_head = LinearForceHead(config.sphere_channels, dtype, key=kf) if config.direct_forces else None
        self.references = EnergyReferences(len(config.datasets), config.max_num_elements, dtype)

    @property
    def config(self) -> UMAConfig:
        return self.backbone.config

    @property
    def dtype(self):
        return self.backbone.sphere_embedding.dtype

    @property
    def is_merged(self) -> bool:
        """True once the backbone experts were merged for a fixed composition."""
        return self.backbone.router is None and self.config.num_experts > 0

    def head_routing(self, graph: AtomicGraph, num_heads: int, rows: int | None = None) -> MoLERouting | None:
        if self.config.head_dataset_experts is None:
            return None
        expert = jnp.asarray(self.config.head_dataset_experts)[graph.dataset_index]
        coefficients = jax.nn.one_hot(expert, num_heads, dtype=self.dtype)
        system_index = graph.system_index[:rows]  # the head's rows: all atoms, or a part's owned rows
        sizes = jax.ops.segment_sum(jnp.ones_like(system_index), system_index, num_segments=graph.charge.shape[0])
        return MoLERouting(coefficients, sizes)

    def node_energies(
        self,
        graph: AtomicGraph,
        roll: Float[Array, ""] | float = 0.0,
        strain: Float[Array, "systems 3 3"] | None = None,
        settings: ExecutionSettings = DEFAULT_SETTINGS,
        exchange: AbstractGraphExchange | None = None,
    ) -> tuple[Float[Array, " atoms"], Float[Array, "atoms coeffs channels"]]:
        """Raw per-atom energies (zero on padded atoms) and the node features.

        **Arguments:** as for `__call__`.

        **Returns:**

        `(atoms,)` head outputs before normalisation and references, and the
        `(atoms, coeffs, channels)` backbone features.
        """
        features = self.backbone(graph, roll, strain=strain, settings=settings, exchange=exchange)
        num_heads = 0 if self.config.head_dataset_experts is None else self.config.num_head_experts
        rows = features.shape[0]  # all atoms, or (with an exchange) the part's owned rows
        e_atom = self.energy_head(features, self.head_routing(graph, num_heads, rows))
        if exchange is not None:  # a part's halo rows carry no energy
            e_atom = jnp.zeros(graph.atomic_numbers.shape, e_atom.dtype).at[:rows].set(e_atom)
        return jnp.where(graph.atom_mask, e_atom, 0.0), features

    @eqx.filter_jit
    def __call__(
        self,
        graph: AtomicGraph,
        roll: Float[Array, ""] | float = 0.0,
        strain: Float[Array, "systems 3 3"] | None = None,
        *,
        settings: ExecutionSettings = DEFAULT_SETTINGS,
        exchange: AbstractGraphExchange | None = None,
    ) -> Float[Array, " systems"]:
        """Total energy (eV) of each system; 0 for padded systems.

        **Arguments:**

        - `graph`: a batched [`AtomicGraph`][].
        - `roll`: edge-frame roll angle (any value gives the same energy up to round-off).
        - `strain`: optional homogeneous strain per system, applied to the edge vectors.
        - `settings`: how to execute (chunking, memory, fast paths, matmul precision); see
          [`uma_eqx.ExecutionSettings`][].
        - `exchange`: for one part of a partitioned graph (graph parallelism, see
          `uma_eqx.parallel`): how halo rows and per-system sums are completed; the energy
          returned is then the whole system's, on every part. `None` for a whole graph.

        **Returns:**

        `(systems,)` energies in eV.

        **Raises:**

        At run time (`eqx.error_if`), for a graph that the model cannot evaluate: atomic
        numbers outside the embedding, edges or atoms pointing past the graph, charge or spin
        outside the embedding tables, an unknown dataset index.
        """
        with _precision(settings):
            e_atom, _ = self.node_energies(graph, roll, strain, settings, exchange)
            num_systems = graph.charge.shape[0]
            raw = jax.ops.segment_sum(e_atom, graph.system_index, num_segments=num_systems)
            energy = self.references(
                raw, graph.dataset_index, graph.atomic_numbers, graph.system_index, graph.atom_mask
            )
            if exchange is not None:
                # the references are affine in the atoms: each part adds its atoms' share, and
                # the per-system constant (no atoms, zero raw energy) is added once
                none = jnp.zeros_like(graph.atom_mask)
                constant = self.references(
                    jnp.zeros_like(raw), graph.dataset_index, graph.atomic_numbers, graph.system_index, none
                )
                energy = exchange.system_sum(energy - constant) + constant
            return jnp.where(graph.system_mask, energy, 0.0)


def _precision(settings: ExecutionSettings):
    """`jax.default_matmul_precision(settings.matmul_precision)`, or nothing when it is `None`."""
    if settings.matmul_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(settings.matmul_precision)


@eqx.filter_jit
def energy_forces_stress(
    model: UMA,
    graph: AtomicGraph,
    roll: Float[Array, ""] | float = 0.0,
    *,
    stress: bool = True,
    settings: ExecutionSettings = DEFAULT_SETTINGS,
) -> dict[str, Array]:
    """Energy, conservative forces `-dE/dr` and stress `(1/V) dE/d(strain)`.

    Stress follows fairchem's `outputs.py:compute_forces_and_stress`: the derivative with
    respect to a symmetric strain `r' = r (I + eps)`, `h' = h (I + eps)`, divided by
    `|det h|` (for non-periodic systems fairchem's cell is the identity, so `V = 1`). The strain
    is applied to the edge vectors (through which alone positions and cell enter), which gives
    the same derivative with less round-off than straining absolute positions.
    Units eV, eV/Å, eV/Å³. Compiled (`eqx.filter_jit`: one program per input shape, inlined
    when called inside another `jit`) and differentiable.

    **Arguments:**

    - `model`: the model.
    - `graph`: a batched [`uma_eqx.AtomicGraph`][].
    - `roll`: edge-frame roll angle (default 0).
    - `stress`: also compute the stress.
    - `settings`: how to execute (see [`uma_eqx.ExecutionSettings`][]).

    **Returns:**

    A dict with `energy (systems,)`, `forces (atoms, 3)` and (if `stress`) `stress (systems, 3, 3)`.
    """
    num_systems = graph.charge.shape[0]
    strain0 = jnp.zeros((num_systems, 3, 3), graph.positions.dtype)

    def total(positions, strain):
        sym = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
        e = model(eqx.tree_at(lambda g: g.positions, graph, positions), roll, sym, settings=settings)
        return jnp.sum(e), e

    if stress:
        (grad_r, grad_s), energy = jax.grad(total, argnums=(0, 1), has_aux=True)(graph.positions, strain0)
        volume = jnp.abs(jnp.linalg.det(graph.cell))
        volume = jnp.where(graph.system_mask, volume, 1.0)
        out = {"energy": energy, "forces": -grad_r, "stress": grad_s / volume[:, None, None]}
    else:
        grad_r, energy = jax.grad(total, has_aux=True)(graph.positions, strain0)
        out = {"energy": energy, "forces": -grad_r}
    out["forces"] = jnp.where(graph.atom_mask[:, None], out["forces"], 0.0)
    return out


@eqx.filter_jit
def direct_forces(
    model: UMA,
    graph: AtomicGraph,
    roll: Float[Array, ""] | float = 0.0,
    *,
    settings: ExecutionSettings = DEFAULT_SETTINGS,
) -> Float[Array, "atoms 3"]:
    """Output of the direct-force head (`Linear_Force_Head`), for checkpoints that have one.

    **Arguments:** `model`, `graph`, `roll`, `settings` as for [`uma_eqx.energy_forces_stress`][].

    **Returns:**

    `(atoms, 3)` forces in eV/Å (non-conservative).
    """
    if model.force_head is None:
        raise ValueError("this model has no direct-force head (config.direct_forces is False)")
    with _precision(settings):
        return model.force_head(model.backbone(graph, roll, settings=settings))


@eqx.filter_jit
def hessian(
    model: UMA,
    graph: AtomicGraph,
    roll: Float[Array, ""] | float = 0.0,
    *,
    settings: ExecutionSettings = DEFAULT_SETTINGS,
) -> Float[Array, "n3 n3"]:
    """Hessian `d^2 E / dr dr` of the total energy, shape `(3 atoms, 3 atoms)`.

    This is the physical Hessian. (fairchem's `compute_hessian` additionally adds the energy
    normaliser's mean to every entry, a quirk of its untrained-task normalisers.)

    **Arguments:** `model`, `graph`, `roll`, `settings` as for [`uma_eqx.energy_forces_stress`][].

    **Returns:**

    The `(3 atoms, 3 atoms)` Hessian in eV/Å² (padding atoms included, with zero rows).
    """

    def total(flat):
        g = eqx.tree_at(lambda g: g.positions, graph, flat.reshape(-1, 3))
        return jnp.sum(model(g, roll, settings=settings))

    return jax.hessian(total)(graph.positions.reshape(-1))


def merge_experts(model: UMA, coefficients: Float[Array, " experts"]) -> UMA:
    """Bake MoLE expert coefficients into plain linears (fairchem's `merge_mole`).

    The result is tied to one composition, charge, spin and task: the ones that produced
    `coefficients` (see [`UMABackbone.expert_coefficients`][]). It computes the same energies
    for that system, faster.
    """
    if model.backbone.router is None:
        raise ValueError("model has no experts to merge (dense, or already merged)")
    coefficients = jnp.asarray(coefficients)
    if coefficients.ndim == 2:
        if coefficients.shape[0] != 1:
            raise ValueError(f"merge_experts needs coefficients of one system, got shape {coefficients.shape}")
        coefficients = coefficients[0]
    blocks = map_mole(lambda m: m.merge(coefficients), model.backbone.blocks)
    return eqx.tree_at(
        lambda m: (m.backbone.blocks, m.backbone.router), model, (blocks, None), is_leaf=lambda x: x is None
    )


@eqx.filter_jit
def merge_experts_for(model: UMA, graph: AtomicGraph) -> UMA:
    """`model` with its MoLE experts merged for the first system of `graph`.

    Shorthand for `merge_experts(model, model.backbone.expert_coefficients(graph)[0])`. The
    coefficients depend on the composition, charge, spin and task of system 0, not on the
    positions, so the merged model serves every geometry of that system; other systems in
    `graph` (for example the padding systems of a bucketed graph) are ignored. Compiled
    (`eqx.filter_jit`) and differentiable in the router's weights.
    """
    return merge_experts(model, model.backbone.expert_coefficients(graph)[0])
