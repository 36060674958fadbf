"""freeze_batchnorm / unfreeze_batchnorm: frozen through model.train(), undone exactly."""

import copy
import io
import pickle

import pytest
import torch
from helpers import assert_close
from tool_models import bn_state, example, make, randomize
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools import freeze_batchnorm, frozen_batchnorm, unfreeze_batchnorm

EXACT = dict(rtol=0, atol=0)


def layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def mixed_model():
    """PyTorch's BN, ours (with a fused activation), SyncBatchNorm (no group), renorm."""
    return randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), batchnorm.BatchNorm2d(4, activation="silu"),
        nn.Conv2d(4, 4, 1), batchnorm.SyncBatchNorm(4),
        nn.Conv2d(4, 4, 1), batchnorm.BatchRenorm2d(4, momentum=None),
        nn.Dropout(0.0)))


@pytest.mark.parametrize("name", ["mixed", "resnet"])
def test_frozen_statistics_survive_train_and_match_eval(name):
    model = mixed_model() if name == "mixed" else make("resnet")
    model.eval()
    x = example()
    with torch.no_grad():
        want = model(x)
    before = bn_state(model)
    freeze_batchnorm(model, affine=False)
    model.train()  # the pitfall: this used to undo bn.eval()
    assert all(m.training for m in model.modules())
    for _ in range(2):
        got = model(x)
    assert_close(got, want, **EXACT, name="train mode, frozen statistics")
    assert all(m.training for m in model.modules())  # the flag is put back after forward
    after = bn_state(model)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # running stats and num_batches_tracked
    got.sum().backward()
    assert all(m.weight.grad is not None for m in layers(model))  # affine still trains


def test_frozen_affine_parameters_get_no_gradient_and_restore_exactly():
    model = mixed_model().train()
    model[4].bias.requires_grad_(False)  # the user's own choice, to be restored as is
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    freeze_batchnorm(model, stats=False)
    bn_params = {id(p) for m in layers(model) for p in m.parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) in bn_params)
    before = bn_state(model)
    model(example()).sum().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) in bn_params)
    assert model[0].weight.grad is not None
    assert not torch.equal(bn_state(model)["1.running_mean"], before["1.running_mean"])

    unfreeze_batchnorm(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert frozen_batchnorm(model) == {}


def test_freezing_twice_adds_up_and_unfreeze_restores_the_first_state():
    model = mixed_model().train()
    freeze_batchnorm(model, stats=True, affine=False)
    freeze_batchnorm(model, stats=False, affine=True)
    assert list(frozen_batchnorm(model).values()) == [{"stats": True, "affine": True}] * 4
    assert all(len(m._forward_pre_hooks) == 1 for m in layers(model))  # hooks not stacked
    unfreeze_batchnorm(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in layers(model))
    assert all(p.requires_grad for p in model.parameters())
    before = bn_state(model)
    model(example())
    assert not torch.equal(bn_state(model)["1.running_mean"], before["1.running_mean"])


def test_part_of_a_model_and_eval_outputs_unchanged():
    model = make("resnet")
    freeze_batchnorm(model.stem)
    assert list(frozen_batchnorm(model)) == ["stem.1"]
    model.eval()
    x = example()
    reference = copy.deepcopy(model)
    unfreeze_batchnorm(reference)
    assert_close(model(x), reference(x), **EXACT, name="eval")


def test_copies_keep_the_freeze():
    model = freeze_batchnorm(mixed_model())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(buffer, weights_only=False)]
    x = example()
    for clone in clones:
        clone.train()
        before = bn_state(clone)
        clone(x)
        assert all(torch.equal(bn_state(clone)[k], v) for k, v in before.items())
        assert len(frozen_batchnorm(clone)) == 4
        unfreeze_batchnorm(clone)
        clone(x)
        assert not torch.equal(bn_state(clone)["1.running_mean"], before["1.running_mean"])
    assert len(frozen_batchnorm(model)) == 4  # the copies' unfreeze did not reach it


def test_a_failing_forward_puts_the_training_flag_back():
    bn = freeze_batchnorm(nn.BatchNorm2d(3)).train()
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(2, 3))
    assert bn.training


def test_frozen_layers_by_construction_are_left_alone():
    model = nn.Sequential(batchnorm.FrozenBatchNorm2d(3), nn.BatchNorm2d(3))
    freeze_batchnorm(model)
    assert list(frozen_batchnorm(model)) == ["1"]
    assert not model[0]._forward_pre_hooks


def test_bad_input_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics.*: 1"):
        freeze_batchnorm(model)
    assert frozen_batchnorm(model) == {} and all(p.requires_grad for p in model.parameters())
    freeze_batchnorm(model, stats=False)  # affine only is fine
    assert not model[1].weight.requires_grad
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze_batchnorm(model, stats=False, affine=False)
    with pytest.raises(ValueError, match="has no batch-norm layer"):
        freeze_batchnorm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has no batch-norm layer"):
        unfreeze_batchnorm(nn.Linear(2, 2))
