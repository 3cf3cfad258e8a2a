"""fairchem checkpoint -> `uma_eqx.UMA`. Needs torch only to read the `.pt` file."""

from ._checkpoint import FairchemCheckpoint as FairchemCheckpoint
from ._checkpoint import load_pytorch_checkpoint as load_pytorch_checkpoint
from ._config import config_from_pytorch_checkpoint as config_from_pytorch_checkpoint
from ._config import parse_tasks as parse_tasks
from ._weights import (
    KeyEntry as KeyEntry,
)
from ._weights import (
    WeightReport as WeightReport,
)
from ._weights import (
    convert_pytorch_state_dict as convert_pytorch_state_dict,
)
from ._weights import (
    derived_buffer_keys as derived_buffer_keys,
)
from ._weights import (
    key_table as key_table,
)
from ._weights import (
    load_fairchem_checkpoint as load_fairchem_checkpoint,
)
from ._weights import (
    verify_weight_loading as verify_weight_loading,
)
