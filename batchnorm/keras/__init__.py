"""Keras 3 layers on our Batch Normalization (optional: ``pip install 'batchnorm[keras]'``).

``import batchnorm`` never imports Keras; ``import batchnorm.keras`` does. The
course's Keras code runs on our implementation with one changed import::

    from batchnorm.keras import BatchNormalization   # was: from keras.layers import ...

The layer needs Keras's **torch backend**: its computation is
:func:`batchnorm.functional.batch_norm` on the variables' torch tensors, so it
cannot run inside a JAX or TensorFlow graph. Decision: with another backend the
layer raises a ``RuntimeError`` naming that backend when it is constructed (use
``keras.layers.BatchNormalization`` there). If Keras has not been imported yet,
importing this module sets ``KERAS_BACKEND=torch`` unless the variable is
already set.

See :mod:`batchnorm.keras.layer` for the layer, :mod:`batchnorm.keras.renorm`
for Keras's Batch Renormalization rule (``renorm=True``) and
:mod:`batchnorm.keras.convert` for the weight converters.
"""

from __future__ import annotations

import os
import sys

if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "torch")

try:
    import keras  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without keras
    raise ImportError(
        "batchnorm.keras needs Keras 3 with its torch backend: "
        "pip install 'batchnorm[keras]' (or pip install 'keras>=3.8')") from exc

from .convert import keras_to_torch_state, torch_to_keras_weights  # noqa: E402
from .layer import BatchNormalization  # noqa: E402

__all__ = ["BatchNormalization", "keras_to_torch_state", "torch_to_keras_weights"]
