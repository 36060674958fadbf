"""Property tests (hypothesis): random shapes, scales and offsets against the reference."""

import numpy as np
import torch
from helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.functional import ACTIVATIONS, batch_norm

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw):
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 9))
    spatial = [draw(st.integers(1, 5)) for _ in range(rank - 2)]
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-3, 3))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e4]))
    return (n, c, *spatial), seed, 10.0 ** log_scale, offset


@SETTINGS
@given(batches(), st.sampled_from(ACTIVATIONS), st.booleans())
def test_float64_forward_backward_any_shape(batch, activation, training):
    shape, seed, scale, offset = batch
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal(shape) * scale + offset
    dy_np = rng.standard_normal(shape)
    w_np, b_np = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    rm_np, rv_np = rng.standard_normal(shape[1]), rng.uniform(0.5, 2, shape[1])
    x = torch.tensor(x_np, requires_grad=True)
    w, b = torch.tensor(w_np, requires_grad=True), torch.tensor(b_np, requires_grad=True)
    rm, rv = torch.tensor(rm_np), torch.tensor(rv_np)
    y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation=activation)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.tensor(dy_np))
    if training:
        out, cache = reference.forward_train(x_np, w_np, b_np, 1e-5, activation=activation)
        want_rm, want_rv, _ = reference.update_running_stats(
            rm_np, rv_np, cache["mean"], cache["var"], cache["m"], 0.1)
    else:
        out, cache = reference.forward_eval(x_np, rm_np, rv_np, w_np, b_np, 1e-5,
                                            activation=activation)
        want_rm, want_rv = rm_np, rv_np
    dx, dgamma, dbeta, _ = reference.backward(dy_np, cache)
    # Both sides are float64; what they can agree on shrinks with the data's
    # conditioning, |offset| / scale (1e7 for an offset of 1e4 and a scale of 1e-3).
    tol = 1e-10 + 1e-15 * 100 * (abs(offset) + scale) / scale
    assert_close(y, out, tol, tol, name="out")
    assert_close(gx, dx, tol, tol * max(1.0, np.abs(dx).max()), name="grad_input")
    assert_close(gw, dgamma, tol, tol * max(1.0, np.abs(dgamma).max()), name="grad_weight")
    assert_close(gb, dbeta, tol, tol * max(1.0, np.abs(dbeta).max()), name="grad_bias")
    assert_close(rm, want_rm, tol, tol * max(1.0, abs(offset)), name="running_mean")
    assert_close(rv, want_rv, tol, tol, name="running_var")


@SETTINGS
@given(batches())
def test_float32_variance_stays_accurate_with_offsets(batch):
    """The unbiased running variance from float32 input, against float64 on the same values."""
    shape, seed, scale, offset = batch
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal(shape) * scale + offset, dtype=torch.float32)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    batch_norm(x, rm, rv, training=True, momentum=1.0)
    x64 = x.double()
    dims = [0, *range(2, x.dim())]
    want_var = x64.var(dim=dims, correction=1)
    want_mean = x64.mean(dim=dims)
    # Relative error of a float32 two-pass variance: a few float32 ulps, whatever the offset
    # (a naive E[x^2] - E[x]^2 is off by (offset/scale)^2 ulps: 1e14 for 1e4 / 1e-3).
    assert_close(rv, want_var, 1e-4, 1e-30, name="running_var")
    assert_close(rm, want_mean, 1e-6, 1e-6 * scale, name="running_mean")
    assert torch.all(rv >= 0)
