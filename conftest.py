"""Root pytest set-up: keep optional extras optional, and Triton testable.

``--doctest-modules`` imports every module under ``batchnorm/``; the Keras
layer needs the ``keras`` extra, so without it its modules are not collected
(its tests skip themselves with ``pytest.importorskip``).

Without CUDA, the Triton kernels are tested in Triton's interpreter on CPU
tensors (``tests/test_triton_backend.py``). Triton decides between compiling
and interpreting when its modules are first imported, and much imports it
early (``torch._dynamo``, Keras's torch backend), so ``TRITON_INTERPRET=1``
is set here, before anything else, unless the environment already says.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_keras() -> bool:
    spec = importlib.util.find_spec("keras")
    return spec is not None and spec.origin is not None  # not a stray namespace folder


collect_ignore_glob = [] if _has_keras() else ["batchnorm/keras/*"]
