"""Training and fine-tuning of UMA models with `eqx.filter_jit` and optax."""

from ._data import Record as Record, check_records as check_records, make_batch as make_batch, read_dataset as read_dataset
from ._loop import (
    TrainConfig as TrainConfig,
    evaluate as evaluate,
    fit_element_references as fit_element_references,
    train as train,
    trainable_filter as trainable_filter,
)
from ._loss import LossWeights as LossWeights, loss_fn as loss_fn
