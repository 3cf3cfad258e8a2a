"""Layers of the UMA network."""

from ._embedding import (
    AbstractChargeSpinEmbedding as AbstractChargeSpinEmbedding,
    DatasetEmbedding as DatasetEmbedding,
    FourierChargeSpinEmbedding as FourierChargeSpinEmbedding,
    LinearChargeSpinEmbedding as LinearChargeSpinEmbedding,
    TableChargeSpinEmbedding as TableChargeSpinEmbedding,
)
from ._linear import Linear as Linear, MoLELinear as MoLELinear, MoLERouting as MoLERouting, map_mole as map_mole
from ._radial import (
    EdgeScalars as EdgeScalars,
    FactoredRadialMLP as FactoredRadialMLP,
    GaussianBasis as GaussianBasis,
    LayerNorm as LayerNorm,
    RadialMLP as RadialMLP,
    factor_radial_mlps as factor_radial_mlps,
    polynomial_envelope as polynomial_envelope,
    torch_linspace as torch_linspace,
)
from ._so2 import SO2Convolution as SO2Convolution
from ._so3 import (
    AbstractEquivariantNorm as AbstractEquivariantNorm,
    EquivariantLayerNorm as EquivariantLayerNorm,
    EquivariantLayerNormSH as EquivariantLayerNormSH,
    EquivariantRMSNorm as EquivariantRMSNorm,
    SO3Linear as SO3Linear,
    gate_activation as gate_activation,
    gate_activation_blocks as gate_activation_blocks,
)
