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

``renorm=True`` is Keras's Batch Renormalization (see
:mod:`batchnorm.keras.renorm`): ``r`` and ``d`` from the layer's
``renorm_mean`` / ``renorm_stddev``, folded into the affine parameters by
:func:`batchnorm.nn.renorm.renorm_affine` (``gamma * r``, ``beta + gamma * d``,
``r`` and ``d`` constants), then the same ``batch_norm`` call.
"""

from __future__ import annotations

import keras
import torch
from keras import constraints, initializers, regularizers

from ..functional import ACTIVATIONS, batch_norm
from ..nn.ghost import check_virtual_batch_size, ghost_batch_norm, ghost_batch_sizes
from ..nn.renorm import renorm_affine
from .renorm import check_renorm_clipping, renorm_corrections

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
        renorm: Keras's Batch Renormalization (Ioffe, 2017), as in Keras 2
            and ``keras.layers.BatchNormalization(renorm=True)``: adds the
            non-trainable weights ``moving_stddev``, ``renorm_mean``,
            ``renorm_stddev`` (after ``moving_variance``, Keras's order); in
            training the normalized values become ``xhat * r + d`` with
            ``r = sigma_B / renorm_stddev`` and
            ``d = (mu_B - renorm_mean) / renorm_stddev`` (pre-update values,
            clipped, constants in the backward); ``moving_variance`` is then
            ``moving_stddev**2 - epsilon``. Inference is unchanged. With
            ``virtual_batch_size``, ``r`` and ``d`` come from the averaged
            ghost statistics and correct every ghost batch (Keras 2's rule).
            See :mod:`batchnorm.keras.renorm`. Default: ``False``.
        renorm_clipping: ``None`` or a dict with optional keys ``"rmax"``
            (at least 1), ``"rmin"`` (in ``[0, 1]``), ``"dmax"`` (at least 0):
            ``r`` is clipped to ``[rmin, rmax]``, ``d`` to ``[-dmax, dmax]``;
            a missing key is no bound (``inf``, ``0``, ``inf``). Numbers only;
            for a schedule, assign a new dict to ``layer.renorm_clipping``
            between steps (validated the same way). Default: ``None``.
        renorm_momentum: weight of the old ``renorm_mean`` /
            ``renorm_stddev``, in ``[0, 1)``. Default: ``0.99``.
        **kwargs: Keras layer arguments (``name``, ``dtype``, ``trainable``...).

    Not supported: Keras's ``synchronized`` (use :class:`batchnorm.SyncBatchNorm`
    on the torch side), and masks (a ``mask`` raises ``NotImplementedError``).
    An empty batch (``N = 0``) in training updates no moving statistics.

    Raises:
        RuntimeError: Keras's backend is not torch.
        TypeError: a non-int ``axis``, a ``renorm_clipping`` that is not a
            dict of numbers.
        ValueError: ``momentum`` or ``renorm_momentum`` outside ``[0, 1)``,
            ``epsilon <= 0``, an unknown ``activation``, an ``axis`` out of
            range for the input, unknown ``renorm_clipping`` keys or values
            out of range.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, *, activation=None, negative_slope=0.01,
                 virtual_batch_size=None, renorm=False, renorm_clipping=None,
                 renorm_momentum=0.99, **kwargs):
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
        renorm_momentum = float(renorm_momentum)
        if not 0.0 <= renorm_momentum < 1.0:
            raise ValueError("Argument `renorm_momentum` must be in [0, 1). "
                             f"Received: renorm_momentum={renorm_momentum}")
        renorm_clipping = check_renorm_clipping(renorm_clipping)
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
        self.renorm = bool(renorm)
        self._renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None

    @property
    def renorm_clipping(self):
        """``None`` or the dict of clipping bounds (``rmax``, ``rmin``, ``dmax``)."""
        return self._renorm_clipping

    @renorm_clipping.setter
    def renorm_clipping(self, value):
        # Validated like the constructor's argument, so a schedule that assigns
        # a bad dict raises and leaves the previous bounds in place.
        self._renorm_clipping = check_renorm_clipping(value)

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
        if self.renorm:
            self._build_renorm(shape)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape),
                                                 axes={self.axis: input_shape[axis]})

    def _build_renorm(self, shape):
        """Keras's renorm weights, in its order, with its initial values."""
        def fresh(initializer):
            # A copy from its config, as Keras does, so that an unseeded random
            # initializer gives new values for the second variable.
            if isinstance(initializer, initializers.Initializer):
                return initializer.__class__.from_config(initializer.get_config())
            return initializer

        def stddev_initializer(shape, dtype=None):
            return keras.ops.sqrt(fresh(self.moving_variance_initializer)(shape, dtype=dtype))

        self.moving_stddev = self.add_weight(
            shape=shape, name="moving_stddev", initializer=stddev_initializer,
            trainable=False, autocast=False)
        self.renorm_mean = self.add_weight(
            shape=shape, name="renorm_mean", initializer=fresh(self.moving_mean_initializer),
            trainable=False, autocast=False)
        self.renorm_stddev = self.add_weight(
            shape=shape, name="renorm_stddev", initializer=stddev_initializer,
            trainable=False, autocast=False)

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
            # The batch moments feed r and d (renorm) and the moving statistics;
            # the latter are assigned only after the forward succeeded.
            # An empty batch has no moments: nothing is updated (PyTorch's rule).
            moments = self._batch_moments(x.detach()) if x.numel() else None
            if self.renorm and moments is not None:
                r, d = renorm_corrections(*moments, self.renorm_mean.value,
                                          self.renorm_stddev.value, self.renorm_clipping,
                                          self.epsilon)
                gamma, beta = renorm_affine(gamma, beta, r, d)
            if self.virtual_batch_size is None:
                y = batch_norm(x, None, None, gamma, beta, True, 1.0 - self.momentum,
                               self.epsilon, **kw)
            else:
                y = ghost_batch_norm(x, None, None, gamma, beta, True, 1.0 - self.momentum,
                                     self.epsilon, virtual_batch_size=self.virtual_batch_size,
                                     **kw)
            if moments is not None:
                self._update_moving_stats(*moments)
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

    def _update_moving_stats(self, mean, var):
        def average(variable, batch, m):
            old = variable.value
            new = old * m + batch.to(old.dtype) * (1.0 - m)
            variable.assign(new)
            return new

        with torch.no_grad():
            average(self.moving_mean, mean, self.momentum)
            if not self.renorm:
                average(self.moving_variance, var, self.momentum)
                return
            sigma_B = torch.sqrt(var + self.epsilon)
            average(self.renorm_mean, mean, self.renorm_momentum)
            average(self.renorm_stddev, sigma_B, self.renorm_momentum)
            stddev = average(self.moving_stddev, sigma_B, self.momentum)
            # Keras 2's rule: the inference variance follows the averaged stddev
            # (relu: rounding must not make it negative).
            self.moving_variance.assign(torch.relu(stddev * stddev - self.epsilon))

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
            "renorm": self.renorm,
            "renorm_clipping": (None if self.renorm_clipping is None
                                else dict(self.renorm_clipping)),
            "renorm_momentum": self.renorm_momentum,
        }
        return {**super().get_config(), **config}
