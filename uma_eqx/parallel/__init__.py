"""Several devices: batches of structures sharded over a mesh (data parallelism, `_data`), and
one structure's atoms partitioned over a mesh with per-layer halo exchange (graph parallelism,
`_partition` and `_graph_parallel`)."""

from ._data import BATCH_AXIS as BATCH_AXIS
from ._data import batch_mesh as batch_mesh
from ._data import data_parallel as data_parallel
from ._data import device_capacity as device_capacity
from ._data import empty_graph as empty_graph
from ._data import replicate as replicate
from ._data import resolve_devices as resolve_devices
from ._data import shard_stack as shard_stack
from ._data import split_evenly as split_evenly
from ._data import to_host as to_host
from ._distributed import initialize as initialize
from ._graph_parallel import GRAPH_AXIS as GRAPH_AXIS
from ._graph_parallel import DeviceTables as DeviceTables
from ._graph_parallel import HaloExchange as HaloExchange
from ._graph_parallel import ShardedStructure as ShardedStructure
from ._graph_parallel import energy_forces_stress_sharded as energy_forces_stress_sharded
from ._graph_parallel import make_mesh as make_mesh
from ._partition import ExchangeVolume as ExchangeVolume
from ._partition import GraphPartition as GraphPartition
from ._partition import PartitionCapacity as PartitionCapacity
from ._partition import assign_atoms as assign_atoms
from ._partition import exchange_volume as exchange_volume
from ._partition import feature_row_bytes as feature_row_bytes
from ._partition import partition_graph as partition_graph
