"""Layers of the UMA network."""

from ._embedding import (
    AbstractChargeSpinEmbedding as AbstractChargeSpinEmbedding,
)
from ._embedding import (
    DatasetEmbedding as DatasetEmbedding,
)
from ._embedding import (
    FourierChargeSpinEmbedding as FourierChargeSpinEmbedding,
)
from ._embedding import (
    LinearChargeSpinEmbedding as LinearChargeSpinEmbedding,
)
from ._embedding import (
    TableChargeSpinEmbedding as TableChargeSpinEmbedding,
)
from ._linear import Linear as Linear
from ._linear import MoLELinear as MoLELinear
from ._linear import MoLERouting as MoLERouting
from ._linear import map_mole as map_mole
from ._radial import (
    EdgeScalars as EdgeScalars,
)
from ._radial import (
    FactoredRadialMLP as FactoredRadialMLP,
)
from ._radial import (
    GaussianBasis as GaussianBasis,
)
from ._radial import (
    LayerNorm as LayerNorm,
)
from ._radial import (
    RadialMLP as RadialMLP,
)
from ._radial import (
    factor_radial_mlps as factor_radial_mlps,
)
from ._radial import (
    polynomial_envelope as polynomial_envelope,
)
from ._radial import (
    torch_linspace as torch_linspace,
)
from ._so2 import SO2Convolution as SO2Convolution
from ._so3 import (
    AbstractEquivariantNorm as AbstractEquivariantNorm,
)
from ._so3 import (
    EquivariantLayerNorm as EquivariantLayerNorm,
)
from ._so3 import (
    EquivariantLayerNormSH as EquivariantLayerNormSH,
)
from ._so3 import (
    EquivariantRMSNorm as EquivariantRMSNorm,
)
from ._so3 import (
    SO3Linear as SO3Linear,
)
from ._so3 import (
    gate_activation as gate_activation,
)
from ._so3 import (
    gate_activation_blocks as gate_activation_blocks,
)
