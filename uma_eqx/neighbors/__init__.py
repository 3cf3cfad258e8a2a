"""Neighbour lists: the host radius graph (vesin, exact fairchem semantics) and an in-jit,
fixed-capacity Verlet list for molecular dynamics."""

from ._host import radius_graph as radius_graph
from ._jax import NeighborList as NeighborList
from ._jax import NeighborListFns as NeighborListFns

__all__ = ["NeighborList", "NeighborListFns", "radius_graph"]
