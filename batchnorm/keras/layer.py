"""``BatchNormalization``: a Keras 3 layer whose computation is ours.

Arguments, defaults, weights and behaviour are those of
``keras.layers.BatchNormalization`` (Keras 3); the forward and backward are
:func:`batchnorm.functional.batch_norm` (or
:func:`batchnorm.nn.ghost.ghost_batch_norm` with ``virtual_batch_size``).

Mapping onto the functional (Keras -> ``batch_norm``): the channel ``axis`` is
moved to dim 1 (``movedim``); ``gamma`` -> ``weight``, ``beta`` -> ``bias``;
``epsilon`` -> ``eps``; ``momentum`` -> ``1 - momentum``.

Moving statistics follow **Keras**, not PyTorch: in training,
``moving = moving * momentum + batch * (1 - momentum)`` with the batch mean
and the *biased* batch variance (PyTorch keeps the unbiased one). So the
functional is called without running buffers in training, and the layer
updates ``moving_mean`` / ``moving_variance`` itself with ``assign``.
"""

from __future__ import annotations

import keras
import torch
from keras import constraints, initializers, regularizers

from ..functional import ACTIVATIONS, batch_norm
from ..nn.ghost import check_virtual_batch_size, ghost_batch_norm, ghost_batch_sizes

__all__ = ["BatchNormalization"]


def _require_torch_backend():
    name = keras.backend.backend()
    if name != "torch":
        raise RuntimeError(
            f"batchnorm.keras.BatchNormalization runs on Keras's torch backend only; the "
            f"Keras backend is {name!r}. Set KERAS_BACKEND=torch before importing keras, or "
            f"use keras.layers.BatchNormalization with the {name!r} backend.")


@keras.saving.register_keras_serializable(package="batchnorm")
class BatchNormalization(keras.layers.Layer):
    """Keras 3 Batch Normalization computed by :mod:`batchnorm` (torch backend).

    A drop-in for ``keras.layers.BatchNormalization``: same arguments and
    defaults, same weights in the same order (``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance``, so ``set_weights`` /
    ``get_weights`` interchange), same outputs and moving statistics.

    **Training** (``training=True`` *and* ``layer.trainable``): batch
    statistics; ``moving = moving * momentum + batch * (1 - momentum)``, with
    Keras's biased batch variance. **Inference** (``training`` false, or
    ``trainable=False``: Keras's rule for fine-tuning): the moving statistics,
    nothing updated.

    Args:
        axis: the channel axis (an int). Default: ``-1``.
        momentum: weight of the *old* moving value, in ``[0, 1)``. Default: ``0.99``.
        epsilon: added to the variance. Default: ``1e-3``.
        center, scale: learn ``beta`` / ``gamma``. Default: ``True``.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer,
        beta_constraint, gamma_constraint: as in Keras.
        activation: ours, fused into the normalization: one of
            :data:`batchnorm.functional.ACTIVATIONS` (``"relu"`` gives the
            course's "BN before ReLU" in one layer). Default: ``None``.
        negative_slope: slope of ``"leaky_relu"``. Default: ``0.01``.
        virtual_batch_size: ours (Keras 2's ghost batches): normalize each
            ghost batch of this many samples with its own statistics in
            training (see :func:`batchnorm.nn.ghost.ghost_batch_sizes`); the
            moving statistics get one step per real batch with the
            size-weighted average of the ghost means and biased variances.
            Default: ``None``.
        **kwargs: Keras layer arguments (``name``, ``dtype``, ``trainable``...).

    Not supported: Keras's ``renorm`` and ``synchronized`` (use
    :class:`batchnorm.BatchRenorm2d` / :class:`batchnorm.SyncBatchNorm` on the
    torch side), and masks (a ``mask`` raises ``NotImplementedError``).

    Raises:
        RuntimeError: Keras's backend is not torch.
        ValueError: ``momentum`` outside ``[0, 1)``, ``epsilon <= 0``, an unknown
            ``activation``, an ``axis`` out of range for the input.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, *, activation=None, negative_slope=0.01,
                 virtual_batch_size=None, **kwargs):
        _require_torch_backend()
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Argument `axis` must be an int. Received: axis={axis!r}")
        momentum, epsilon = float(momentum), float(epsilon)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"Argument `momentum` must be in [0, 1). Received: momentum={momentum}")
        if not epsilon > 0.0:
            raise ValueError(
                f"Argument `epsilon` must be positive. Received: epsilon={epsilon}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Argument `activation` must be one of {ACTIVATIONS}. "
                             f"Received: activation={activation!r}")
        if virtual_batch_size is not None:
            check_virtual_batch_size(virtual_batch_size)
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.virtual_batch_size = virtual_batch_size
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    def _channel_axis(self, input_shape):
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"Axis {self.axis} is out of bounds for input shape "
                             f"{tuple(input_shape)}. Received: axis={self.axis}")
        axis = self.axis % ndim
        if axis == 0:
            raise ValueError("Axis 0 is the batch axis; the channel axis must be another "
                             f"one. Received: axis={self.axis}")
        return axis

    def build(self, input_shape):
        axis = self._channel_axis(input_shape)
        shape = (input_shape[axis],)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False)
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False)
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean", initializer=self.moving_mean_initializer,
            trainable=False, autocast=False)
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance",
            initializer=self.moving_variance_initializer, trainable=False, autocast=False)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape),
                                                 axes={self.axis: input_shape[axis]})

    def compute_output_shape(self, input_shape):
        self._channel_axis(input_shape)
        return input_shape

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise NotImplementedError(
                "batchnorm.keras.BatchNormalization does not support masks; use "
                "keras.layers.BatchNormalization for masked inputs")
        x = torch.as_tensor(inputs)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        axis = self._channel_axis(x.shape)
        x = x.to(compute_dtype).movedim(axis, 1)
        gamma = self.gamma.value.to(compute_dtype) if self.scale else None
        beta = self.beta.value.to(compute_dtype) if self.center else None
        kw = dict(activation=self.activation, negative_slope=self.negative_slope)
        if training and self.trainable:
            if self.virtual_batch_size is None:
                y = batch_norm(x, None, None, gamma, beta, True, 1.0 - self.momentum,
                               self.epsilon, **kw)
            else:
                y = ghost_batch_norm(x, None, None, gamma, beta, True, 1.0 - self.momentum,
                                     self.epsilon, virtual_batch_size=self.virtual_batch_size,
                                     **kw)
            self._update_moving_stats(x)
        else:
            y = batch_norm(x, self.moving_mean.value.to(compute_dtype),
                           self.moving_variance.value.to(compute_dtype), gamma, beta, False,
                           1.0 - self.momentum, self.epsilon, **kw)
        y = y.movedim(1, axis)
        return keras.ops.cast(y, self.compute_dtype)

    def _batch_moments(self, x):
        """Per-channel mean and biased variance of ``x`` ``(N, C, *)``, as Keras uses."""
        dims = [d for d in range(x.dim()) if d != 1]
        if self.virtual_batch_size is None:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            return mean, var
        sizes = ghost_batch_sizes(x.shape[0], self.virtual_batch_size, x[0, 0].numel())
        means, variances = [], []
        for part in x.split(sizes):
            var, mean = torch.var_mean(part, dim=dims, correction=0)
            means.append(mean * part.shape[0])
            variances.append(var * part.shape[0])
        n = x.shape[0]
        return sum(means) / n, sum(variances) / n

    def _update_moving_stats(self, x):
        with torch.no_grad():
            mean, var = self._batch_moments(x.detach())
            m = self.momentum
            for variable, batch in ((self.moving_mean, mean), (self.moving_variance, var)):
                old = variable.value
                variable.assign(old * m + batch.to(old.dtype) * (1.0 - m))

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "activation": self.activation,
            "negative_slope": self.negative_slope,
            "virtual_batch_size": self.virtual_batch_size,
        }
        return {**super().get_config(), **config}
