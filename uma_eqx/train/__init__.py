"""Training and fine-tuning of UMA models with `eqx.filter_jit` and optax."""

from ._data import Record as Record
from ._data import check_records as check_records
from ._data import make_batch as make_batch
from ._data import read_dataset as read_dataset
from ._loop import (
    TrainConfig as TrainConfig,
)
from ._loop import (
    evaluate as evaluate,
)
from ._loop import (
    fit_element_references as fit_element_references,
)
from ._loop import (
    train as train,
)
from ._loop import (
    trainable_filter as trainable_filter,
)
from ._loss import LossWeights as LossWeights
from ._loss import loss_fn as loss_fn
