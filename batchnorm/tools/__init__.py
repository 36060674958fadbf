"""Tools around batch norm: convert, fold, freeze, recalibrate, diagnose and monitor models."""

from .convert import FusedActivation, convert_batchnorm
from .doctor import doctor
from .fold import fold_batchnorm, fold_conv_bn, fold_conv_bn_weights
from .freeze import freeze_batchnorm, frozen_batchnorm, unfreeze_batchnorm
from .monitor import ActivationMonitor, activation_stats
from .recalibrate import recalibrate_batchnorm

__all__ = [
    "ActivationMonitor",
    "FusedActivation",
    "activation_stats",
    "convert_batchnorm",
    "doctor",
    "fold_batchnorm",
    "fold_conv_bn",
    "fold_conv_bn_weights",
    "freeze_batchnorm",
    "frozen_batchnorm",
    "recalibrate_batchnorm",
    "unfreeze_batchnorm",
]
