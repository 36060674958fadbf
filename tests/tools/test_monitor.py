"""ActivationMonitor: numbers against a direct computation, steps, selection, hooks, cost off."""

import pytest
import torch
from helpers import TOL, assert_close, make_input
from torch import nn

import batchnorm
from batchnorm.tools import ActivationMonitor, activation_stats
from batchnorm.tools import monitor as monitor_module

# float32 statistics against torch computed the same way: reductions may sum in a
# different order, so a little more than the float32 ulp.
RTOL, ATOL = 1e-5, 1e-6


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),   # "0"
        nn.ReLU(inplace=True),           # "1": in place, so hooks must see conv's output first
        nn.BatchNorm2d(4),               # "2"
        nn.Flatten(),                    # "3": not a default kind
        nn.Linear(4 * 6 * 6, 5),         # "4"
        nn.Sigmoid(),                    # "5"
    )


def expected_stats(t, percentiles=(15, 50, 85)):
    t = t.detach().float().reshape(-1)
    out = {"mean": t.mean(), "std": t.std(correction=0), "min": t.min(), "max": t.max(),
           "zero_fraction": (t == 0).double().mean()}
    for q in percentiles:
        out[f"p{q:g}"] = torch.quantile(t, q / 100)
    return out


def check_record(record, t, name, percentiles=(15, 50, 85)):
    for key, value in expected_stats(t, percentiles).items():
        assert_close(torch.tensor(record[key]), value, RTOL, ATOL, name=f"{name}.{key}")
    assert record["numel"] == t.numel()


def outputs_by_hand(model, x):
    """Each child's output of a Sequential, run by hand, cloned before in-place modules."""
    outs, h = {}, x
    for name, module in model.named_children():
        h = module(h.clone())
        outs[name] = h.clone()
    return outs


def test_statistics_match_direct_computation():
    model, x = small_cnn(), make_input((8, 1, 6, 6), seed=1)
    with ActivationMonitor(model) as mon:
        model(x)
        assert mon.layers == ["0", "1", "2", "4", "5"]
        with mon.paused():
            expected = outputs_by_hand(model, x)
    assert [r["layer"] for r in mon.records] == mon.layers
    for record in mon.records:
        assert record["step"] == 0 and record["call"] == 0
        check_record(record, expected[record["layer"]], record["layer"])
    conv, relu = mon.records[0], mon.records[1]
    assert conv["min"] < 0 < relu["zero_fraction"]  # conv recorded before the in-place ReLU
    assert relu["min"] == 0.0


def test_records_are_plain_numbers_and_gradients_unchanged():
    x = make_input((8, 1, 6, 6), seed=2)
    plain, watched = small_cnn(), small_cnn()
    plain(x).sum().backward()
    with ActivationMonitor(watched, channel_stats=True) as mon:
        watched(x).sum().backward()
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    for record in mon.records:
        for key, value in record.items():
            if key not in ("layer", "channel_mean", "channel_std"):
                assert isinstance(value, (int, float)), key


def test_custom_percentiles_and_channel_stats():
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    x = make_input((4, 2, 5, 5), seed=3)
    with ActivationMonitor(model, percentiles=(2.5, 99), channel_stats=True) as mon:
        model(x)
        with mon.paused():
            y = model(x)
    (record,) = mon.records
    check_record(record, y, "conv", percentiles=(2.5, 99))
    assert "p15" not in record and "p2.5" in record
    assert_close(torch.tensor(record["channel_mean"]), y.mean((0, 2, 3)), RTOL, ATOL, "cmean")
    assert_close(torch.tensor(record["channel_std"]), y.std((0, 2, 3), correction=0), RTOL,
                 ATOL, "cstd")


def test_low_precision_activation_in_float32():
    y = make_input((6, 3, 4), dtype=torch.bfloat16, seed=4)
    stats = activation_stats(y)
    for key, value in expected_stats(y).items():
        assert_close(torch.tensor(stats[key]), value, RTOL, ATOL, name=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_and_accelerator_quantiles_agree(dtype):
    sample = make_input((1001,), dtype=dtype, seed=16)
    q = [0.0, 0.15, 0.5, 0.85, 1.0]
    assert_close(monitor_module._quantiles(sample, q), monitor_module._torch_quantiles(sample, q),
                 *TOL[dtype], name="quantiles")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_records_match_cpu():
    y = make_input((32, 4, 9, 9), seed=17) - 0.5
    on_cpu = activation_stats(y.relu(), channel_stats=True)
    on_gpu = activation_stats(y.cuda().relu(), channel_stats=True)
    for key, value in on_cpu.items():
        assert_close(torch.tensor(on_gpu[key]), torch.tensor(value), RTOL, ATOL, key)


def test_every_k_records_steps_0_k_2k():
    model = small_cnn()
    x = make_input((4, 1, 6, 6), seed=5)
    with ActivationMonitor(model, ["4"], every=3) as mon:
        for _ in range(7):
            model(x)
    assert mon.step == 7
    steps, means = mon.history("4", "mean")
    assert steps == [0, 3, 6] and len(means) == 3
    assert [r["step"] for r in mon.to_rows()] == [0, 3, 6]


def test_input_of_sigmoid_is_what_the_paper_plots():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.Sigmoid())
    x = make_input((32, 6), seed=6)
    with ActivationMonitor(model, [nn.Sigmoid], what="input") as mon:
        model(x)
    (record,) = mon.records
    check_record(record, model[0](x), "sigmoid input")
    assert record["min"] < 0  # a sigmoid's output never is


def test_input_of_inplace_relu_seen_before_it_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(inplace=True))
    x = make_input((16, 6), seed=7)
    with ActivationMonitor(model, ["1"], what="input") as mon:
        model(x)
    check_record(mon.records[0], model[0](x), "relu input")


def test_layer_selection():
    model = small_cnn()
    x = make_input((2, 1, 6, 6), seed=8)

    def watched(layers):
        with ActivationMonitor(model, layers) as mon:
            model(x)
        assert sorted({r["layer"] for r in mon.records}) == sorted(mon.layers)
        return mon.layers

    assert watched(["4", "0"]) == ["0", "4"]  # named_modules order
    assert watched("3") == ["3"]
    assert watched([nn.ReLU, nn.Sigmoid]) == ["1", "5"]
    assert watched(nn.Conv2d) == ["0"]
    assert watched(["3", nn.BatchNorm2d]) == ["2", "3"]
    assert watched(lambda name, m: name in ("0", "5") or isinstance(m, nn.Flatten)) == [
        "0", "3", "5"]
    assert watched([""]) == [""]  # the model itself


def test_default_selection_covers_our_modules_and_frozen_bn():
    class FrozenBatchNorm2d(nn.Module):  # like torchvision's: not a _BatchNorm
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Conv2d(1, 2, 1), batchnorm.BatchNorm2d(2), FrozenBatchNorm2d(),
                          nn.GELU(), nn.MaxPool2d(2), nn.Dropout(), nn.Flatten(),
                          nn.Linear(2, 2), nn.Tanh(), nn.SiLU(), nn.LeakyReLU())
    mon = ActivationMonitor(model)
    assert mon.layers == ["0", "1", "2", "3", "7", "8", "9", "10"]
    mon.remove()


def test_unknown_names_error_lists_valid_ones():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['conv1', 'nope'\]") as err:
        ActivationMonitor(model, ["0", "nope", "conv1"])
    assert "'0'" in str(err.value) and "'5'" in str(err.value)
    assert all(not m._forward_pre_hooks for m in model.modules())  # nothing left behind
    with pytest.raises(TypeError, match="layers"):
        ActivationMonitor(model, [3])


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": 1.5}, {"what": "middle"},
                                    {"percentiles": (101,)}, {"percentiles": (50, 50.0)},
                                    {"max_samples": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ActivationMonitor(small_cnn(), **kwargs)


def test_disabled_and_paused_record_and_count_nothing():
    model, x = small_cnn(), make_input((2, 1, 6, 6), seed=9)
    with ActivationMonitor(model) as mon:
        mon.enabled = False
        model(x)
        assert mon.records == [] and mon.step == 0
        mon.enabled = True
        with mon.paused():
            model(x)
            assert not mon.enabled
        assert mon.enabled and mon.records == [] and mon.step == 0
        model(x)
        assert mon.step == 1 and len(mon.records) == 5


def hooks_left(model):
    return [(name, attr) for name, m in model.named_modules()
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                         "_backward_hooks", "_backward_pre_hooks")
            if getattr(m, attr)]


def test_remove_and_context_manager_leave_no_hooks():
    model, x = small_cnn(), make_input((2, 1, 6, 6), seed=10)
    for what in ("output", "input"):
        mon = ActivationMonitor(model, what=what)
        assert hooks_left(model)
        mon.remove()
        mon.remove()  # twice is fine
        assert hooks_left(model) == []
        model(x)
        assert mon.records == []
        with ActivationMonitor(model, what=what, channel_stats=True) as mon:
            model(x)
        assert hooks_left(model) == [] and len(mon.records) == 5


def test_eval_mode_skipped_unless_record_eval():
    model, x = small_cnn(), make_input((2, 1, 6, 6), seed=11)
    model.eval()
    with ActivationMonitor(model) as mon:
        model(x)
    assert mon.records == [] and mon.step == 0
    with ActivationMonitor(model, ["5"], record_eval=True) as mon:
        model(x)
    assert len(mon.records) == 1


def test_subsampling_is_deterministic_and_close(monkeypatch):
    g = torch.Generator().manual_seed(12)
    y = torch.randn(64, 8, 10, 10, generator=g) + torch.arange(8.0).view(1, 8, 1, 1)
    model = nn.Sequential(nn.Identity())
    with ActivationMonitor(model, ["0"], percentiles=(15, 50, 85), max_samples=5000) as mon:
        model(y)
        model(y)
    first, second = mon.records
    exact = expected_stats(y)
    for key in ("p15", "p50", "p85"):
        assert first[key] == second[key]  # deterministic
        assert first[key] != exact[key].item()  # really subsampled
        # an evenly spaced 5000 of 51200 is within ~2% of the spread of the exact value
        assert abs(first[key] - exact[key].item()) < 0.02 * exact["std"].item(), key
    for key in ("mean", "std", "min", "max"):  # exact over all elements
        assert_close(torch.tensor(first[key]), exact[key], RTOL, ATOL, key)
    # above torch.quantile's own limit the same subsampling applies, without error
    monkeypatch.setattr(monitor_module, "QUANTILE_MAX_ELEMENTS", 4096)
    capped = activation_stats(y)
    assert capped == activation_stats(y)
    assert abs(capped["p50"] - exact["p50"].item()) < 0.03 * exact["std"].item()


@pytest.mark.parametrize("period", [800, 100, 10])  # C*H*W, H*W, W
def test_subsample_does_not_alias_with_the_layout(period):
    # channel c holds the value c: a plain stride of C*H*W would see channel 0 only
    y = torch.arange(8.0).view(1, 8, 1, 1).expand(64, 8, 10, 10).contiguous()
    stats = activation_stats(y, (10, 50, 90), max_samples=y.numel() // period)
    assert stats["p10"] <= 1.0 and 3.0 <= stats["p50"] <= 4.0 and stats["p90"] >= 6.0


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_module_called_several_times_per_forward():
    torch.manual_seed(0)
    model, x = Twice(), make_input((8, 4), seed=13)
    with ActivationMonitor(model, ["fc"]) as mon:
        model(x)
        model(x)
    assert [(r["step"], r["call"]) for r in mon.records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = model.fc(x)
    check_record(mon.records[0], first, "call 0")
    check_record(mon.records[1], model.fc(torch.relu(first)), "call 1")
    assert mon.history("fc", "step", call=1)[0] == [0, 1]
    assert len(mon.history("fc", "mean")[1]) == 4


class TupleOut(nn.Module):
    def __init__(self, order):
        super().__init__()
        self.order = order

    def forward(self, x):
        index = torch.arange(x.shape[0])
        parts = {"float": x * 2, "index": index}
        return tuple(parts[k] for k in self.order)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = TupleOut(("float", "index"))
        self.b = TupleOut(("index", "float"))
        self.c = TupleOut(("index",))
        self.d = nn.Identity()

    def forward(self, x):
        return self.a(x), self.b(x), self.c(x), self.d(x.long())


def test_tuple_outputs_and_non_floating_tensors():
    model, x = Branches(), make_input((5, 3), seed=14)
    with ActivationMonitor(model, ["a", "b", "c", "d"]) as mon:
        model(x)
    assert [r["layer"] for r in mon.records] == ["a", "b"]  # c, d: integer only
    for record in mon.records:
        check_record(record, x * 2, record["layer"])
    with ActivationMonitor(model, ["d"], what="input") as mon:
        model(x)
    assert mon.records == []


def test_forward_that_raises_stops_recording():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    model, x = Boom(), torch.ones(3, 2)
    with ActivationMonitor(model) as mon:
        with pytest.raises(RuntimeError, match="boom"):
            model(x)
        assert len(mon.records) == 1
        model.fc(x)  # outside a model forward: not recorded
    assert len(mon.records) == 1


def test_history_clear_and_errors():
    model, x = small_cnn(), make_input((2, 1, 6, 6), seed=15)
    with ActivationMonitor(model, ["2"], channel_stats=True) as mon:
        model(x)
        steps, values = mon.history("2", "channel_mean")
        assert steps == [0] and len(values[0]) == 4
        with pytest.raises(ValueError, match="not watched"):
            mon.history("0", "mean")
        with pytest.raises(KeyError, match="p99"):
            mon.history("2", "p99")
        mon.clear()
        assert mon.records == [] and mon.history("2", "p50") == ([], [])
        model(x)
    assert mon.history("2", "p50")[0] == [1]
    assert "records=1" in repr(mon)


def test_empty_selection_warns():
    with pytest.warns(UserWarning, match="nothing will be recorded"):
        ActivationMonitor(nn.Sequential(nn.Flatten())).remove()
