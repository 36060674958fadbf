"""``batch_norm``: validation, backend choice and the autograd.Function.

The argument order and semantics are those of
``torch.nn.functional.batch_norm``; the computation is ours (see
:mod:`batchnorm.kernels`). Everything is validated before anything is
computed, and the running statistics change only after the output exists, so
a call that raises leaves them as they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import resolve_backend

ACTIVATIONS = (None, "relu", "leaky_relu", "silu", "gelu", "sigmoid", "tanh")

__all__ = ["ACTIVATIONS", "batch_norm"]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01,
               residual=None, backend="auto", check_finite=False):
    r"""Batch Normalization with an optional fused residual add and activation.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            \cdot \gamma + \beta + \mathrm{residual}\Big)

    **Training** (``training=True``): the statistics are the batch mean and the
    biased batch variance over every axis but axis 1. If ``running_mean`` and
    ``running_var`` are given they are updated in place,
    ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased batch variance for ``running_var``.

    **Inference** (``training=False``): the running statistics are used, and
    must be given.

    Args:
        input: ``(N, C, *)`` floating-point tensor, any memory format.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` (training only).
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        training: use and update batch statistics. Default: ``False``.
        momentum: weight of the new batch in the running statistics (a
            number; the modules turn ``momentum=None`` into
            ``1 / num_batches_tracked``). Default: ``0.1``.
        eps: added to the variance. Default: ``1e-5``.
        activation: fused activation, one of ``None``, ``"relu"``,
            ``"leaky_relu"``, ``"silu"``, ``"gelu"`` (exact erf form),
            ``"sigmoid"``, ``"tanh"``. Default: ``None``.
        negative_slope: slope of ``"leaky_relu"``. Default: ``0.01``.
        residual: tensor shaped like ``input`` added before the activation.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``.
        check_finite: in training, raise if a batch statistic is NaN or Inf
            (the input held one) instead of letting it reach the running
            statistics, as PyTorch does. Costs one host synchronisation.
            Default: ``False``.

    Returns:
        Tensor shaped, typed and laid out like ``input``.

    Raises:
        ValueError: one value per channel in training, a bad activation, a
            residual of the wrong shape, non-finite statistics with
            ``check_finite``.
        RuntimeError: wrong sizes, devices or dtypes of the other tensors, no
            running statistics in inference, a backend that cannot run.
        NotImplementedError: a non-floating-point input.

    Example:
        >>> import torch
        >>> from batchnorm.functional import batch_norm
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, training=True, activation="relu")
        >>> bool((y >= 0).all()), rm.abs().sum().item() > 0
        (True, True)
    """
    _validate(input, running_mean, running_var, weight, bias, training, momentum, eps,
              activation, negative_slope, residual)
    ops = resolve_backend(backend, input)
    update = training and running_mean is not None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (input, weight, bias, residual)):
        result = _BatchNormFunction.apply(input, weight, bias, residual, running_mean,
                                          running_var, training, eps, activation,
                                          negative_slope, ops)
    else:  # nothing to differentiate (inference, no_grad): no autograd node to build
        out, _, mean, var, _ = ops.forward(input, running_mean, running_var, weight, bias,
                                           residual, training, eps, activation,
                                           negative_slope)
        result = (out, mean, var) if training else out
    if not training:
        return result
    out, mean, var = result
    if update and input.numel() > 0:
        if check_finite:
            _check_finite(mean, var)
        count = input.numel() // input.shape[1]
        ops.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out


def _check_finite(mean, var):
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))
    if bool(bad.any()):
        channels = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"batch statistics are not finite in channel(s) {channels[:10]}: the input "
            "holds NaN or Inf; running statistics were not updated")


def _validate(input, running_mean, running_var, weight, bias, training, momentum, eps,
              activation, negative_slope, residual):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        name = str(input.dtype).removeprefix("torch.")
        torch_name = {"int64": "Long", "int32": "Int", "int16": "Short", "int8": "Char",
                      "uint8": "Byte", "bool": "Bool"}.get(name, name)
        raise NotImplementedError(f'"batch_norm" not implemented for \'{torch_name}\'')
    if input.dim() < 2:
        raise RuntimeError(
            f"batch_norm expects an input of shape (N, C, *) with at least 2 dimensions, "
            f"got {input.dim()}D input of shape {tuple(input.shape)}")
    C = input.shape[1]
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training:
        size_prods = input.numel() // C if C else 0
        if size_prods == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
    low_precision = input.dtype in (torch.float16, torch.bfloat16)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but "
                f"{name} is on {t.device} and input is on {input.device}")
        if t.dtype != input.dtype and not (low_precision and t.dtype == torch.float32):
            allowed = "float32 or " if low_precision else ""
            raise RuntimeError(
                f"{name} has dtype {t.dtype}, expected {allowed}{input.dtype} "
                f"(the input's dtype)")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(
                f"residual must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(residual.shape)}")
        if residual.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but "
                f"residual is on {residual.device} and input is on {input.device}")
        if residual.dtype != input.dtype:
            raise RuntimeError(
                f"residual has dtype {residual.dtype}, expected {input.dtype} (the input's dtype)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         + ", ".join(repr(a) for a in ACTIVATIONS))
    if activation == "leaky_relu" and not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be finite, got {negative_slope}")
    if training and running_mean is not None:
        if momentum is None:
            raise TypeError("momentum must be a number; for a cumulative average pass "
                            "1 / num_batches_tracked, as the modules do for momentum=None")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")


class _BatchNormFunction(torch.autograd.Function):
    """Forward with the backend's kernels, analytic backward.

    In training it also returns the batch ``mean`` and biased ``var`` (not
    differentiable) so :func:`batch_norm` can update the running statistics
    after the output exists.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, training, eps,
                activation, negative_slope, ops):
        # The statistics' gradients are never defined: do not have autograd make
        # zero tensors for them on every backward (~5 us a step).
        ctx.set_materialize_grads(False)
        out, act_saved, mean, var, invstd = ops.forward(
            input, running_mean, running_var, weight, bias, residual, training, eps,
            activation, negative_slope)
        ctx.save_for_backward(input, weight, bias, residual, mean, invstd, act_saved)
        ctx.training, ctx.eps = training, eps
        ctx.activation, ctx.negative_slope, ctx.ops = activation, negative_slope, ops
        if not training:
            return out
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, *_):
        if grad_out is None:  # nothing flowed back into the output
            return (None,) * 11
        x, weight, bias, residual, mean, invstd, act_saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            grads = _double_backward_grads(ctx, grad_out, x, weight, bias, residual, mean, invstd,
                                           needs)
        else:
            grads = ctx.ops.backward(grad_out, x, mean, invstd, weight, act_saved,
                                     ctx.activation, ctx.negative_slope, ctx.training, needs)
        grad_input, grad_weight, grad_bias, grad_residual = grads
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_input, grad_weight, grad_bias, grad_residual, *([None] * 7)


def _double_backward_grads(ctx, grad_out, x, weight, bias, residual, mean, invstd, needs):
    """First-order gradients built from differentiable ops (``create_graph=True``).

    The analytic backward treats the saved batch statistics as constants, which
    is right for the first derivative but not for the second; here the forward
    is recomputed with autograd-visible ops so higher derivatives are exact.
    """
    inputs = [t for t, n in zip((x, weight, bias, residual), needs, strict=True) if n]
    with torch.enable_grad():
        out = _differentiable_forward(x, weight, bias, residual, mean, invstd, ctx.training,
                                      ctx.eps, ctx.activation, ctx.negative_slope)
        found = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True,
                                         allow_unused=True))
    return tuple(next(found) if n else None for n in needs)


def _activate(z, activation, negative_slope):
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    fn = {None: lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu,
          "sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation]
    return fn(z)


def _differentiable_forward(x, weight, bias, residual, mean, invstd, training, eps,
                            activation, negative_slope):
    """The forward in autograd-visible ops; in training the statistics come from ``x``."""
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = [1, -1, *([1] * (x.dim() - 2))]
    xc = x.to(cdtype)
    if training:
        var, mean = torch.var_mean(xc, dim=[0, *range(2, x.dim())], correction=0, keepdim=True)
        invstd = torch.rsqrt(var + eps)
    else:
        mean, invstd = mean.view(shape), invstd.view(shape)
    z = (xc - mean) * invstd
    if weight is not None:
        z = z * weight.to(cdtype).view(shape)
    if bias is not None:
        z = z + bias.to(cdtype).view(shape)
    if residual is not None:
        z = z + residual.to(cdtype)
    return _activate(z, activation, negative_slope).to(x.dtype)
