"""Bad input: a clear error (PyTorch's type and message where it has one), nothing changed."""

import pytest
import torch
from helpers import make_input

import batchnorm
from batchnorm.functional import batch_norm


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


MODULE_CASES = [
    ("BatchNorm1d", (2, 3, 4, 5)),     # wrong rank
    ("BatchNorm1d", (5,)),
    ("BatchNorm2d", (2, 3, 4)),
    ("BatchNorm3d", (2, 3, 4, 4)),
    ("BatchNorm2d", (2, 4, 3, 3)),     # wrong channel count
    ("BatchNorm2d", (1, 3, 1, 1)),     # one value per channel in training
    ("BatchNorm1d", (1, 3)),
]


@pytest.mark.parametrize("name,shape", MODULE_CASES)
def test_module_errors_match_torch_and_change_nothing(name, shape):
    ours, theirs = getattr(batchnorm, name)(3), getattr(torch.nn, name)(3)
    ours(make_input((4, 3) + (2,) * (3 if name == "BatchNorm3d" else
                                     2 if name == "BatchNorm2d" else 0)))
    before = _snapshot(ours)
    x = torch.randn(shape)
    expected_type, expected_msg = _torch_error(lambda: theirs(x))
    with pytest.raises(expected_type) as info:
        ours(x)
    assert str(info.value) == expected_msg
    _assert_unchanged(ours, before)


def test_torch_counts_a_failed_batch_and_we_do_not():
    theirs, ours = torch.nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    for m in (theirs, ours):
        with pytest.raises(ValueError):
            m(torch.randn(1, 3, 1, 1))
    assert theirs.num_batches_tracked.item() == 1  # PyTorch increments before validating
    assert ours.num_batches_tracked.item() == 0


def test_non_floating_input_matches_torch():
    x = torch.randint(0, 3, (4, 3))
    expected_type, expected_msg = _torch_error(lambda: torch.nn.BatchNorm1d(3)(x))
    m = batchnorm.BatchNorm1d(3)
    with pytest.raises(expected_type, match=expected_msg):
        m(x)
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_sized_tensors_match_torch(which):
    x = torch.randn(4, 3)
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3),
                bias=torch.zeros(3))
    args[which] = torch.ones(5)
    expected_type, expected_msg = _torch_error(
        lambda: torch.nn.functional.batch_norm(x, training=True, **args))
    rm, rv = args["running_mean"].clone(), args["running_var"].clone()
    with pytest.raises(expected_type) as info:
        batch_norm(x, training=True, **args)
    assert str(info.value) == expected_msg
    assert torch.equal(rm, args["running_mean"]) and torch.equal(rv, args["running_var"])


def test_mismatched_devices():
    rm = torch.zeros(3)
    with pytest.raises(RuntimeError, match="same device.*weight is on meta and input is on cpu"):
        batch_norm(torch.randn(4, 3), rm, torch.ones(3), torch.ones(3, device="meta"),
                   training=True)
    assert torch.equal(rm, torch.zeros(3))


def test_mismatched_dtypes():
    with pytest.raises(RuntimeError, match="running_mean has dtype torch.float32, expected "
                                           "torch.float64"):
        batch_norm(torch.randn(4, 3, dtype=torch.float64), torch.zeros(3), torch.ones(3),
                   training=True)
    with pytest.raises(RuntimeError, match="expected float32 or torch.float16"):
        batch_norm(torch.randn(4, 3).half(), torch.zeros(3, dtype=torch.float64),
                   torch.ones(3, dtype=torch.float64), training=True)


def test_functional_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(RuntimeError, match="both be given or both be None"):
        batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(RuntimeError, match=r"at least 2 dimensions, got 1D input"):
        batch_norm(torch.randn(5), torch.zeros(5), torch.ones(5), training=True)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        batch_norm(x, None, None, training=True, activation="swish")
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        batch_norm(x, None, None, training=True, residual=torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="residual has dtype"):
        batch_norm(x, None, None, training=True, residual=torch.randn(4, 3).double())
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        batch_norm(x, None, None, training=True, backend="gpu")
    with pytest.raises(TypeError, match="momentum must be a number"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=1.5)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        batch_norm(x, None, None, training=True, eps=-1.0)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        batch_norm([[1.0, 2.0]], None, None, training=True)


def test_backend_asked_by_name_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest.py's, for the Triton tests
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: .*CUDA tensors"):
        batch_norm(torch.randn(4, 3), None, None, training=True, backend="triton")


def test_nan_propagates_like_torch_by_default():
    x = make_input((6, 3, 2, 2))
    x[0, 1, 0, 0] = float("nan")
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(torch.isnan(y_ours), torch.isnan(y_theirs))
    assert torch.equal(torch.isnan(ours.running_var), torch.isnan(theirs.running_var))
    assert torch.isnan(ours.running_mean[1]) and not torch.isnan(ours.running_mean[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_raises_and_changes_nothing(bad):
    m = batchnorm.BatchNorm2d(3, check_finite=True)
    m(make_input((6, 3, 2, 2)))
    before = _snapshot(m)
    x = make_input((6, 3, 2, 2), seed=1)
    x[2, 2, 1, 1] = bad
    with pytest.raises(ValueError, match=r"not finite in channel\(s\) \[2\]"):
        m(x)
    _assert_unchanged(m, before)
    m.eval()
    assert not torch.isfinite(m(x)[2, 2, 1, 1])  # eval uses no batch statistics: no check
