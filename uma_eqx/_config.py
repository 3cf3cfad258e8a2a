"""`UMAConfig`: every architectural choice of a UMA checkpoint, validated once."""

import dataclasses
import json
from typing import Literal

NormType = Literal["rms_norm_sh", "layer_norm", "layer_norm_sh"]
FFType = Literal["spectral", "grid"]
ChargeSpinEmbeddingType = Literal["rand_emb", "pos_emb", "lin_emb"]
HeadType = Literal["mlp_energy", "linear_energy"]
ExpertNorm = Literal["softmax", "pnorm"]
#: The variant fields of `UMAConfig` and their allowed values: each is written once, in its
#: `Literal`, and dispatched once, in one exhaustive `match` (`_block.make_norm`,
#: `_block.make_atomwise`, `_backbone.make_charge_spin_embedding`, `_potential.make_energy_head`,
#: `_backbone.ExpertRouter`).
_VARIANTS = {
    "norm_type": NormType,
    "ff_type": FFType,
    "chg_spin_emb_type": ChargeSpinEmbeddingType,
    "head_type": HeadType,
    "expert_coefficient_norm": ExpertNorm,
}


@dataclasses.dataclass(frozen=True)
class UMAConfig:
    """Architecture of a UMA model (fairchem `eSCNMDBackbone` / `eSCNMDMoeBackbone` + heads).

    Version differences between published checkpoints are fields here, never name checks.

    **Fields:**

    - `sphere_channels`, `hidden_channels`, `edge_channels`: feature widths.
    - `lmax`, `mmax`: maximum degree of node features and maximum order in the edge frame.
    - `num_layers`: number of `UMABlock`s.
    - `num_distance_basis`, `cutoff`: Gaussian radial basis size and graph cutoff (Å).
    - `max_neighbors`: fairchem's neighbour cap (ties at the cap are kept), `None` for none.
    - `norm_type`, `ff_type`, `chg_spin_emb_type`: layer variants named as in fairchem.
    - `datasets`: the task names the model accepts (fairchem `dataset_mapping` keys, sorted).
    - `dataset_embedding_names`: embedding row used by each dataset (`dataset_mapping` values),
      or `None` when the model has no dataset embedding.
    - `num_experts`: MoLE experts in the SO(2) convolutions (0: a dense model).
    - `experts_in_layers`: blocks whose SO(2) linears are MoLE (`layers_moe`).
    - `use_composition_embedding`: composition feeds the routing MLP.
    - `composition_mean_includes_self`: UMA-S-1.2's `index_reduce(include_self=True)`, which
      divides the composition sum by `n + 1`.
    - `expert_coefficient_norm`: `softmax` (+0.005) or `pnorm`.
    - `charge_balanced_channels`, `spin_balanced_channels`: `(start, end)` channel ranges of
      `l = 0` balanced after every block (UMA-S-1.2), `(0, 0)` for none.
    - `head_type`: per-atom energy head (`mlp_energy`: MLP_EFS_Head / MLP_Energy_Head,
      `linear_energy`: Linear_Energy_Head).
    - `head_dataset_experts`: for each of `datasets`, the head expert it uses (`None`: a single
      head shared by all datasets).
    - `num_head_experts`: experts stored in each head linear (fairchem allocates one per
      dataset name, even when several names share a head), 0 for a plain head.
    - `tasks`: dataset names that have an energy task (usable as `task_name`); `None`: all.
    - `charge_spin_embedding_trainable`, `dataset_embedding_trainable`: fairchem's
      `cs_emb_grad` / `dataset_emb_grad`; frozen embeddings pass through `stop_gradient`.
    - `supports_single_atoms`: a lone non-periodic atom goes through the model (fairchem's
      `HydraModel.supports_single_atoms`, set by uma-s-1p2); otherwise the calculator refuses it.
    - `direct_forces`: the checkpoint also has a `Linear_Force_Head`.
    - `model_id`, `model_version`: informational; nothing branches on them.
    - `elements`: atomic numbers the model was trained on, when narrower than its embedding
      table (the built-in default model: 7 metals); `None`: every element `1..max_num_elements-1`.
    """

    sphere_channels: int
    hidden_channels: int
    edge_channels: int
    lmax: int
    mmax: int
    num_layers: int
    num_distance_basis: int
    cutoff: float
    datasets: tuple[str, ...]
    dataset_embedding_names: tuple[str, ...] | None = None
    max_num_elements: int = 100
    max_neighbors: int | None = 300
    norm_type: NormType = "rms_norm_sh"
    ff_type: FFType = "spectral"
    chg_spin_emb_type: ChargeSpinEmbeddingType = "rand_emb"
    num_experts: int = 0
    experts_in_layers: tuple[int, ...] | None = None
    use_composition_embedding: bool = False
    composition_mean_includes_self: bool = False
    expert_coefficient_norm: ExpertNorm = "softmax"
    charge_balanced_channels: tuple[int, int] = (0, 0)
    spin_balanced_channels: tuple[int, int] = (0, 0)
    head_type: HeadType = "mlp_energy"
    head_dataset_experts: tuple[int, ...] | None = None
    num_head_experts: int = 0
    tasks: tuple[str, ...] | None = None
    charge_spin_embedding_trainable: bool = False
    dataset_embedding_trainable: bool = False
    direct_forces: bool = False
    supports_single_atoms: bool = False
    model_id: str | None = None
    model_version: float | None = None
    elements: tuple[int, ...] | None = None

    def __post_init__(self):
        def bad(name, value, fix):
            raise ValueError(f"UMAConfig.{name}={value!r} is invalid: {fix}")

        for name in ("sphere_channels", "hidden_channels", "edge_channels", "num_layers", "num_distance_basis"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be a positive integer")
        if self.lmax < 1 or not 0 <= self.mmax <= self.lmax:
            bad("lmax/mmax", (self.lmax, self.mmax), "need lmax >= 1 and 0 <= mmax <= lmax")
        if self.cutoff <= 0:
            bad("cutoff", self.cutoff, "must be positive (Å)")
        if not self.datasets:
            bad("datasets", self.datasets, "need at least one dataset/task name")
        if self.dataset_embedding_names is not None:
            if len(self.dataset_embedding_names) != len(self.datasets):
                bad("dataset_embedding_names", self.dataset_embedding_names, "need one entry per dataset")
            if not set(self.dataset_embedding_names) <= set(self.datasets):
                bad("dataset_embedding_names", self.dataset_embedding_names, "values must be dataset names")
        if self.head_dataset_experts is not None:
            if len(self.head_dataset_experts) != len(self.datasets):
                bad("head_dataset_experts", self.head_dataset_experts, "need one expert index per dataset")
            if self.num_head_experts <= max(self.head_dataset_experts):
                bad("num_head_experts", self.num_head_experts, "must exceed every head_dataset_experts index")
        if self.tasks is not None and not set(self.tasks) <= set(self.datasets):
            bad("tasks", self.tasks, f"must be a subset of datasets {list(self.datasets)}")
        if self.num_experts < 0:
            bad("num_experts", self.num_experts, "must be >= 0")
        if self.elements is not None and (
            not isinstance(self.elements, tuple)
            or not all(isinstance(z, int) and 1 <= z < self.max_num_elements for z in self.elements)
            or len(set(self.elements)) != len(self.elements)
        ):
            bad("elements", self.elements, f"need a tuple of distinct atomic numbers in 1..{self.max_num_elements - 1}")
        for name, variant in _VARIANTS.items():
            allowed = variant.__args__
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"use one of {list(allowed)}")
        for name in ("charge_balanced_channels", "spin_balanced_channels"):
            start, end = getattr(self, name)
            if not 0 <= start <= end <= self.sphere_channels:
                bad(name, (start, end), f"need 0 <= start <= end <= sphere_channels={self.sphere_channels}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose SO(2) convolutions are MoLE."""
        if self.num_experts == 0:
            return ()
        return tuple(range(self.num_layers)) if self.experts_in_layers is None else self.experts_in_layers

    @property
    def task_names(self) -> tuple[str, ...]:
        """Names accepted as `task_name`."""
        return self.datasets if self.tasks is None else self.tasks

    def dataset_index(self, task_name: str) -> int:
        """Index of `task_name` in `datasets`; a clear error lists the valid names."""
        if task_name not in self.task_names:
            raise ValueError(f"unknown task_name {task_name!r}: this model's tasks are {list(self.task_names)}")
        return self.datasets.index(task_name)

    def resolve_task(self, task_name: str | None, atoms=None) -> str:
        """The task of a structure: `task_name` if given, else `atoms.info["task"]`, else the
        model's only task. Raises `ValueError` (listing this model's tasks) when none applies or
        the name is unknown."""
        if task_name is None and atoms is not None and atoms.info.get("task") is not None:
            task_name = str(atoms.info["task"])
        if task_name is None:
            if len(self.task_names) != 1:
                raise ValueError(
                    f"no task given: pass task_name= (or set atoms.info['task']) to one of {list(self.task_names)}"
                )
            task_name = self.task_names[0]
        self.dataset_index(task_name)  # unknown task: the error lists the valid names
        return task_name

    def check_elements(self, atomic_numbers) -> None:
        """Raise `ValueError` naming any atomic number the model does not cover (see `elements`)."""
        limit = self.max_num_elements
        allowed = set(range(1, limit)) if self.elements is None else set(self.elements)
        bad = sorted({int(z) for z in atomic_numbers} - allowed)
        if bad:
            from ase.data import chemical_symbols

            have = f"1..{limit - 1}" if self.elements is None else " ".join(chemical_symbols[z] for z in self.elements)
            names = ", ".join(f"{z} ({chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'})" for z in bad)
            raise ValueError(
                f"atomic number(s) {names} are outside this model's elements ({have}); remove those atoms "
                "or use a model that covers them"
            )

    def check_atoms(self, atoms, label: str = "structure") -> None:
        """Refuse a structure (`ase.Atoms`) the model cannot evaluate, with the reason and the fix.

        Checks the elements (`check_elements`) and fairchem's rule that a single non-periodic
        atom needs a model with `supports_single_atoms` (fairchem tabulates isolated-atom
        energies instead of running the model). `label` names the structure in the error.
        """
        try:
            self.check_elements(atoms.get_atomic_numbers())
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        if len(atoms) == 1 and not atoms.pbc.any() and not self.supports_single_atoms:
            raise ValueError(
                f"{label}: a single non-periodic atom; this model does not support isolated atoms (fairchem "
                "needs tabulated atom references for them): put the atom in a periodic box or use reference energies"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UMAConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown UMAConfig fields {sorted(unknown)}: written by a newer uma_eqx?")
        for key, value in data.items():
            if isinstance(value, list):
                data[key] = tuple(value)
        return cls(**data)
