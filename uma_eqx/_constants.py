"""Every literal the port takes from fairchem-core 2.24, with its source location.

Paths are relative to `fairchem/core/models/uma/` unless stated.
"""

import math

#: Number of element rows in every element embedding table (`escn_md.py:eSCNMDBackbone`,
#: `max_num_elements=100`); atomic numbers 0..99 are embeddable.
MAX_NUM_ELEMENTS = 100

#: Charge embedding: row = charge + 100, 201 rows (`nn/embedding.py:ChgSpinEmbedding`).
CHARGE_INDEX_OFFSET = 100
CHARGE_NUM_EMBEDDINGS = 201
#: Spin embedding: row = spin, 101 rows (`nn/embedding.py:ChgSpinEmbedding`).
SPIN_INDEX_OFFSET = 0
SPIN_NUM_EMBEDDINGS = 101

#: Polynomial envelope exponent (`escn_md.py`: `PolynomialEnvelope(exponent=5)`).
ENVELOPE_EXPONENT = 5
#: Gaussian basis width scalar (`escn_md.py`: `GaussianSmearing(0.0, cutoff, K, 2.0)`).
GAUSSIAN_BASIS_WIDTH = 2.0
#: Edge-degree embedding rescale ("sqrt avg degree", `escn_md.py`: `rescale_factor=5.0`).
EDGE_DEGREE_RESCALE = 5.0
#: Epsilon of every equivariant norm and LayerNorm (`nn/layer_norm.py`, torch default 1e-5).
NORM_EPS = 1e-5
#: Offset added after the softmax of the routing MLP (`nn/mole.py:_softmax`).
MOLE_SOFTMAX_OFFSET = 0.005

#: Quaternion chart blend: t = (ey - BLEND_START) / BLEND_WIDTH
#: (`common/quaternion/quaternion_utils.py:quaternion_edge_to_y_stable`).
QUATERNION_BLEND_START = -0.9
QUATERNION_BLEND_WIDTH = 1.8

#: fairchem's default neighbour cap and its tie tolerance in Å²
#: (`escn_md.py: max_neighbors=300`, `graph/radius_graph_pbc.py:get_max_neighbors_mask`).
MAX_NEIGHBORS = 300
MAX_NEIGHBORS_TOLERANCE = 0.01

#: Valid charge/spin ranges of the calculator (`units/mlip_unit/api/inference.py`).
CHARGE_RANGE = (-100, 100)
SPIN_RANGE = (0, 100)

TWO_PI = 2.0 * math.pi

#: Closest approach of two atoms (or an atom and a periodic image of another) that a graph
#: accepts, in Å. Our choice, not fairchem's (which silently drops a zero-length edge and
#: evaluates anything else): the shortest bond, H2's, is 0.74 Å, and at 0.1 Å nuclei would
#: have to fuse; such a structure is a bug in its construction (a duplicated atom, a wrong
#: unit). `AtomicGraph.from_atoms(..., min_distance=None)` turns the check off.
MIN_ATOM_DISTANCE = 0.1
