"""`ExecutionSettings`: how to run a model (chunking, memory, fast paths, precision), not what it is."""

import dataclasses
from typing import Literal

#: Edges per chunk of the edgewise message passing (our choice, measured in
#: `benchmarks/performance_notes.md`). A chunk's widest features,
#: `(chunk, m_coeffs, 2 sphere_channels)` float32 (~4.7 MB for uma-s at 512 edges), stay in
#: cache, and the backward pass recomputes one chunk at a time instead of keeping every
#: layer's edge activations: memory is O(edges) with a small constant, time about the same.
DEFAULT_EDGE_CHUNK_SIZE = 512
#: Bytes per layer of SO(2)-convolution outputs that the backward pass may keep (summed over
#: edges); beyond it they are recomputed chunk by chunk (our choice). For uma-s (float32)
#: 512 MiB keeps both convolutions' outputs up to ~500 atoms (40k edges), the first one's up
#: to ~1000 atoms, and recomputes everything beyond, where memory matters more.
DEFAULT_RESIDUAL_BUDGET_BYTES = 2**29

MatmulPrecision = Literal["default", "high", "highest"]


@dataclasses.dataclass(frozen=True)
class ExecutionSettings:
    """How to execute a model: choices that change speed and memory, never the mathematics.

    Every combination computes the same energies, forces and stress up to floating-point
    round-off (the summation order changes); the plain path (`edge_chunk_size=None`,
    `gauss_form=False`, `merge_experts=False`) is the oracle the fast paths are tested
    against. The counterpart of fairchem's `InferenceSettings`. Settings are hashable and
    static: a compiled program is specialised on them, so pass the same object (or an equal
    one) to avoid recompiling.

    Pass it where the model runs: `model(graph, settings=...)`,
    [`uma_eqx.energy_forces_stress`][]`(model, graph, settings=...)`,
    `UMACalculator(model, ..., settings=...)`, [`uma_eqx.predict`][]`(..., settings=...)`,
    `uma_eqx.jax_md.energy_and_neighbor_fns(..., settings=...)`.

    **Fields:**

    - `edge_chunk_size`: edges per chunk of the edgewise message passing (a `lax.scan`
      over chunks, each under `jax.checkpoint`); `None`: all edges in one chunk (the plain
      program, whose FLOPs XLA's cost analysis counts correctly).
    - `residual_budget_bytes`: bytes per layer of SO(2)-convolution outputs the backward pass
      may keep; beyond it they are recomputed chunk by chunk (0: recompute everything).
    - `gauss_form`: the SO(2) convolutions' complex products with three matmuls (Gauss)
      instead of fairchem's four real products.
    - `merge_experts`: engines (calculator, predict, JAX-MD) merge MoLE experts once per
      composition, charge, spin and task (fairchem's `merge_mole`) instead of mixing them in
      every call. The model call itself never merges: it uses the model it is given.
    - `matmul_precision`: `jax.default_matmul_precision` for the model's matmuls; `None`
      leaves JAX's setting alone. On GPUs, float32 `"default"` may use TF32 (about 1e-3
      relative error); `"highest"` is full float32, as fairchem's `tf32=False`.
    - `scan_blocks`: run the backbone's blocks as one `lax.scan` over their stacked weights
      (one block is traced and compiled instead of all of them: a shorter first call) rather
      than one after the other. `None` (default): scan unless the model mixes MoLE experts in
      the call, where stacking every expert's weights per call costs more than it saves
      (measured in `benchmarks/performance_notes.md`).
    """

    edge_chunk_size: int | None = DEFAULT_EDGE_CHUNK_SIZE
    residual_budget_bytes: int = DEFAULT_RESIDUAL_BUDGET_BYTES
    gauss_form: bool = True
    merge_experts: bool = True
    matmul_precision: MatmulPrecision | None = None
    scan_blocks: bool | None = None

    def __post_init__(self):
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.edge_chunk_size is not None and not (integer(self.edge_chunk_size) and self.edge_chunk_size >= 1):
            raise ValueError(
                f"ExecutionSettings.edge_chunk_size={self.edge_chunk_size!r} is invalid: use a positive int, "
                "or None for one chunk of all edges"
            )
        if not (integer(self.residual_budget_bytes) and self.residual_budget_bytes >= 0):
            raise ValueError(
                f"ExecutionSettings.residual_budget_bytes={self.residual_budget_bytes!r} is invalid: use an "
                "int >= 0 (0 recomputes every chunk in the backward pass)"
            )
        for name in ("gauss_form", "merge_experts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ExecutionSettings.{name}={getattr(self, name)!r} is invalid: use True or False")
        if self.scan_blocks is not None and not isinstance(self.scan_blocks, bool):
            raise ValueError(
                f"ExecutionSettings.scan_blocks={self.scan_blocks!r} is invalid: use True, False or None (automatic)"
            )
        allowed = MatmulPrecision.__args__
        if self.matmul_precision is not None and self.matmul_precision not in allowed:
            raise ValueError(
                f"ExecutionSettings.matmul_precision={self.matmul_precision!r} is invalid: use one of "
                f"{list(allowed)} or None"
            )

    def chunk_size_for(self, num_edges: int) -> int:
        """Edges per chunk for a graph of `num_edges` edges."""
        return max(1, num_edges) if self.edge_chunk_size is None else self.edge_chunk_size

    def scans_blocks(self, mixes_experts: bool) -> bool:
        """Whether the backbone runs its blocks as one `lax.scan` (see `scan_blocks`).

        **Arguments:**

        - `mixes_experts`: the call mixes MoLE experts (an unmerged model's routing).
        """
        return (not mixes_experts) if self.scan_blocks is None else self.scan_blocks

    def replace(self, **changes) -> "ExecutionSettings":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


#: The settings used when none are passed.
DEFAULT_SETTINGS = ExecutionSettings()
