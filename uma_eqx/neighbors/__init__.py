"""Neighbour lists: the host radius graph (vesin, exact fairchem semantics)."""

from ._host import radius_graph as radius_graph

__all__ = ["radius_graph"]
