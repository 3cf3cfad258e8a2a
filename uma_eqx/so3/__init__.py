"""Parameter-free SO(3) math: coefficient layout, edge rotations, Wigner-D, S2 grids."""

from ._grid import s2_grid_matrices as s2_grid_matrices
from ._layout import CoefficientLayout as CoefficientLayout
from ._layout import coefficient_layout as coefficient_layout
from ._rotate import Rotation as Rotation
from ._rotate import rotate as rotate
from ._rotation import (
    edge_rotation_matrix as edge_rotation_matrix,
)
from ._rotation import (
    edge_to_y_quaternion as edge_to_y_quaternion,
)
from ._rotation import (
    quaternion_to_matrix as quaternion_to_matrix,
)
from ._rotation import (
    safe_norm as safe_norm,
)
from ._wigner import (
    real_spherical_harmonics as real_spherical_harmonics,
)
from ._wigner import (
    wigner_d_from_matrix as wigner_d_from_matrix,
)
