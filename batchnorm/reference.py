r"""Batch Normalization in float64 NumPy, written to be read next to the paper.

Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift".

**Algorithm 1** (training; one mini-batch B = {x_1..m} per channel)::

    mu_B      = 1/m * sum_i x_i                      # mini-batch mean
    sigma2_B  = 1/m * sum_i (x_i - mu_B)^2           # mini-batch variance (biased)
    xhat_i    = (x_i - mu_B) / sqrt(sigma2_B + eps)  # normalize
    y_i       = gamma * xhat_i + beta                # scale and shift

**Algorithm 2** (inference) replaces mu_B and sigma2_B by population
statistics. PyTorch keeps them as exponential moving averages updated after
every training batch (this module follows PyTorch, not the paper's
post-training pass)::

    running_mean = (1 - momentum) * running_mean + momentum * mu_B
    running_var  = (1 - momentum) * running_var  + momentum * m / (m - 1) * sigma2_B

The running variance uses the *unbiased* estimate m/(m-1) * sigma2_B, while
normalization uses the biased one. ``momentum=None`` means a cumulative
average: the factor is ``1 / num_batches_tracked`` after the increment.

**Backward** (the paper's chain rule, Section 3)::

    dxhat    = dy * gamma
    dsigma2  = sum_i dxhat_i * (x_i - mu_B) * -1/2 * (sigma2_B + eps)^(-3/2)
    dmu      = sum_i dxhat_i * -1/sqrt(sigma2_B + eps) + dsigma2 * sum_i -2 (x_i - mu_B) / m
    dx_i     = dxhat_i / sqrt(sigma2_B + eps) + dsigma2 * 2 (x_i - mu_B) / m + dmu / m
    dgamma   = sum_i dy_i * xhat_i
    dbeta    = sum_i dy_i

The paper's ``gamma`` is PyTorch's ``weight`` and ``beta`` is ``bias``.

**Batch Renormalization** (Ioffe, 2017, Algorithm 1) corrects the training
output towards the population statistics ``mu`` and ``sigma`` (the running
mean and ``sqrt(running_var + eps)``) with per-channel ``r`` and ``d``, held
constant in the backward (stop-gradient)::

    sigma_B = sqrt(sigma2_B + eps)
    r       = clip(sigma_B / sigma, 1/rmax, rmax)
    d       = clip((mu_B - mu) / sigma, -dmax, dmax)
    xhat_i  = (x_i - mu_B) / sigma_B * r + d
    y_i     = gamma * xhat_i + beta

With ``r = 1`` and ``d = 0`` (``rmax = 1``, ``dmax = 0``) it is Algorithm 1
above; inference is Algorithm 2 unchanged. See :func:`renorm_forward_train`.

Inputs are ``(N, C, *)``: channel axis 1, every other axis is part of the
mini-batch, so ``m = N * prod(spatial)``. Internally each array is viewed as
``(N, C, L)``. Besides the paper, this module defines the epilogue the library
fuses into the layer, ``y = act(gamma * xhat + beta + residual)``, so every
backend can be checked against one oracle.
"""

from __future__ import annotations

import math

import numpy as np

ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "sigmoid", "tanh")


def _as_ncl(x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"expected an (N, C, *) array, got shape {x.shape}")
    return np.asarray(x, dtype=np.float64).reshape(x.shape[0], x.shape[1], -1)


def _per_channel(v: np.ndarray | None, C: int, default: float) -> np.ndarray:
    if v is None:
        return np.full(C, default, dtype=np.float64)
    return np.asarray(v, dtype=np.float64).reshape(C)


def activation_forward(z: np.ndarray, activation: str | None, negative_slope: float = 0.01):
    """Apply the fused activation to the pre-activation ``z``."""
    if activation is None:
        return z
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, negative_slope * z)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    if activation == "silu":
        return z / (1.0 + np.exp(-z))
    if activation == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_backward(dy: np.ndarray, z: np.ndarray, activation: str | None,
                        negative_slope: float = 0.01) -> np.ndarray:
    """Gradient through the activation: ``dy * act'(z)``."""
    if activation is None:
        return dy
    if activation == "relu":
        return dy * (z > 0)
    if activation == "leaky_relu":
        return dy * np.where(z > 0, 1.0, negative_slope)
    if activation == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return dy * s * (1.0 - s)
    if activation == "tanh":
        return dy * (1.0 - np.tanh(z) ** 2)
    if activation == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return dy * s * (1.0 + z * (1.0 - s))
    if activation == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return dy * (cdf + z * pdf)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def forward_train(x, gamma=None, beta=None, eps=1e-5, *, residual=None,
                  activation=None, negative_slope=0.01):
    """Algorithm 1: normalize with the mini-batch statistics.

    Args:
        x: input ``(N, C, *)``.
        gamma, beta: ``(C,)`` scale and shift, or ``None`` for 1 and 0.
        eps: added to the variance for numerical stability.
        residual: optional array shaped like ``x``, added before the activation.
        activation: one of :data:`ACTIVATIONS` or ``None``.

    Returns:
        ``(out, cache)``: ``out`` shaped like ``x``; ``cache`` holds what the
        backward and the running-statistic update need (``mean``, the biased
        ``var``, the count ``m``).
    """
    shape = np.shape(x)
    x = _as_ncl(x)                                          # (N, C, L)
    N, C, L = x.shape
    m = N * L
    gamma = _per_channel(gamma, C, 1.0)                     # (C,)
    beta = _per_channel(beta, C, 0.0)                       # (C,)
    mu = x.mean(axis=(0, 2))                                # (C,)
    xc = x - mu[None, :, None]                              # (N, C, L)
    var = (xc * xc).mean(axis=(0, 2))                       # (C,) biased
    invstd = 1.0 / np.sqrt(var + eps)                       # (C,)
    xhat = xc * invstd[None, :, None]                       # (N, C, L)
    z = gamma[None, :, None] * xhat + beta[None, :, None]   # (N, C, L)
    if residual is not None:
        z = z + _as_ncl(residual)                           # (N, C, L)
    y = activation_forward(z, activation, negative_slope)   # (N, C, L)
    cache = dict(x=x, xhat=xhat, z=z, mean=mu, var=var, invstd=invstd, gamma=gamma,
                 m=m, training=True, activation=activation, negative_slope=negative_slope,
                 shape=shape)
    return y.reshape(shape), cache


def forward_eval(x, running_mean, running_var, gamma=None, beta=None, eps=1e-5, *,
                 residual=None, activation=None, negative_slope=0.01):
    """Algorithm 2: normalize with the population (running) statistics.

    Returns:
        ``(out, cache)`` like :func:`forward_train`.
    """
    shape = np.shape(x)
    x = _as_ncl(x)                                          # (N, C, L)
    C = x.shape[1]
    gamma = _per_channel(gamma, C, 1.0)                     # (C,)
    beta = _per_channel(beta, C, 0.0)                       # (C,)
    mu = _per_channel(running_mean, C, 0.0)                 # (C,)
    var = _per_channel(running_var, C, 1.0)                 # (C,)
    invstd = 1.0 / np.sqrt(var + eps)                       # (C,)
    xhat = (x - mu[None, :, None]) * invstd[None, :, None]  # (N, C, L)
    z = gamma[None, :, None] * xhat + beta[None, :, None]   # (N, C, L)
    if residual is not None:
        z = z + _as_ncl(residual)                           # (N, C, L)
    y = activation_forward(z, activation, negative_slope)   # (N, C, L)
    cache = dict(x=x, xhat=xhat, z=z, mean=mu, var=var, invstd=invstd, gamma=gamma,
                 m=x.shape[0] * x.shape[2], training=False, activation=activation,
                 negative_slope=negative_slope, shape=shape)
    return y.reshape(shape), cache


def update_running_stats(running_mean, running_var, mean, var, m, momentum=0.1,
                         num_batches_tracked=0):
    """PyTorch's running-statistic update after one training batch.

    Args:
        running_mean, running_var: current ``(C,)`` population estimates.
        mean, var: the batch mean and *biased* variance from :func:`forward_train`.
        m: elements per channel in the batch (``N * L``).
        momentum: weight of the new batch, or ``None`` for a cumulative average.
        num_batches_tracked: batches seen *before* this one.

    Returns:
        ``(running_mean, running_var, num_batches_tracked)``, new arrays.
    """
    if m < 2:
        raise ValueError("the unbiased variance needs at least 2 values per channel")
    num_batches_tracked = num_batches_tracked + 1
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    unbiased = np.asarray(var, dtype=np.float64) * m / (m - 1)                   # (C,)
    new_mean = (1.0 - factor) * np.asarray(running_mean, np.float64) + factor * mean
    new_var = (1.0 - factor) * np.asarray(running_var, np.float64) + factor * unbiased
    return new_mean, new_var, num_batches_tracked


def backward(dout, cache):
    """Gradients of the loss with respect to ``x``, ``gamma`` and ``beta``.

    Args:
        dout: upstream gradient, shaped like the forward's output.
        cache: the second result of :func:`forward_train` or :func:`forward_eval`.

    Returns:
        ``(dx, dgamma, dbeta, dresidual)``; ``dresidual`` is the gradient that
        reaches the residual input (the gradient after the activation).
    """
    x, xhat, invstd, gamma, m = (cache[k] for k in ("x", "xhat", "invstd", "gamma", "m"))
    dout = _as_ncl(dout)                                                 # (N, C, L)
    dy = activation_backward(dout, cache["z"], cache["activation"],
                             cache["negative_slope"])                    # (N, C, L)
    dgamma = (dy * xhat).sum(axis=(0, 2))                                # (C,)
    dbeta = dy.sum(axis=(0, 2))                                          # (C,)
    dxhat = dy * gamma[None, :, None]                                    # (N, C, L)
    if not cache["training"]:
        dx = dxhat * invstd[None, :, None]                               # (N, C, L)
    else:
        xc = x - cache["mean"][None, :, None]                            # (N, C, L)
        dvar = (dxhat * xc).sum(axis=(0, 2)) * -0.5 * invstd ** 3        # (C,)
        dmu = (dxhat * -invstd[None, :, None]).sum(axis=(0, 2)) \
            + dvar * (-2.0 * xc).sum(axis=(0, 2)) / m                    # (C,)
        dx = (dxhat * invstd[None, :, None]
              + dvar[None, :, None] * 2.0 * xc / m
              + dmu[None, :, None] / m)                                  # (N, C, L)
    shape = cache["shape"]
    return dx.reshape(shape), dgamma, dbeta, dy.reshape(shape)


def renorm_forward_train(x, gamma, beta, running_mean, running_var, rmax, dmax, eps=1e-5):
    """Batch Renormalization in training (Ioffe, 2017, Algorithm 1).

    The running statistics are the population estimates *before* this batch
    updates them: ``mu = running_mean``, ``sigma = sqrt(running_var + eps)``.
    The paper keeps a moving average of ``sigma_B`` itself; this library keeps
    PyTorch's ``running_var`` (unbiased batch variances, updated by
    :func:`update_running_stats`), so inference stays Algorithm 2.

    Args:
        x: input ``(N, C, *)``.
        gamma, beta: ``(C,)`` scale and shift, or ``None`` for 1 and 0.
        running_mean, running_var: ``(C,)`` population estimates.
        rmax: ``r`` is clipped to ``[1/rmax, rmax]`` (``rmax >= 1``).
        dmax: ``d`` is clipped to ``[-dmax, dmax]`` (``dmax >= 0``).
        eps: added to both variances.

    Returns:
        ``(out, cache)``: ``cache`` holds ``r`` and ``d`` and, like
        :func:`forward_train`'s, the batch ``mean``, biased ``var`` and ``m``.
    """
    if not rmax >= 1.0 or not dmax >= 0.0:
        raise ValueError(f"need rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
    shape = np.shape(x)
    x = _as_ncl(x)                                              # (N, C, L)
    N, C, L = x.shape
    m = N * L
    gamma = _per_channel(gamma, C, 1.0)                         # (C,)
    beta = _per_channel(beta, C, 0.0)                           # (C,)
    mu = _per_channel(running_mean, C, 0.0)                     # (C,) population mean
    sigma = np.sqrt(_per_channel(running_var, C, 1.0) + eps)    # (C,) population std
    mu_B = x.mean(axis=(0, 2))                                  # (C,)
    xc = x - mu_B[None, :, None]                                # (N, C, L)
    var = (xc * xc).mean(axis=(0, 2))                           # (C,) biased
    sigma_B = np.sqrt(var + eps)                                # (C,)
    r = np.clip(sigma_B / sigma, 1.0 / rmax, rmax)              # (C,) a constant for backward
    d = np.clip((mu_B - mu) / sigma, -dmax, dmax)               # (C,) a constant for backward
    xhat = xc / sigma_B[None, :, None] * r[None, :, None] + d[None, :, None]  # (N, C, L)
    y = gamma[None, :, None] * xhat + beta[None, :, None]       # (N, C, L)
    cache = dict(x=x, xc=xc, xhat=xhat, mean=mu_B, var=var, sigma_B=sigma_B, r=r, d=d,
                 gamma=gamma, m=m, shape=shape)
    return y.reshape(shape), cache


def renorm_backward(dout, cache):
    """The paper's backward of :func:`renorm_forward_train`, ``r`` and ``d`` constant.

    ::

        dxhat    = dy * gamma
        dsigma_B = sum_i dxhat_i * (x_i - mu_B) * -r / sigma_B^2
        dmu_B    = sum_i dxhat_i * -r / sigma_B
        dx_i     = dxhat_i * r / sigma_B + dsigma_B * (x_i - mu_B) / (m * sigma_B) + dmu_B / m
        dgamma   = sum_i dy_i * xhat_i
        dbeta    = sum_i dy_i

    Returns:
        ``(dx, dgamma, dbeta)``.
    """
    xc, xhat, sigma_B, r, gamma, m = (cache[k] for k in
                                      ("xc", "xhat", "sigma_B", "r", "gamma", "m"))
    dy = _as_ncl(dout)                                                   # (N, C, L)
    dxhat = dy * gamma[None, :, None]                                    # (N, C, L)
    dsigma_B = (dxhat * xc).sum(axis=(0, 2)) * -r / sigma_B ** 2         # (C,)
    dmu_B = dxhat.sum(axis=(0, 2)) * -r / sigma_B                        # (C,)
    dx = (dxhat * (r / sigma_B)[None, :, None]
          + (dsigma_B / (m * sigma_B))[None, :, None] * xc
          + (dmu_B / m)[None, :, None])                                  # (N, C, L)
    dgamma = (dy * xhat).sum(axis=(0, 2))                                # (C,)
    dbeta = dy.sum(axis=(0, 2))                                          # (C,)
    return dx.reshape(cache["shape"]), dgamma, dbeta
