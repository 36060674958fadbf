"""Backend choice: which kernels run a given call.

``resolve_backend(name, x)`` returns a module with the functions of
:mod:`batchnorm.kernels.torch_ops` (``batch_stats``, ``normalize``,
``backward``, ``update_running_stats``, and the two stages of the backward,
``backward_reduce`` and ``backward_elementwise``, that SyncBatchNorm puts a
collective between; a backend without them makes SyncBatchNorm fall back to
the portable path).

* ``"auto"``: the environment variable ``BATCHNORM_BACKEND`` if set (for
  tests), else the fastest backend that can run on ``x``'s device;
* ``"torch"``: the portable path, always available;
* ``"cpu"``, ``"triton"``: the fused kernels; asking for one that cannot run
  raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from .kernels import torch_ops

BACKENDS = ("auto", "torch", "cpu", "triton")
ENV_VAR = "BATCHNORM_BACKEND"

# The fused backends are imported on first use, so a missing optional engine
# never breaks ``import batchnorm``.


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def unavailable_reason(name: str, x: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run on ``x``, or ``None`` if it can."""
    _check_name(name)
    if name == "torch":
        return None
    if name == "cpu":
        if x.device.type != "cpu":
            return f"the fused CPU backend runs on CPU tensors, got a tensor on {x.device}"
        if not _numba_importable():
            return ("the fused CPU backend needs Numba, which is not installed "
                    "(pip install 'batchnorm[cpu]')")
        return None
    if name == "triton":
        if x.device.type == "cpu" and not _interpreter_requested():
            return ("the Triton backend runs on CUDA tensors, got a CPU tensor (CPU tensors "
                    "only in Triton's interpreter, TRITON_INTERPRET=1, for testing)")
        if x.device.type not in ("cuda", "cpu"):
            return f"the Triton backend runs on CUDA tensors, got a tensor on {x.device}"
        if importlib.util.find_spec("triton") is None:
            return ("the Triton backend needs Triton, which is not installed "
                    "(pip install 'batchnorm[triton]')")
        try:
            kernels = _load("triton")
        except Exception as e:  # an installed but broken Triton
            return f"the Triton backend failed to import Triton: {type(e).__name__}: {e}"
        return kernels.reason_unavailable(x)
    return None


def resolve_backend(name: str, x: torch.Tensor) -> ModuleType:
    """The kernels module for backend ``name`` and input ``x``.

    Raises:
        ValueError: ``name`` is not a backend.
        RuntimeError: the backend was asked for by name and cannot run on ``x``.
    """
    if name == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            return resolve_backend(forced, x)
    # Everything an answer depends on, so that a layer's every call after its
    # first is one dictionary lookup (the full checks cost ~10 us a call).
    key = (name, x.device.type, _NUMBA, name == "triton" and _interpreter_requested())
    found = _RESOLVED.get(key)
    if found is not None:
        return found
    _check_name(name)
    if name == "auto":
        # Triton for CUDA tensors, the CPU kernels for CPU tensors: never
        # Triton's interpreter, which is for tests only.
        candidate = {"cuda": "triton", "cpu": "cpu"}.get(x.device.type)
        found = torch_ops
        if candidate is not None and unavailable_reason(candidate, x) is None:
            found = _load(candidate)
    else:
        reason = unavailable_reason(name, x)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} cannot run: {reason}")
        found = _load(name)
    _RESOLVED[key] = found
    return found


_RESOLVED: dict[tuple, ModuleType] = {}


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _numba_importable() -> bool:
    global _NUMBA
    if _NUMBA is None:
        _NUMBA = importlib.util.find_spec("numba") is not None
    return _NUMBA


_NUMBA: bool | None = None


def _load(name: str) -> ModuleType:
    if name == "torch":
        return torch_ops
    if name == "cpu":
        from .kernels import cpu

        return cpu
    from .kernels import triton

    return triton
