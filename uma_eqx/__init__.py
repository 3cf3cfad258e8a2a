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

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._backbone import UMABackbone as UMABackbone
from ._batch_md import run_md_batch as run_md_batch
from ._block import UMABlock as UMABlock
from ._cache import (
    default_cache_dir as default_cache_dir,
)
from ._cache import (
    enable_compilation_cache as enable_compilation_cache,
)
from ._cache import (
    host_fingerprint as host_fingerprint,
)
from ._config import UMAConfig as UMAConfig
from ._default import default_model as default_model
from ._default import default_model_report as default_model_report
from ._graph import (
    AtomicGraph as AtomicGraph,
)
from ._graph import (
    PaddingSpec as PaddingSpec,
)
from ._graph import (
    bucket_size as bucket_size,
)
from ._graph import (
    pad_graph as pad_graph,
)
from ._graph import (
    stack_graphs as stack_graphs,
)
from ._heads import (
    LinearEnergyHead as LinearEnergyHead,
)
from ._heads import (
    LinearForceHead as LinearForceHead,
)
from ._heads import (
    MLPEnergyHead as MLPEnergyHead,
)
from ._io import load as load
from ._io import read_header as read_header
from ._io import save as save
from ._potential import (
    UMA as UMA,
)
from ._potential import (
    direct_forces as direct_forces,
)
from ._potential import (
    energy_forces_stress as energy_forces_stress,
)
from ._potential import (
    hessian as hessian,
)
from ._potential import (
    merge_experts as merge_experts,
)
from ._potential import (
    merge_experts_for as merge_experts_for,
)
from ._predict import predict as predict
from ._settings import ExecutionSettings as ExecutionSettings
from .convert import load_fairchem_checkpoint as load_fairchem_checkpoint
from .export import export as export  # the function; its module stays importable as uma_eqx.export
from .nn import (
    EquivariantRMSNorm as EquivariantRMSNorm,
)
from .nn import (
    MoLELinear as MoLELinear,
)
from .nn import (
    SO2Convolution as SO2Convolution,
)
from .nn import (
    SO3Linear as SO3Linear,
)
from .relax import relax_batch as relax_batch

try:
    __version__ = _version("uma_eqx")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
