"""Tools around batch norm: convert, fold, freeze, recalibrate, diagnose and monitor models."""

from .monitor import ActivationMonitor, activation_stats

__all__ = ["ActivationMonitor", "activation_stats"]
