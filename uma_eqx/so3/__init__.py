"""Parameter-free SO(3) math: coefficient layout, edge rotations, Wigner-D, S2 grids."""

from ._layout import CoefficientLayout as CoefficientLayout, coefficient_layout as coefficient_layout
from ._rotation import (
    edge_to_y_quaternion as edge_to_y_quaternion,
    quaternion_to_matrix as quaternion_to_matrix,
    edge_rotation_matrix as edge_rotation_matrix,
    safe_norm as safe_norm,
)
from ._wigner import (
    real_spherical_harmonics as real_spherical_harmonics,
    wigner_d_from_matrix as wigner_d_from_matrix,
)
from ._rotate import Rotation as Rotation, rotate as rotate
from ._grid import s2_grid_matrices as s2_grid_matrices
