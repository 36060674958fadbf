"""The float64 NumPy reference against PyTorch's own batch norm and autograd."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SHAPES, assert_close, make_input

from batchnorm import reference

TOL = dict(rtol=1e-10, atol=1e-10)


def torch_activation(z, activation, slope=0.01):
    if activation is None:
        return z
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    return {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid,
            "tanh": torch.tanh}[activation](z)


# One value per channel cannot be normalized in training.
CASES = [(s, t) for s in SHAPES for t in (True, False) if not t or np.prod(s) // s[1] > 1]


@pytest.mark.parametrize("shape,training", CASES)
def test_forward_backward_match_torch_autograd(shape, training):
    C = shape[1]
    x = make_input(shape, torch.float64, seed=1, requires_grad=True)
    w = torch.linspace(0.5, 1.5, C, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-0.3, 0.3, C, dtype=torch.float64).requires_grad_()
    rm = torch.linspace(-0.2, 0.2, C, dtype=torch.float64)
    rv = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, eps=1e-5)
    dy = make_input(shape, torch.float64, seed=2)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)

    xn = x.detach().numpy()
    if training:
        out, cache = reference.forward_train(xn, w.detach().numpy(), b.detach().numpy(), 1e-5)
    else:
        out, cache = reference.forward_eval(xn, rm.numpy(), rv.numpy(), w.detach().numpy(),
                                            b.detach().numpy(), 1e-5)
    dx, dgamma, dbeta, _ = reference.backward(dy.numpy(), cache)
    assert_close(out, y, **TOL, name="out")
    assert_close(dx, gx, **TOL, name="dx")
    assert_close(dgamma, gw, **TOL, name="dgamma")
    assert_close(dbeta, gb, **TOL, name="dbeta")


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_update_matches_torch_module(momentum):
    bn = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    rm, rv, nbt = np.zeros(3), np.ones(3), 0
    for step in range(4):
        x = make_input((4, 3, 5, 5), torch.float64, seed=step, offset=step)
        bn(x)
        _, cache = reference.forward_train(x.numpy())
        rm, rv, nbt = reference.update_running_stats(rm, rv, cache["mean"], cache["var"],
                                                     cache["m"], momentum, nbt)
    assert nbt == bn.num_batches_tracked.item() == 4
    assert_close(rm, bn.running_mean, **TOL, name="running_mean")
    assert_close(rv, bn.running_var, **TOL, name="running_var")


def test_running_stats_need_two_values():
    with pytest.raises(ValueError, match="at least 2 values"):
        reference.update_running_stats(np.zeros(1), np.ones(1), np.zeros(1), np.ones(1), 1)


@pytest.mark.parametrize("activation", reference.ACTIVATIONS + (None,))
@pytest.mark.parametrize("with_residual", [False, True])
def test_epilogue_matches_torch_autograd(activation, with_residual):
    shape = (4, 3, 3, 2)
    x = make_input(shape, torch.float64, seed=3, requires_grad=True)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    r = make_input(shape, torch.float64, seed=4, requires_grad=True) if with_residual else None
    z = F.batch_norm(x, None, None, w, b, training=True)
    if r is not None:
        z = z + r
    y = torch_activation(z, activation, 0.2)
    dy = make_input(shape, torch.float64, seed=5)
    inputs = (x, w, b) + ((r,) if r is not None else ())
    grads = torch.autograd.grad(y, inputs, dy)

    out, cache = reference.forward_train(
        x.detach().numpy(), w.detach().numpy(), b.detach().numpy(),
        residual=None if r is None else r.detach().numpy(), activation=activation,
        negative_slope=0.2)
    dx, dgamma, dbeta, dres = reference.backward(dy.numpy(), cache)
    assert_close(out, y, **TOL, name="out")
    for got, want, name in zip((dx, dgamma, dbeta, dres), grads, ("dx", "dgamma", "dbeta", "dres"),
                               strict=False):
        assert_close(got, want, **TOL, name=name)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        reference.forward_train(np.ones((2, 2)), activation="swish")


# Batch Renormalization (Ioffe, 2017): r and d are constants in the backward.
RENORM_LIMITS = [(1e6, 1e6), (1.2, 0.3), (1.0, 0.0)]  # never clipped, clipped, plain BN


def _renorm_torch(x, w, b, rm, rv, rmax, dmax, eps=1e-5):
    dims = [0, *range(2, x.dim())]
    view = [1, -1] + [1] * (x.dim() - 2)
    var, mu_B = torch.var_mean(x, dim=dims, correction=0)
    sigma_B = torch.sqrt(var + eps)
    sigma = torch.sqrt(rv + eps)
    r = torch.clamp(sigma_B / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mu_B - rm) / sigma, -dmax, dmax).detach()
    xhat = (x - mu_B.view(view)) / sigma_B.view(view) * r.view(view) + d.view(view)
    return w.view(view) * xhat + b.view(view), r, d


@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 7), (3, 4, 3, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("rmax,dmax", RENORM_LIMITS)
def test_renorm_matches_torch_autograd_with_r_d_constant(shape, rmax, dmax):
    C = shape[1]
    x = make_input(shape, torch.float64, seed=1, requires_grad=True)
    w = torch.linspace(0.5, 1.5, C, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-0.3, 0.3, C, dtype=torch.float64, requires_grad=True)
    rm = torch.linspace(1.0, -1.0, C, dtype=torch.float64)  # far from the batch: d clips
    rv = torch.linspace(0.2, 4.0, C, dtype=torch.float64)   # r below and above 1
    y, r, d = _renorm_torch(x, w, b, rm, rv, rmax, dmax)
    dy = make_input(shape, torch.float64, seed=2)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    out, cache = reference.renorm_forward_train(x.detach().numpy(), w.detach().numpy(),
                                                b.detach().numpy(), rm.numpy(), rv.numpy(),
                                                rmax, dmax)
    dx, dgamma, dbeta = reference.renorm_backward(dy.numpy(), cache)
    assert_close(out, y, **TOL, name="out")
    assert_close(cache["r"], r, **TOL, name="r")
    assert_close(cache["d"], d, **TOL, name="d")
    assert_close(dx, gx, **TOL, name="dx")
    assert_close(dgamma, gw, **TOL, name="dgamma")
    assert_close(dbeta, gb, **TOL, name="dbeta")
    if rmax == 1.0 and dmax == 0.0:  # plain batch norm, Algorithm 1
        bn_out, bn_cache = reference.forward_train(x.detach().numpy(), w.detach().numpy(),
                                                   b.detach().numpy())
        bn_dx, bn_dgamma, bn_dbeta, _ = reference.backward(dy.numpy(), bn_cache)
        for got, want, name in ((out, bn_out, "out"), (dx, bn_dx, "dx"),
                                (dgamma, bn_dgamma, "dgamma"), (dbeta, bn_dbeta, "dbeta")):
            assert_close(got, want, **TOL, name=f"plain BN {name}")
    elif rmax > 1e5:
        assert not np.allclose(cache["r"], 1.0) and not np.allclose(cache["d"], 0.0)
    else:  # some channels clipped at each limit
        assert np.isclose(cache["r"], rmax).any() and np.isclose(cache["r"], 1 / rmax).any()
        assert np.isclose(np.abs(cache["d"]), dmax).any()


@pytest.mark.parametrize("rmax,dmax", [(0.5, 1.0), (2.0, -0.1), (float("nan"), 1.0)])
def test_renorm_rejects_bad_limits(rmax, dmax):
    with pytest.raises(ValueError, match="rmax >= 1 and dmax >= 0"):
        reference.renorm_forward_train(np.ones((2, 2)), None, None, np.zeros(2), np.ones(2),
                                       rmax, dmax)
