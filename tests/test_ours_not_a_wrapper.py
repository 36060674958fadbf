"""The op is ours: with every PyTorch batch-norm op made to raise, everything still runs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm.functional import batch_norm


class _NoTorchBatchNorm(TorchDispatchMode):
    """Raises on any ATen op with batch_norm in its name (native, cudnn, miopen, legit...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "batch_norm" in func.name():
            raise AssertionError(f"PyTorch's {func.name()} was called")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def torch_batch_norm_forbidden(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("PyTorch's batch norm was called")

    for owner, name in [(F, "batch_norm"), (torch, "batch_norm"), (torch, "native_batch_norm"),
                        (torch, "_native_batch_norm_legit"),
                        (torch, "_native_batch_norm_legit_no_training")]:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, refuse)
    with _NoTorchBatchNorm():
        yield


def test_the_guard_catches_torch(torch_batch_norm_forbidden):
    with pytest.raises(AssertionError, match="batch norm was called"):
        torch.nn.BatchNorm2d(3)(torch.randn(2, 3, 2, 2))
    with pytest.raises(AssertionError, match="was called"):
        torch.ops.aten.native_batch_norm(torch.randn(2, 3), None, None, None, None, True,
                                         0.1, 1e-5)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_modules_and_functional_run_without_torch_batch_norm(torch_batch_norm_forbidden,
                                                             activation):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation=activation),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 8), batchnorm.BatchNorm1d(8),
        torch.nn.Linear(8, 2))
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    model.train()
    model(x).sum().backward()
    assert x.grad is not None and model[1].weight.grad is not None
    assert model[1].num_batches_tracked.item() == 1
    model.eval()
    model(x).sum().backward()
    y = batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(3, requires_grad=True),
                   None, True, residual=torch.randn_like(x), activation="silu")
    y.sum().backward()
    lazy = batchnorm.BatchNorm()
    lazy(torch.randn(4, 3, 2, 2, 2, 2)).sum().backward()
