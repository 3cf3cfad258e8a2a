"""uma_eqx: Meta's UMA interatomic potentials in Equinox.

Array shapes in signatures use these dimension names:

- `atoms`: atoms in a (padded) batch of systems.
- `edges`: directed edges (source `j` -> target `i`) of the radius graph.
- `systems`: systems (structures) in a batch.
- `coeffs`: spherical-harmonic coefficients in l-major order, `(lmax + 1)**2`.
- `m_coeffs`: coefficients kept in the edge frame (`|m| <= mmax`), m-major order.
- `channels`: feature channels.
- `experts`: MoLE experts.
- `basis`: radial basis functions.
- `batch`: leading axes of a stack of graphs ([`uma_eqx.stack_graphs`][]).
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError, version as _version

from ._backbone import UMABackbone as UMABackbone
from ._block import UMABlock as UMABlock
from ._cache import (
    default_cache_dir as default_cache_dir,
    enable_compilation_cache as enable_compilation_cache,
    host_fingerprint as host_fingerprint,
)
from ._config import UMAConfig as UMAConfig
from ._default import default_model as default_model, default_model_report as default_model_report
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
from ._io import load as load, read_header as read_header, save as save
from ._potential import (
    UMA as UMA,
    direct_forces as direct_forces,
    energy_forces_stress as energy_forces_stress,
    hessian as hessian,
    merge_experts as merge_experts,
    merge_experts_for as merge_experts_for,
)
from ._predict import predict as predict
from ._settings import ExecutionSettings as ExecutionSettings
from .convert import load_fairchem_checkpoint as load_fairchem_checkpoint
from .nn import (
    EquivariantRMSNorm as EquivariantRMSNorm,
    MoLELinear as MoLELinear,
    SO2Convolution as SO2Convolution,
    SO3Linear as SO3Linear,
)

try:
    __version__ = _version("uma_eqx")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
