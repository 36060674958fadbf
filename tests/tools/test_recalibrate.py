"""recalibrate_batchnorm: exact population statistics (float64, directly over all the data),
what is restored, loader layouts, bad input, and two gloo ranks that agree."""

import copy

import pytest
import torch
from dist_harness import run_world
from helpers import assert_close
from tool_models import bn_state, make, randomize
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools import freeze_batchnorm, recalibrate_batchnorm

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)  # float32 model against the float64 oracle


def batches(sizes, seed=0, size=6, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) * 2 + 1 + shift for n in sizes]


def population(model, data, other_train=False):
    """Every recalibrated layer's input over ``data``, gathered whole: mean and unbiased var
    in float64, computed directly (the oracle). BN layers run in training mode, as the tool
    runs them; the rest in eval (or train) mode."""
    net = copy.deepcopy(model).double()
    seen = {}

    def hook(name):
        def capture(module, args):
            x = args[0].detach().double()
            axis = getattr(module, "axis", 1) % x.dim()
            seen.setdefault(name, []).append(x.movedim(axis, 0).reshape(x.shape[axis], -1))
        return capture

    for name, m in net.named_modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(hook(name))
            m.train()
        elif not other_train:
            m.training = False
    with torch.no_grad():
        for x in data:
            net(x.double())
    out = {}
    for name, parts in seen.items():
        values = torch.cat(parts, dim=1)
        out[name] = (values.mean(dim=1), values.var(dim=1, correction=1))
    return out


def check_against(model, want, tol):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert set(want) == set(layers)
    for name, (mean, var) in want.items():
        assert_close(layers[name].running_mean, mean, **tol, name=f"{name} mean")
        assert_close(layers[name].running_var, var, **tol, name=f"{name} var")


@pytest.mark.parametrize("name", ["sequential", "branchy", "resnet"])
def test_statistics_are_those_of_all_the_data_float64(name):
    model = make(name).double()
    data = [x.double() for x in batches([8, 8, 3], size=6)]  # a short last batch
    want = population(model, data)
    recalibrate_batchnorm(model, data)
    check_against(model, want, F64)


def test_float32_model_and_not_an_average_of_batch_statistics():
    model = make("resnet")
    data = batches([16, 2, 5], seed=3, size=5)
    want = population(model, data)
    recalibrate_batchnorm(model, data)
    check_against(model, want, F32)
    # What an average of per-batch statistics (swa_utils.update_bn's cumulative average)
    # gives instead is far off with unequal batches: the data really tells them apart.
    averaged = copy.deepcopy(model)
    for m in averaged.modules():
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    averaged.train()
    with torch.no_grad():
        for x in data:
            averaged(x)
    exact, avg = model.stem[1].running_var, averaged.stem[1].running_var
    assert ((exact - avg).abs() / exact).max() > 1e-2


def test_restores_modes_momenta_and_num_batches_tracked():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                                    nn.Dropout(0.5), nn.Conv2d(4, 4, 1),
                                    batchnorm.BatchRenorm2d(4, momentum=0.3)))
    model.train()
    model[4].eval()
    with torch.no_grad():
        model[1].num_batches_tracked.fill_(7)
        model[4].num_batches_tracked.fill_(11)
    modes = [m.training for m in model.modules()]
    data = batches([4, 4])
    want = population(model, data)  # dropout off: other modules in eval mode
    recalibrate_batchnorm(model, data)
    check_against(model, want, F32)
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum is None and model[4].momentum == 0.3
    assert model[1].num_batches_tracked.item() == 7 and model[4].num_batches_tracked.item() == 11


def test_other_modules_in_training_mode_see_dropout():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4)))
    data = batches([8])
    torch.manual_seed(5)
    want_train = population(model, data, other_train=True)
    torch.manual_seed(5)
    recalibrate_batchnorm(model, data, other_modules="train")
    check_against(model, want_train, F32)
    recalibrate_batchnorm(model, data)  # dropout off: a smaller variance
    assert (model[2].running_var < want_train["2"][1].float()).all()


def test_loader_layouts_num_batches_and_forward():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, image, scale=1.0):
            return self.bn(image * scale)

    data = batches([4, 4, 4], seed=1)
    want = population(nn.Sequential(nn.BatchNorm2d(3)), data[:2])["0"]
    for loader in ([(x, torch.zeros(len(x))) for x in data],
                   [[x] for x in data],
                   [{"image": x} for x in data]):
        model = Keyword() if isinstance(loader[0], dict) else nn.Sequential(nn.BatchNorm2d(3))
        recalibrate_batchnorm(model, loader, num_batches=2)
        bn = model.bn if isinstance(model, Keyword) else model[0]
        assert_close(bn.running_mean, want[0], **F32, name="mean")
        assert_close(bn.running_var, want[1], **F32, name="var")

    consumed = []

    def stream():
        for x in data:
            consumed.append(len(consumed))
            yield x

    model = Keyword()
    recalibrate_batchnorm(model, stream(), 2, forward=lambda net, x: net(x / 2, scale=2.0))
    assert consumed == [0, 1]  # the third batch is not even drawn
    assert_close(model.bn.running_mean, want[0], **F32, name="forward=")


def test_keras_style_axis_frozen_and_unreached_layers():
    keras_bn = batchnorm.BatchNormalization(axis=-1)
    never = nn.BatchNorm1d(5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = freeze_batchnorm(nn.BatchNorm2d(3))
            self.no_stats = nn.BatchNorm2d(3, track_running_stats=False)
            self.keras = keras_bn
            self.never = never

        def forward(self, x):
            return self.keras(self.no_stats(self.frozen(x)).permute(0, 2, 3, 1))

    model = Net()
    model(batches([2])[0])  # the lazy Keras-style layer learns its size
    frozen_before = bn_state(model.frozen)
    data = batches([5, 3], seed=2)
    with pytest.warns(UserWarning, match="never reached.*: never"):
        recalibrate_batchnorm(model, data)
    x = torch.cat([model.no_stats(model.frozen(d)).permute(0, 2, 3, 1) for d in data])
    flat = x.detach().double().reshape(-1, 3)
    assert_close(keras_bn.running_mean, flat.mean(0), **F32, name="keras mean")
    assert_close(keras_bn.running_var, flat.var(0), **F32, name="keras var")
    assert all(torch.equal(bn_state(model.frozen)[k], v) for k, v in frozen_before.items())
    assert torch.equal(never.running_mean, torch.zeros(5))


def test_bad_input_changes_nothing():
    model = make("sequential")
    before = bn_state(model)

    def check_unchanged():
        assert all(torch.equal(bn_state(model)[k], v) for k, v in before.items())
        assert all(m.training for m in model.modules())

    with pytest.raises(ValueError, match="the loader yielded no batches"):
        recalibrate_batchnorm(model, [])
    check_unchanged()

    def failing():
        yield batches([4])[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        recalibrate_batchnorm(model, failing())
    check_unchanged()
    with pytest.raises(TypeError, match="yielded a str"):
        recalibrate_batchnorm(model, ["not a batch"])
    check_unchanged()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_batches must be a positive int"):
            recalibrate_batchnorm(model, batches([4]), bad)
    with pytest.raises(TypeError, match="loader must be an iterable"):
        recalibrate_batchnorm(model, batches([4])[0])
    with pytest.raises(ValueError, match="other_modules must be"):
        recalibrate_batchnorm(model, batches([4]), other_modules="off")
    with pytest.raises(ValueError, match="has no batch-norm layer"):
        recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="no batch-norm layer with running statistics"):
        recalibrate_batchnorm(freeze_batchnorm(nn.BatchNorm1d(2)), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="is lazy and not initialised"):
        recalibrate_batchnorm(nn.LazyBatchNorm1d(), [torch.randn(2, 2)])
    check_unchanged()


# ---------------------------------------------------------------- two gloo ranks

RANK_DATA = {0: ([5, 3], 10), 1: ([4], 20)}  # batch sizes and seed per rank


def _outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as error:  # the test compares what each rank raised
        return f"{type(error).__name__}: {error}"


def _world_worker(rank, world):
    sizes, seed = RANK_DATA[rank]
    model = make("resnet").double()
    data = [x.double() for x in batches(sizes, seed=seed, size=5)]
    recalibrate_batchnorm(model, data)
    out = {"state": bn_state(model)}
    lonely = make("sequential")
    out["one rank empty"] = _outcome(
        lambda: recalibrate_batchnorm(lonely, batches([4]) if rank == 0 else []))
    out["lonely state"] = bn_state(lonely)
    out["all empty"] = _outcome(lambda: recalibrate_batchnorm(make("sequential"), []))

    def failing():
        if rank == 1:
            raise OSError("rank 1 lost its data")
        yield batches([4])[0]

    out["one rank fails"] = _outcome(lambda: recalibrate_batchnorm(make("sequential"),
                                                                   failing()))
    other = make("sequential") if rank == 0 else make("resnet")
    out["different models"] = _outcome(lambda: recalibrate_batchnorm(other, batches([4])))
    return out


def test_two_gloo_ranks_agree_on_the_statistics_of_all_their_data(tmp_path):
    r0, r1 = run_world(2, _world_worker, tmp=tmp_path)
    assert "raised" not in r0 and "raised" not in r1, (r0.get("traceback"),
                                                          r1.get("traceback"))
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # bit-identical on both ranks
    model = make("resnet").double()
    everything = [x.double() for r in (0, 1)
                  for x in batches(RANK_DATA[r][0], seed=RANK_DATA[r][1], size=5)]
    want = population(model, everything)
    recalibrate_batchnorm(model, everything)
    check_against(model, want, F64)
    for k, v in bn_state(model).items():
        assert_close(r0["state"][k], v, **F64, name=k)

    assert r0["one rank empty"] == r1["one rank empty"] == "ok"
    lonely = make("sequential")
    recalibrate_batchnorm(lonely, batches([4]))
    for k, v in bn_state(lonely).items():
        assert_close(r1["lonely state"][k], v, **F32, name=k)
    assert r0["all empty"] == r1["all empty"]
    assert "loader yielded no batches on any rank" in r0["all empty"]
    assert r1["one rank fails"] == "OSError: rank 1 lost its data"
    assert r0["one rank fails"].startswith("RuntimeError") and "rank(s) [1]" in \
        r0["one rank fails"]
    assert r0["different models"] == r1["different models"]
    assert "the ranks hold different models" in r0["different models"]
