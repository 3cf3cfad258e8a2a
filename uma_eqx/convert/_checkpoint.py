"""Reading fairchem inference checkpoints (`.pt`) without executing pickled code."""

import dataclasses
import os
import typing
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from .._io import file_kind


class _Stub:
    """Stand-in for an allowlisted class: records its pickled state, runs no code."""

    _state: Any  # set by __setstate__

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _Checkpoint(_Stub):
    pass


class _DictConfig(_Stub):
    pass


class _ListConfig(_Stub):
    pass


class _AnyNode(_Stub):
    pass


class _Metadata(_Stub):
    pass


#: The only globals a fairchem inference checkpoint may reference besides torch's own tensor
#: rebuild functions (which `weights_only=True` already allows).
_ALLOWLIST_NAMES = {
    "fairchem.core.units.mlip_unit.api.inference.MLIPInferenceCheckpoint": _Checkpoint,
    "omegaconf.dictconfig.DictConfig": _DictConfig,
    "omegaconf.listconfig.ListConfig": _ListConfig,
    "omegaconf.nodes.AnyNode": _AnyNode,
    "omegaconf.base.Metadata": _Metadata,
    "omegaconf.base.ContainerMetadata": _Metadata,
}


@dataclasses.dataclass
class FairchemCheckpoint:
    """The four parts of a fairchem `MLIPInferenceCheckpoint`, as plain Python/numpy.

    **Attributes:**

    - `model_config`: the Hydra model config (plain dicts and lists).
    - `ema_state_dict`: the EMA weights (what fairchem uses for inference), `module.` prefix
      removed, as numpy arrays.
    - `model_state_dict`: the raw (non-EMA) weights, unused for inference.
    - `tasks_config`: the task list (plain dicts).
    - `path`: where it was read from.
    """

    model_config: dict
    ema_state_dict: dict[str, np.ndarray]
    model_state_dict: dict[str, np.ndarray]
    tasks_config: list[dict]
    path: str = ""


def _plain(obj: Any) -> Any:
    """Turn omegaconf stubs, tensors and containers into plain Python/numpy."""
    if isinstance(obj, _DictConfig):
        content = obj._state.get("_content")
        return None if content is None else {k: _plain(v) for k, v in content.items()}
    if isinstance(obj, _ListConfig):
        content = obj._state.get("_content")
        return None if content is None else [_plain(v) for v in content]
    if isinstance(obj, _AnyNode):
        return _plain(obj._state.get("_val"))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if type(obj).__module__ == "torch" and hasattr(obj, "detach"):
        return obj.detach().cpu().numpy()
    return obj


def _state_dict(sd: Any, name: str, path: str) -> dict[str, np.ndarray]:
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: checkpoint field {name!r} is a {type(sd).__name__}, expected a dict of tensors")
    out = {}
    for key, value in sd.items():
        if not hasattr(value, "detach"):
            raise ValueError(f"{path}: {name}[{key!r}] is a {type(value).__name__}, expected a tensor")
        key = key.removeprefix("module.")
        out[key] = value.detach().cpu().numpy()
    return out


def load_pytorch_checkpoint(path: str | os.PathLike) -> FairchemCheckpoint:
    """Read a fairchem inference checkpoint safely.

    Uses `torch.load(weights_only=True)` with an allowlist of exactly the classes fairchem
    pickles into its checkpoints (`MLIPInferenceCheckpoint` and omegaconf containers), each
    replaced by an inert stub: no pickled code runs and fairchem need not be installed. Needs
    torch (the `convert` extra).

    **Arguments:**

    - `path`: the `.pt` file.

    **Returns:**

    A [`FairchemCheckpoint`][].

    **Raises:**

    `FileNotFoundError` for a missing file; `ValueError` naming the path for a file that is not
    a fairchem inference checkpoint: a uma_eqx `.eqx` model (read it with [`uma_eqx.load`][]),
    another format (told by its first bytes, not its name), or a truncated, corrupt or foreign
    checkpoint (one referencing other Python objects).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a directory; give the .pt file inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    kind, what = file_kind(path)  # by content, before importing torch: a .eqx needs no torch
    if kind in ("uma_eqx", "truncated_uma_eqx"):
        raise ValueError(f"{path!r} is {what}, not a PyTorch checkpoint: read it with uma_eqx.load({path!r})")
    if kind == "pickle":
        raise ValueError(
            f"{path!r} is {what}; uma_eqx reads only the zip format torch.save writes since PyTorch 1.6 (as "
            "fairchem's checkpoints are): re-save it with torch.save, or download the checkpoint again"
        )
    if kind == "torch" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is {what} (its zip directory is missing): download or copy it again")
    if kind != "torch":
        raise ValueError(
            f"{path!r} is not a PyTorch zip checkpoint but {what}; "
            "expected a fairchem inference checkpoint such as uma-s-1p1.pt (download or copy it again)"
        )
    try:
        import torch
        import torch.serialization as ts
    except ImportError as e:
        raise ImportError(
            "reading a PyTorch checkpoint needs torch: pip install 'uma_eqx[convert]' (torch==2.13.0)"
        ) from e
    allow: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (cls, name) for name, cls in _ALLOWLIST_NAMES.items()
    ]
    allow += [(typing.Any, "typing.Any"), int, list, dict]
    import collections

    allow.append(collections.defaultdict)
    try:
        with ts.safe_globals(allow):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError subclasses
        msg = str(e).split("\n")
        detail = next((line.strip() for line in msg if "Unsupported global" in line), None)
        detail = detail or next((line.strip() for line in msg if "error" in line.lower()), msg[0])
        raise ValueError(f"cannot read {path!r} as a fairchem inference checkpoint: {detail}") from e
    if not isinstance(raw, _Checkpoint):
        raise ValueError(
            f"{path!r} holds a {type(raw).__name__}, not fairchem's MLIPInferenceCheckpoint "
            "(a training checkpoint or a bare state dict?)"
        )
    state = raw._state
    missing = {"model_config", "ema_state_dict", "tasks_config"} - set(state)
    if missing:
        raise ValueError(f"{path!r}: MLIPInferenceCheckpoint lacks {sorted(missing)}")
    return FairchemCheckpoint(
        model_config=_plain(state["model_config"]),
        ema_state_dict=_state_dict(state["ema_state_dict"], "ema_state_dict", path),
        model_state_dict=_state_dict(state.get("model_state_dict", {}), "model_state_dict", path),
        tasks_config=_plain(state["tasks_config"]) or [],
        path=path,
    )
