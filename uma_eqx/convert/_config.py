"""`UMAConfig` and task references from a fairchem checkpoint's configs, field by field."""

import os

import numpy as np

from .._config import UMAConfig
from ._checkpoint import FairchemCheckpoint, load_pytorch_checkpoint

_BACKBONES = {"eSCNMDBackbone": False, "eSCNMDMoeBackbone": True}

#: backbone kwargs copied into UMAConfig as they are.
_DIRECT = {
    "max_num_elements": "max_num_elements",
    "sphere_channels": "sphere_channels",
    "hidden_channels": "hidden_channels",
    "edge_channels": "edge_channels",
    "lmax": "lmax",
    "mmax": "mmax",
    "num_layers": "num_layers",
    "num_distance_basis": "num_distance_basis",
    "cutoff": "cutoff",
    "max_neighbors": "max_neighbors",
    "norm_type": "norm_type",
    "ff_type": "ff_type",
    "chg_spin_emb_type": "chg_spin_emb_type",
    "num_experts": "num_experts",
    "use_composition_embedding": "use_composition_embedding",
    "moe_expert_coefficient_norm": "expert_coefficient_norm",
    "model_version": "model_version",
    "cs_emb_grad": "charge_spin_embedding_trainable",
    "dataset_emb_grad": "dataset_embedding_trainable",
}

#: backbone kwargs whose value must be the one we implement (key -> allowed values).
_REQUIRED = {
    "distance_function": ("gaussian",),
    "act_type": ("gate",),
    "moe_type": ("so2",),
    "moe_single": (False,),
    "use_global_embedding": (False,),
    "grid_resolution": (None,),
    "direct_stress": (False,),
}

#: backbone kwargs that do not change the math of inference (graph-building switches, training
#: regularisers inactive in eval, memory/speed options with identical results).
_IGNORED = {
    "model",
    "otf_graph",
    "use_pbc",
    "use_pbc_single",
    "regress_forces",
    "regress_stress",
    "regress_hessian",
    "hessian_vmap",
    "activation_checkpointing",
    "use_cuda_graph_wigner",
    "use_quaternion_wigner",
    "radius_pbc_version",
    "always_use_pbc",
    "edge_chunk_size",
    "execution_mode",
    "num_sphere_samples",
    "moe_dropout",
    "composition_dropout",
    "moe_layer_type",
    "direct_forces",
    "dataset_list",
    "dataset_mapping",
    "use_dataset_embedding",
    "layers_moe",
    "charge_balanced_channels",
    "spin_balanced_channels",
}

_TOP_LEVEL = {
    "_target_",
    "backbone",
    "heads",
    "pass_through_head_outputs",
    "otf_graph",
    "model_id",
    "supports_single_atoms",
}

_ENERGY_HEADS = {"MLP_EFS_Head": "mlp_energy", "MLP_Energy_Head": "mlp_energy", "Linear_Energy_Head": "linear_energy"}
_WRAPPERS = {"DatasetSpecificMoEWrapper", "DatasetSpecificSingleHeadWrapper"}


def _short(name) -> str:
    return str(name).rsplit(".", 1)[-1]


def _channel_range(channels, name) -> tuple[int, int]:
    channels = sorted(int(c) for c in (channels or []))
    if not channels:
        return (0, 0)
    if channels != list(range(channels[0], channels[-1] + 1)):
        raise ValueError(f"{name}={channels} must be contiguous channel indices")
    return (channels[0], channels[-1] + 1)


def _mapping(names, mapping, what) -> dict[str, str]:
    if mapping is not None:
        return {str(k): str(v) for k, v in mapping.items()}
    if names is not None:
        return {str(n): str(n) for n in names}
    raise ValueError(f"{what}: neither dataset_mapping nor a dataset list is given")


def _parse_heads(heads: dict) -> dict:
    if not isinstance(heads, dict) or not heads:
        raise ValueError(f"model_config.heads must be a non-empty dict, got {heads!r}")
    out = {
        "energy_head_name": None,
        "force_head_name": None,
        "head_type": None,
        "head_mapping": None,
        "head_wrapped": False,
    }
    for name, spec in heads.items():
        spec = dict(spec)
        module = _short(spec.pop("module", ""))
        if module in _WRAPPERS:
            head_cls = _short(spec.pop("head_cls", ""))
            kwargs = dict(spec.pop("head_kwargs", None) or {})
            spec.pop("wrap_property", None)
            mapping = _mapping(spec.pop("dataset_names", None), spec.pop("dataset_mapping", None), f"heads.{name}")
            if module == "DatasetSpecificMoEWrapper":
                out["head_mapping"] = mapping
            out["head_wrapped"] = True
        else:
            head_cls, kwargs = module, spec
            spec = {}
        if kwargs.pop("reduce", "sum") != "sum":
            raise ValueError(f"heads.{name}: only reduce='sum' energy heads are supported")
        for key in ("wrap_property", "prefix"):
            kwargs.pop(key, None)
        if kwargs or spec:
            raise ValueError(f"heads.{name}: unsupported head options {sorted({**kwargs, **spec})}")
        if head_cls in _ENERGY_HEADS:
            if out["energy_head_name"] is not None:
                raise ValueError(f"model_config.heads has two energy heads: {out['energy_head_name']!r} and {name!r}")
            out["energy_head_name"], out["head_type"] = name, _ENERGY_HEADS[head_cls]
        elif head_cls == "Linear_Force_Head":
            out["force_head_name"] = name
        else:
            raise ValueError(
                f"heads.{name}: head class {head_cls!r} is not supported "
                f"(supported: {sorted(_ENERGY_HEADS)} and Linear_Force_Head)"
            )
    if out["energy_head_name"] is None:
        raise ValueError("model_config.heads has no energy head (MLP_EFS_Head, MLP_Energy_Head or Linear_Energy_Head)")
    return out


def _element_references(spec) -> np.ndarray | None:
    if spec is None:
        return None
    if isinstance(spec, dict):
        inner = spec.get("element_references", spec)
        if isinstance(inner, dict) and "_args_" in inner:
            return np.asarray(inner["_args_"][0], dtype=np.float64)
        return np.asarray(inner, dtype=np.float64)
    return np.asarray(spec, dtype=np.float64)


def parse_tasks(tasks_config: list[dict]) -> dict[str, dict]:
    """Per dataset: energy `mean`, `rmsd`, `element_references`, and forces/stress rmsd/mean."""
    out: dict[str, dict] = {}
    for task in tasks_config:
        prop = task.get("property")
        if prop not in ("energy", "forces", "stress"):
            raise ValueError(
                f"task {task.get('name')!r} has property {prop!r}: only energy/forces/stress are supported"
            )
        norm = task.get("normalizer") or {}
        mean, rmsd = float(norm.get("mean", 0.0)), float(norm.get("rmsd", 1.0))
        for ds in task.get("datasets", []):
            entry = out.setdefault(ds, {})
            entry[prop] = {"mean": mean, "rmsd": rmsd}
            if prop == "energy":
                entry["element_references"] = _element_references(task.get("element_references"))
    for ds, entry in out.items():
        if "energy" not in entry:
            continue
        e = entry["energy"]
        for prop in ("forces", "stress"):
            if prop in entry:
                p = entry[prop]
                if abs(p["mean"]) > 0 or not np.isclose(p["rmsd"], e["rmsd"], rtol=1e-6, atol=0):
                    raise ValueError(
                        f"dataset {ds!r}: {prop} normaliser (mean={p['mean']}, rmsd={p['rmsd']}) is inconsistent with "
                        f"the energy normaliser (rmsd={e['rmsd']}); conservative {prop} need mean 0 and the energy rmsd"
                    )
    return out


def config_from_pytorch_checkpoint(checkpoint: "FairchemCheckpoint | str | os.PathLike") -> UMAConfig:
    """Infer the [`UMAConfig`][] of a fairchem checkpoint, field by field.

    Every backbone kwarg is either copied, required to have the value this port implements,
    or known not to affect inference; any other key is an error that names it.

    **Arguments:**

    - `checkpoint`: a [`FairchemCheckpoint`][] or a path to a `.pt` file.
    """
    if not isinstance(checkpoint, FairchemCheckpoint):
        checkpoint = load_pytorch_checkpoint(checkpoint)
    mc = checkpoint.model_config
    if not isinstance(mc, dict) or "backbone" not in mc:
        raise ValueError("model_config has no 'backbone': not a fairchem HydraModel config")
    unknown_top = set(mc) - _TOP_LEVEL
    if unknown_top:
        raise ValueError(f"unsupported model_config keys {sorted(unknown_top)}")
    bb = dict(mc["backbone"])
    kind = _short(bb.get("model", ""))
    if kind not in _BACKBONES:
        raise ValueError(f"backbone model {bb.get('model')!r} is not a UMA backbone ({sorted(_BACKBONES)})")
    unknown = set(bb) - set(_DIRECT) - set(_REQUIRED) - _IGNORED
    if unknown:
        raise ValueError(f"unsupported backbone config keys {sorted(unknown)} (not in fairchem 2.24's UMA)")
    for key, allowed in _REQUIRED.items():
        if key in bb and bb[key] not in allowed:
            raise ValueError(f"backbone {key}={bb[key]!r} is not supported (supported: {list(allowed)})")
    fields = {field: bb[key] for key, field in _DIRECT.items() if key in bb}
    if not _BACKBONES[kind]:
        fields.pop("num_experts", None)
        fields.pop("use_composition_embedding", None)
        fields.pop("expert_coefficient_norm", None)
    heads = _parse_heads(mc["heads"])
    tasks = parse_tasks(checkpoint.tasks_config)

    use_dataset_embedding = bool(bb.get("use_dataset_embedding", True))
    if use_dataset_embedding:
        mapping = _mapping(bb.get("dataset_list"), bb.get("dataset_mapping"), "backbone")
    elif heads["head_mapping"] is not None:
        mapping = heads["head_mapping"]
    else:
        mapping = {ds: ds for ds in tasks}
    datasets = tuple(sorted(mapping))
    if use_dataset_embedding:
        fields["dataset_embedding_names"] = tuple(mapping[d] for d in datasets)
    if heads["head_mapping"] is not None:
        hm = heads["head_mapping"]
        missing = set(datasets) - set(hm)
        if missing:
            raise ValueError(f"datasets {sorted(missing)} have no head in the energy head's dataset_mapping")
        unique = sorted(set(hm.values()))
        fields["head_dataset_experts"] = tuple(unique.index(hm[d]) for d in datasets)
        fields["num_head_experts"] = len(hm)
    layers_moe = bb.get("layers_moe")
    if layers_moe is not None:
        fields["experts_in_layers"] = tuple(int(i) for i in layers_moe)
    fields["charge_balanced_channels"] = _channel_range(bb.get("charge_balanced_channels"), "charge_balanced_channels")
    fields["spin_balanced_channels"] = _channel_range(bb.get("spin_balanced_channels"), "spin_balanced_channels")
    model_id = mc.get("model_id")
    if model_id is None and float(bb.get("model_version", 0) or 0) == 1.1:
        model_id = "UMA-1.1"  # `models/uma/compat.py:apply_uma_compat_fixups`
    fields["model_id"] = model_id
    # `escn_moe.py:set_MOLE_coefficients`: the one behaviour fairchem keys on model_id.
    fields["composition_mean_includes_self"] = model_id == "UMA-S-1.2"
    fields["head_type"] = heads["head_type"]
    fields["direct_forces"] = heads["force_head_name"] is not None
    fields["supports_single_atoms"] = bool(mc.get("supports_single_atoms", False))
    task_names = tuple(d for d in datasets if "energy" in tasks.get(d, {}))
    fields["tasks"] = task_names if task_names != datasets else None
    if not task_names:
        raise ValueError(f"no energy task in tasks_config for any of the datasets {list(datasets)}")
    return UMAConfig(datasets=datasets, **fields)
