r"""Keras's Batch Renormalization rule (``renorm=True``), for our Keras layer.

Keras 2 (``tf.keras`` / ``tf_keras``) and recent Keras 3 releases (3.15 is
tested here) share one algorithm, which differs from the paper's and from
:class:`batchnorm.BatchRenorm2d` in where ``r`` and ``d`` come from. Per
channel, with the batch mean ``mu_B`` and *biased* variance ``var_B``::

    sigma_B = sqrt(var_B + epsilon)
    s       = max(renorm_stddev, sqrt(epsilon))         # guards a zero start
    r = clip(sigma_B / s, rmin, rmax)
    d = clip((mu_B - renorm_mean) / s, -dmax, dmax)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta   # r, d: constants in the backward

``renorm_mean`` and ``renorm_stddev`` are moving averages of ``mu_B`` and
``sigma_B`` kept *only* for ``r`` and ``d``, with their own
``renorm_momentum``; ``r`` and ``d`` use their values from before this batch.
The inference statistics are separate: ``moving_mean`` (momentum ``momentum``)
and ``moving_stddev``, a moving average of ``sigma_B`` from which
``moving_variance = relu(moving_stddev**2 - epsilon)`` is derived after each
step (the paper averages ``sigma``, not the variance). Inference is plain
batch norm with ``moving_mean`` / ``moving_variance``.

``renorm_clipping`` maps optional keys ``"rmax"``, ``"rmin"``, ``"dmax"`` to
numbers; a missing key (or ``None``) means no bound on that side, i.e.
``inf``, ``0``, ``inf`` (Keras's documented defaults). With no clipping at
all, ``r * (x - mu_B) / sigma_B + d = (x - renorm_mean) / s``: the output is
normalized by the renorm statistics alone.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["CLIPPING_KEYS", "check_renorm_clipping", "renorm_corrections"]

CLIPPING_KEYS = ("rmax", "rmin", "dmax")

# The accepted range of each bound: r = 1, d = 0 (plain batch norm) must stay
# reachable, so rmin <= 1 <= rmax, which also keeps rmin <= rmax.
_RANGES = {"rmax": (1.0, math.inf, "rmax >= 1"), "rmin": (0.0, 1.0, "0 <= rmin <= 1"),
           "dmax": (0.0, math.inf, "dmax >= 0")}


def check_renorm_clipping(renorm_clipping):
    """A validated copy of ``renorm_clipping``: ``None`` or a dict of floats (or ``None``s).

    The keys given are kept (a missing key means "no bound"), their values
    converted to ``float``. ``inf`` is allowed where it is the default.

    Raises:
        TypeError: not a dict, or a value that is not a real number (a tensor
            or a variable would be read once here, which would silently freeze
            a schedule: assign a new dict to ``layer.renorm_clipping`` instead).
        ValueError: an unknown key, a NaN, ``rmax < 1``, ``rmin`` outside
            ``[0, 1]`` or ``dmax < 0``.

    Example:
        >>> from batchnorm.keras.renorm import check_renorm_clipping
        >>> check_renorm_clipping({"rmax": 3, "dmax": 5})
        {'rmax': 3.0, 'dmax': 5.0}
    """
    if renorm_clipping is None:
        return None
    if not isinstance(renorm_clipping, dict):
        raise TypeError("Argument `renorm_clipping` must be None or a dict with optional keys "
                        f"{list(CLIPPING_KEYS)}. Received: renorm_clipping={renorm_clipping!r}")
    unknown = [key for key in renorm_clipping if key not in CLIPPING_KEYS]
    if unknown:
        raise ValueError(f"Received invalid keys for `renorm_clipping` argument: {unknown}. "
                         f"Supported values: {list(CLIPPING_KEYS)}. "
                         f"Received: renorm_clipping={renorm_clipping!r}")
    checked = {}
    for key, value in renorm_clipping.items():
        if value is None:
            checked[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"Argument `renorm_clipping[{key!r}]` must be a number or None. "
                            f"Received: {key}={value!r}")
        value = float(value)
        low, high, rule = _RANGES[key]
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"Argument `renorm_clipping` needs {rule}. "
                             f"Received: renorm_clipping={renorm_clipping!r}")
        checked[key] = value
    return checked


def renorm_corrections(mean, var, renorm_mean, renorm_stddev, renorm_clipping, epsilon):
    """Keras's per-channel ``(r, d)``, in ``var``'s dtype, computed without autograd.

    Args:
        mean, var: the batch mean and biased variance ``(C,)``.
        renorm_mean, renorm_stddev: the renorm moving statistics ``(C,)``,
            before this batch updates them.
        renorm_clipping: a dict from :func:`check_renorm_clipping`, or ``None``.
        epsilon: the layer's epsilon.
    """
    clipping = renorm_clipping or {}
    with torch.no_grad():
        dtype = var.dtype
        sigma_B = torch.sqrt(var + epsilon)                                      # (C,)
        floor = torch.sqrt(torch.tensor(epsilon, dtype=dtype, device=var.device))
        s = torch.maximum(renorm_stddev.to(dtype), floor)                        # (C,)
        r = sigma_B / s                                                          # (C,)
        d = (mean.to(dtype) - renorm_mean.to(dtype)) / s                         # (C,)
        rmin, rmax, dmax = (clipping.get(key) for key in ("rmin", "rmax", "dmax"))
        r = r.clamp(min=rmin, max=rmax) if rmin is not None or rmax is not None else r
        d = d.clamp(-dmax, dmax) if dmax is not None else d
    return r, d
