"""The portable backend: batch norm composed of plain tensor primitives.

Runs wherever PyTorch runs (any device, any dtype PyTorch supports) and never
calls PyTorch's batch-norm ops. Every backend exposes the same four functions,
so :mod:`batchnorm.functional` can swap them:

* ``batch_stats(x) -> (mean, var)``: per-channel mean and biased variance;
* ``normalize(x, mean, invstd, weight, bias, residual, activation, negative_slope)
  -> (out, act_saved)``: the apply pass with the fused epilogue;
* ``backward(grad_out, x, mean, invstd, weight, act_saved, activation,
  negative_slope, training, needs_input_grad) -> (grad_input, grad_weight,
  grad_bias, grad_residual)``;
* ``update_running_stats(running_mean, running_var, mean, var, count, momentum)``,
  in place on the device (no host synchronisation).

Tensors are ``(N, C, *)`` with any strides (contiguous, channels_last, or a
permuted view); per-channel values are ``(C,)`` in the compute dtype (float64
for float64 input, float32 otherwise), except ``mean``, which may carry extra
precision as float64 (see :func:`batch_stats`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Activations whose derivative can be read off the output; the rest keep the
# pre-activation (an extra tensor) for the backward.
_GRAD_FROM_OUTPUT = {None, "relu", "sigmoid", "tanh"}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every axis but the channel axis 1."""
    return [0, *range(2, x.dim())]


def channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(C,)`` -> ``(1, C, 1, ..., 1)`` for broadcasting against an ``ndim`` input."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == compute_dtype(x.dtype) else x.to(compute_dtype(x.dtype))


def saves_output(activation: str | None, negative_slope: float) -> bool:
    """Whether the activation's derivative can be computed from its output."""
    return activation in _GRAD_FROM_OUTPUT or (activation == "leaky_relu" and negative_slope > 0)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x``.

    The corrected two-pass algorithm: a first sum gives a rough mean ``hi``,
    then the centred pass gives both the variance and the mean's rounding
    error ``lo``. Large offsets (mean 1e4, std 1e-2) keep full accuracy
    where ``E[x^2] - E[x]^2`` would lose every digit, and torch's fast
    cascade sums beat ``torch.var_mean`` several times over.

    Returns:
        ``(mean, var)``: ``var`` in the compute dtype; ``mean`` as float64
        ``hi + lo`` so :func:`normalize` and :func:`backward` can centre with
        more than float32's precision (PyTorch's CPU kernels accumulate
        float32 statistics in float64; a float32 mean alone loses accuracy
        on tiny, nearly constant batches).
    """
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    xf = _upcast(x)
    hi = xf.sum(dims).div_(m)
    xc = xf - channel_view(hi, x.dim())
    lo = xc.sum(dims).div_(m)
    var = xc.square_().sum(dims).div_(m).sub_(lo * lo).clamp_(min=0)
    mean = hi.double() + lo.double()
    return mean, var


def split_mean(mean: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` as ``hi + lo`` in ``dtype``: centre with ``hi``, correct with ``lo``."""
    hi = mean.to(dtype)
    return hi, (mean - hi.to(mean.dtype)).to(dtype)


def _activate_(z: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """Apply the activation, in place where PyTorch has an in-place form."""
    if activation is None:
        return z
    if activation == "relu":
        return z.relu_()
    if activation == "leaky_relu":
        return F.leaky_relu_(z, negative_slope)
    if activation == "sigmoid":
        return z.sigmoid_()
    if activation == "tanh":
        return z.tanh_()
    if activation == "silu":
        return F.silu(z, inplace=True)
    if activation == "gelu":
        return F.gelu(z)
    raise ValueError(f"unknown activation {activation!r}")


def normalize(x, mean, invstd, weight, bias, residual=None, activation=None,
              negative_slope=0.01):
    """``act(weight * (x - mean) * invstd + bias + residual)`` in one output buffer.

    Centres first and then scales, ``(x - mean) * scale + bias``: folding the
    mean into a shift (``x * scale + shift``) saves a pass but cancels
    catastrophically when ``invstd`` is large (a tiny batch variance) or the
    data sit far from zero, and loses ~10x PyTorch's accuracy there.

    Returns:
        ``(out, act_saved)``: the output (dtype and memory format of ``x``), and
        what the activation's backward needs (``out`` itself, the
        pre-activation, or ``None`` without an activation).
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    hi, lo = split_mean(mean, invstd.dtype)
    shift = -lo * scale if bias is None else bias.to(invstd.dtype) - lo * scale
    nd = x.dim()
    # Elementwise ops keep the strides of x (contiguous, channels_last, permuted).
    z = torch.sub(x, channel_view(hi, nd))
    torch.addcmul(channel_view(shift, nd), z, channel_view(scale, nd), out=z)
    if residual is not None:
        z.add_(residual)
    if activation is None:
        out = z
    elif saves_output(activation, negative_slope):
        out = _activate_(z, activation, negative_slope)
    else:
        out = _activate_(z.clone() if activation == "silu" else z, activation, negative_slope)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if activation is None:
        return out, None
    return out, (out if saves_output(activation, negative_slope) else z)


def _activation_grad(grad_out, act_saved, activation, negative_slope):
    """``grad_out * act'(z)`` from the saved output or pre-activation."""
    if activation is None:
        return grad_out
    a = act_saved
    if activation == "relu":
        return grad_out.masked_fill(a <= 0, 0)
    if activation == "leaky_relu":
        return torch.where(a > 0, grad_out, grad_out * negative_slope)
    a = _upcast(a)
    if activation == "sigmoid":
        return grad_out * a * (1 - a)
    if activation == "tanh":
        return grad_out * (1 - a * a)
    if activation == "silu":
        s = torch.sigmoid(a)
        return grad_out * s * (1 + a * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(a * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))
        return grad_out * (cdf + a * pdf)
    raise ValueError(f"unknown activation {activation!r}")


def backward(grad_out, x, mean, invstd, weight, act_saved=None, activation=None,
             negative_slope=0.01, training=True, needs_input_grad=(True, True, True, True)):
    """Analytic backward of :func:`normalize` (and of the batch statistics).

    With ``g`` the gradient after the activation, ``M`` the elements per
    channel and ``xc = x - mean``::

        grad_bias   = sum(g)
        grad_weight = invstd * sum(g * xc)
        grad_input  = weight * invstd * (g - sum(g) / M - xc * invstd^2 * sum(g * xc) / M)

    (in eval mode only the first term: the statistics are constants).

    Returns:
        ``(grad_input, grad_weight, grad_bias, grad_residual)``, ``None`` where
        ``needs_input_grad`` says the gradient is not wanted.
    """
    need_x, need_w, need_b, need_r = needs_input_grad
    dims = reduce_dims(x)
    nd = x.dim()
    g = _activation_grad(grad_out, act_saved, activation, negative_slope)
    grad_residual = g if need_r else None
    gc = _upcast(g)
    hi, lo = split_mean(mean, invstd.dtype)
    xc = _upcast(x) - channel_view(hi, nd)  # x - mean == xc - lo
    sum_g = gc.sum(dims)
    sum_gxc = None
    if need_w or (need_x and training):
        sum_gxc = (gc * xc).sum(dims) - lo * sum_g
    grad_weight = sum_gxc * invstd if need_w else None
    grad_bias = sum_g if need_b else None
    grad_input = None
    if need_x:
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        if training:
            m = x.numel() // x.shape[1]
            k = -scale * invstd * invstd * sum_gxc / m
            c = -scale * sum_g / m - k * lo
            # xc becomes grad_input: k * xc + c + scale * g, in place.
            grad_input = xc.mul_(channel_view(k, nd)).add_(channel_view(c, nd))
            grad_input.addcmul_(gc, channel_view(scale, nd))
        else:
            grad_input = gc * channel_view(scale, nd)
        grad_input = grad_input.to(x.dtype)
    if grad_weight is not None and weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_input, grad_weight, grad_bias, grad_residual


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, in place: ``(1 - momentum) * running + momentum * batch``.

    ``running_var`` takes the unbiased variance ``var * count / (count - 1)``.
    """
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
