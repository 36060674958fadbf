"""``torch.compile`` on a model built from our modules, on the CPU."""

import copy

import pytest
import torch
from helpers import assert_close

import batchnorm


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNorm2d(8, activation="relu"),
        torch.nn.Conv2d(8, 8, 3, padding=1), batchnorm.BatchNorm2d(8),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10), batchnorm.BatchNorm1d(10))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_model_matches_eager_in_training_and_eval(backend):
    eager = _model()
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend=backend)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        y_e, y_c = eager(x), compiled(x)
        assert_close(y_c, y_e, 1e-5, 1e-5, name=f"train step {step} output")
        y_e.square().sum().backward()
        y_c.square().sum().backward()
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_src.parameters(),
                                    strict=True):
            assert_close(p_c.grad, p_e.grad, 1e-4, 1e-4, name=f"grad {name}")
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_src.buffers(), strict=True):
        assert_close(b_c, b_e, 1e-5, 1e-5, name=name)
    assert compiled_src[1].num_batches_tracked.item() == 2
    eager.eval()
    compiled.eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), 1e-5, 1e-5, name="eval output")
