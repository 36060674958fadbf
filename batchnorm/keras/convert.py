"""Weights between a Keras BN layer and a torch-style BN module's ``state_dict``.

Names: ``gamma`` <-> ``weight``, ``beta`` <-> ``bias``, ``moving_mean`` <->
``running_mean``, ``moving_variance`` <-> ``running_var``; the modules'
``momentum`` is Keras's ``1 - momentum`` (a constructor argument, not state).

The variance: Keras 3 keeps the moving average of the *biased* batch
variance, PyTorch (and :mod:`batchnorm.nn`) of the *unbiased* one. The layer
does not record the batch size, so the conversion cannot be exact: by default
the moving variance is copied as is (the difference is a factor
``count / (count - 1)``, ``count`` being the values per channel in a training
batch; negligible for image batches). Pass ``count=`` (``N * H * W`` of the
training batches) to rescale by that factor, or back by its inverse.

Renorm layers (``renorm=True``) hold three more weights, which a torch BN
``state_dict`` has no room for: ``keras_to_torch_state`` keeps the inference
statistics only (``moving_mean``, ``moving_variance``, so eval outputs agree)
and drops ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``;
``torch_to_keras_weights(..., renorm=True, epsilon=...)`` rebuilds them from
the running statistics, ``sqrt(var + epsilon)`` for both standard deviations
(the renorm statistics then start where the population estimates are, as
:class:`batchnorm.BatchRenorm2d`'s ``r`` and ``d`` do).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["keras_to_torch_state", "torch_to_keras_weights"]


def _variance_factor(count):
    if count is None:
        return 1.0
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"count must be an int of at least 2 or None, got {count!r}")
    return count / (count - 1)


def keras_to_torch_state(layer, *, count=None, num_batches_tracked=0) -> dict:
    """A torch BN ``state_dict`` from a built Keras BN layer (Keras's or ours).

    Returns ``weight``, ``bias`` (ones / zeros if the layer has no
    ``gamma`` / ``beta``), ``running_mean``, ``running_var`` (float32 tensors)
    and ``num_batches_tracked`` (int64, Keras keeps no count). ``running_var``
    is Keras's biased moving variance, times ``count / (count - 1)`` if
    ``count`` is given (see the module's docstring).

    Example:
        >>> import batchnorm.keras as bk, batchnorm, numpy as np
        >>> layer = bk.BatchNormalization(); layer.build((None, 3))
        >>> m = batchnorm.BatchNorm1d(3, eps=layer.epsilon, momentum=1 - layer.momentum)
        >>> m.load_state_dict(bk.keras_to_torch_state(layer))
        <All keys matched successfully>
    """
    if getattr(layer, "moving_mean", None) is None:
        raise ValueError("the layer is not built yet: call it once or call build(shape)")

    def tensor(variable):
        return torch.as_tensor(np.array(variable.numpy(), dtype=np.float32))

    mean = tensor(layer.moving_mean)
    ones, zeros = torch.ones_like(mean), torch.zeros_like(mean)
    return {
        "weight": tensor(layer.gamma) if getattr(layer, "gamma", None) is not None else ones,
        "bias": tensor(layer.beta) if getattr(layer, "beta", None) is not None else zeros,
        "running_mean": mean,
        "running_var": tensor(layer.moving_variance) * _variance_factor(count),
        "num_batches_tracked": torch.tensor(int(num_batches_tracked), dtype=torch.long),
    }


def torch_to_keras_weights(state_dict, *, center=True, scale=True, count=None, renorm=False,
                           epsilon=1e-3) -> list:
    """The list for ``layer.set_weights`` from a torch BN ``state_dict``.

    Order as Keras's: ``[gamma] + [beta] + [moving_mean, moving_variance]``,
    with ``gamma`` only if ``scale`` and ``beta`` only if ``center`` (the
    layer's arguments). ``running_var`` is copied as is, or divided by
    ``count / (count - 1)`` if ``count`` is given. A module without affine
    parameters gives ones / zeros. With ``renorm=True`` (for a layer built
    with it) ``moving_stddev``, ``renorm_mean``, ``renorm_stddev`` follow:
    ``sqrt(variance + epsilon)``, the mean, ``sqrt(variance + epsilon)``,
    with the layer's ``epsilon``.

    Example:
        >>> import batchnorm.keras as bk, batchnorm
        >>> m = batchnorm.BatchNorm1d(3)
        >>> layer = bk.BatchNormalization(); layer.build((None, 3))
        >>> layer.set_weights(bk.torch_to_keras_weights(m.state_dict()))
    """
    if renorm and not float(epsilon) > 0.0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")

    def array(key):
        # A copy: Tensor.numpy() on the module's own tensor would mark it as
        # never resizable again.
        return state_dict[key].detach().to("cpu", torch.float32, copy=True).numpy()

    mean = array("running_mean")
    weights = []
    if scale:
        weights.append(array("weight") if state_dict.get("weight") is not None
                       else np.ones_like(mean))
    if center:
        weights.append(array("bias") if state_dict.get("bias") is not None
                       else np.zeros_like(mean))
    variance = array("running_var") / np.float32(_variance_factor(count))
    weights += [mean, variance]
    if renorm:
        stddev = np.sqrt(variance + np.float32(epsilon))
        weights += [stddev, mean.copy(), stddev.copy()]
    return weights
