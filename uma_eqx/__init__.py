"""uma_eqx: Meta's UMA interatomic potentials in Equinox."""

from ._backbone import UMABackbone as UMABackbone
from ._cache import (
    default_cache_dir as default_cache_dir,
    enable_compilation_cache as enable_compilation_cache,
    host_fingerprint as host_fingerprint,
)
from ._block import UMABlock as UMABlock
from ._config import UMAConfig as UMAConfig
from ._graph import (
    AtomicGraph as AtomicGraph,
    PaddingSpec as PaddingSpec,
    bucket_size as bucket_size,
    pad_graph as pad_graph,
    stack_graphs as stack_graphs,
)
from ._heads import (
    LinearEnergyHead as LinearEnergyHead,
    LinearForceHead as LinearForceHead,
    MLPEnergyHead as MLPEnergyHead,
)
from ._potential import (
    UMA as UMA,
    direct_forces as direct_forces,
    energy_forces_stress as energy_forces_stress,
    hessian as hessian,
    merge_experts as merge_experts,
    merge_experts_for as merge_experts_for,
)
from .nn import (
    EquivariantRMSNorm as EquivariantRMSNorm,
    MoLELinear as MoLELinear,
    SO2Convolution as SO2Convolution,
    SO3Linear as SO3Linear,
)
from ._predict import predict as predict
from ._settings import ExecutionSettings as ExecutionSettings
from ._io import load as load, read_header as read_header, save as save


def load_fairchem_checkpoint(path, dtype=None, *, verify: bool = True):
    """Convert a fairchem `.pt` checkpoint (needs torch); see `uma_eqx.convert.load_fairchem_checkpoint`."""
    import jax.numpy as jnp

    from .convert import load_fairchem_checkpoint as _load

    return _load(path, jnp.float32 if dtype is None else dtype, verify=verify)
from ._default import default_model as default_model, default_model_report as default_model_report
