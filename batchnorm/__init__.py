"""Batch Normalization for PyTorch, implemented end to end.

Public API: the functional op, the drop-in modules, the model tools, and the reference.
"""

from . import reference
from .functional import batch_norm
from .nn import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormalization,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    SyncBatchNorm,
    batch_renorm,
    convert_frozen_batchnorm,
    convert_sync_batchnorm,
    ghost_batch_norm,
    revert_sync_batchnorm,
)
from .tools import (
    convert_batchnorm,
    doctor,
    fold_batchnorm,
    freeze_batchnorm,
    recalibrate_batchnorm,
    unfreeze_batchnorm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormalization",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "batch_renorm",
    "convert_batchnorm",
    "convert_frozen_batchnorm",
    "convert_sync_batchnorm",
    "doctor",
    "fold_batchnorm",
    "freeze_batchnorm",
    "ghost_batch_norm",
    "recalibrate_batchnorm",
    "reference",
    "revert_sync_batchnorm",
    "unfreeze_batchnorm",
]
