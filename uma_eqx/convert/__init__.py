"""fairchem checkpoint -> `uma_eqx.UMA`. Needs torch only to read the `.pt` file."""

from ._checkpoint import FairchemCheckpoint as FairchemCheckpoint, load_pytorch_checkpoint as load_pytorch_checkpoint
from ._config import config_from_pytorch_checkpoint as config_from_pytorch_checkpoint, parse_tasks as parse_tasks
from ._weights import (
    KeyEntry as KeyEntry,
    WeightReport as WeightReport,
    convert_pytorch_state_dict as convert_pytorch_state_dict,
    derived_buffer_keys as derived_buffer_keys,
    key_table as key_table,
    load_fairchem_checkpoint as load_fairchem_checkpoint,
    verify_weight_loading as verify_weight_loading,
)
