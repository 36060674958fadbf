"""doctor(): each planted pitfall found at its path, silence on clean models, nothing changed."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.tools import doctor
from batchnorm.tools.doctor import CHECKS, Report

GRAPHS = ["fx", "runtime"]


# ------------------------------------------------------------------ models ---

class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, + shortcut, ReLU (in place, as torchvision)."""

    def __init__(self, cin, cout, stride=1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, classes=10, **block):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.layer1 = Block(8, 8, **block)
        self.layer2 = Block(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class OursResNetLike(nn.Module):
    """Our BN with the fused ReLU and the fused residual add."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = batchnorm.BatchNorm2d(8, activation="relu")
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(8, activation="relu")
        self.bn_after_relu = batchnorm.BatchNorm2d(8)  # BN after a fused ReLU: fine
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(8, activation="relu")
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn0(self.conv0(x))
        y = self.bn_after_relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y), residual=x)  # relu(bn(conv(y)) + x)
        return self.fc(y.mean((2, 3)))


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # bias=True before BN: BN001
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.bn(self.conv(x)).relu()
        return self.fc(x.mean((2, 3)))


def trained(model, steps=20, batch=32, shape=(3, 16, 16), seed=0):
    """``model`` with running statistics from a few training-mode passes, in eval mode.

    ``momentum=None`` (a cumulative average) during the passes, so the statistics
    have converged: after 20 steps of momentum 0.1 the initial variance 1 would
    still weigh 12 %."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch, *shape, generator=gen))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def codes_paths(report):
    return sorted((f.code, f.path) for f in report)


def state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: m.training for name, m in model.named_modules()},
            [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()])


def assert_unchanged(model, before):
    values, modes, ids = before
    after_values, after_modes, after_ids = state(model)
    assert after_values.keys() == values.keys()
    for key in values:
        assert torch.equal(after_values[key], values[key]), key  # bit for bit, NaN-free here
    assert after_modes == modes and after_ids == ids


# ------------------------------------------------------------ clean models ---

@pytest.mark.parametrize("graph", GRAPHS)
def test_clean_resnet_like_has_no_findings(graph):
    torch.manual_seed(0)
    model = ResNetLike()
    report = doctor(model, torch.randn(16, 3, 16, 16), graph=graph)
    assert len(report) == 0, str(report)
    assert report.ok and report.bn_layers == 6 and report.graph == graph and report.mode == "train"
    # Trained statistics, evaluated on the same kind of data: still silent, even for one sample.
    trained(model)
    for batch in (1, 16):
        report = doctor(model, torch.randn(batch, 3, 16, 16), mode="eval", graph=graph)
        assert len(report) == 0, str(report)


@pytest.mark.parametrize("graph", GRAPHS)
def test_clean_model_of_our_fused_layers_has_no_findings(graph):
    torch.manual_seed(0)
    report = doctor(OursResNetLike(), torch.randn(16, 3, 8, 8), graph=graph)
    assert len(report) == 0, str(report)


def test_frozen_batchnorm_counts_as_a_bn_layer_and_is_not_stale_by_default():
    model = trained(ResNetLike())
    frozen = batchnorm.convert_frozen_batchnorm(copy.deepcopy(model))
    report = doctor(frozen, torch.randn(8, 3, 16, 16), mode="eval")
    assert report.bn_layers == 6 and len(report) == 0, str(report)


# --------------------------------------------------------------- placement ---

class Planted(nn.Module):
    """One of each placement pitfall, reached through a custom forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # bias -> bn1: BN001
        self.bn1 = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.bn2 = nn.BatchNorm2d(8)  # after GroupNorm: BN002
        self.drop = nn.Dropout(0.3)
        self.bn3 = nn.BatchNorm2d(8)  # after dropout: BN004 (at "drop")
        self.fc = nn.Linear(8, 4)
        self.bn_out = nn.BatchNorm1d(4)  # then softmax: BN003; fc's bias: BN001

    def forward(self, x):
        x = F.relu(self.bn1(self.conv(x)))
        x = F.relu(self.bn2(self.gn(x)))
        x = self.bn3(self.drop(x))
        x = self.fc(x.mean((2, 3)))
        return F.softmax(self.bn_out(x), dim=1)


PLANTED = [("BN001", "conv"), ("BN001", "fc"), ("BN002", "bn2"), ("BN003", "bn_out"),
           ("BN004", "drop")]


@pytest.mark.parametrize("graph", GRAPHS)
def test_each_placement_pitfall_is_found_at_its_path(graph):
    torch.manual_seed(0)
    report = doctor(Planted(), torch.randn(16, 3, 8, 8), graph=graph)
    assert codes_paths(report) == PLANTED, str(report)
    assert all(f.severity == "warning" and f.evidence == graph for f in report)
    assert {f.confidence for f in report} == {"high" if graph == "fx" else "medium"}
    bias = next(f for f in report if f.path == "conv")
    assert bias.layers == ("conv", "bn1") and "bn1" in bias.message
    assert report.by_code("BN004")[0].details == {"bn": "bn3", "p": 0.3}


class NotBeforeBN(nn.Module):
    """Look-alikes that must stay silent."""

    def __init__(self):
        super().__init__()
        self.conv_res = nn.Conv2d(8, 8, 3, padding=1)  # reaches bn_res only through an add
        self.bn_res = nn.BatchNorm2d(8)
        self.conv_fan = nn.Conv2d(8, 8, 3, padding=1)  # also used outside the BN
        self.bn_fan = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.conv_ln = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_ln = nn.BatchNorm2d(8)  # LayerNorm -> conv -> BN: not "BN after norm"
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 8, bias=False)
        self.bn_fc = nn.BatchNorm1d(8)  # dropout -> linear -> BN: not "dropout before BN"

    def forward(self, x):
        x = self.bn_res(self.conv_res(x) + x)
        a = self.conv_fan(x)
        x = self.bn_fan(a) + a
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.bn_ln(self.conv_ln(x))
        x = self.bn_fc(self.fc(self.drop(x.mean((2, 3)))))
        return F.relu(x)  # BN -> ReLU -> output: not "BN before output"


@pytest.mark.parametrize("graph", GRAPHS)
def test_look_alikes_are_not_reported(graph):
    torch.manual_seed(0)
    report = doctor(NotBeforeBN(), torch.randn(16, 8, 6, 6), graph=graph)
    assert len(report) == 0, str(report)


class FeatureHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return y, x  # several outputs: a feature extractor, not a classifier


class InplaceAfterBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x  # the output is bn + x, not bn
        return out


@pytest.mark.parametrize("graph", GRAPHS)
def test_bn_before_output_only_for_a_single_bn_output(graph):
    torch.manual_seed(0)
    assert len(doctor(FeatureHead(), torch.randn(16, 8), graph=graph)) == 0
    assert len(doctor(InplaceAfterBN(), torch.randn(16, 4, 5, 5), graph=graph)) == 0
    direct = nn.Sequential(nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4), nn.Flatten())
    report = doctor(direct, torch.randn(16, 8), graph=graph)
    assert codes_paths(report) == [("BN003", "1")]
    assert "model's output" in report.findings[0].message
    assert codes_paths(doctor(direct, torch.randn(16, 8), graph=graph, ignore=["BN003"])) == []


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(F.dropout(x, p=0.2, training=self.training)).sum(1)


@pytest.mark.parametrize("graph", GRAPHS)
def test_functional_dropout_and_norm_before_bn(graph):
    torch.manual_seed(0)
    report = doctor(FunctionalDropout(), torch.randn(16, 6), graph=graph)
    assert codes_paths(report) == [("BN004", "bn")] and "p=0.2" in report.findings[0].message
    layer_norm_then_bn = nn.Sequential(nn.LayerNorm(6), nn.BatchNorm1d(6), nn.ReLU())
    report = doctor(layer_norm_then_bn, torch.randn(16, 6), graph=graph)
    assert codes_paths(report) == [("BN002", "1")] and "LayerNorm" in report.findings[0].message


def test_untraceable_model_falls_back_to_the_run_and_says_so():
    torch.manual_seed(0)
    report = doctor(DataDependent(), torch.randn(16, 3, 8, 8))
    assert report.graph == "runtime"
    assert codes_paths(report) == [("BN001", "conv")]
    assert report.findings[0].confidence == "medium"
    assert len(report.notes) == 1 and "torch.fx could not trace" in report.notes[0]
    assert "note: torch.fx could not trace" in str(report)
    with pytest.raises(ValueError, match="torch.fx cannot trace the model"):
        doctor(DataDependent(), torch.randn(16, 3, 8, 8), graph="fx")


# ---------------------------------------------------------- batch and input ---

def pooled_head():
    """BN1d after global pooling: one value per channel per sample."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8, bias=False),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_one_value_per_channel_in_training_is_an_error_and_the_run_goes_on():
    model = pooled_head()
    before = state(model)
    report = doctor(model, torch.randn(1, 3, 8, 8), ignore=["BN006"])
    assert codes_paths(report) == [("BN005", "6")] and not report.ok
    assert "(1, 8)" in report.errors[0].message and "eval mode to go on" in report.errors[0].message
    assert_unchanged(model, before)
    # The example is fine, the training batch is not.
    report = doctor(model, torch.randn(4, 3, 8, 8), per_device_batch=1, ignore=["BN006"])
    assert codes_paths(report) == [("BN005", "6")]
    assert "per_device_batch=1" in report.errors[0].message
    # Evaluation uses the running statistics: a batch of one is fine there.
    trained(model, shape=(3, 8, 8))
    assert len(doctor(model, torch.randn(1, 3, 8, 8), mode="eval")) == 0


def test_one_value_without_running_statistics_stops_the_run_with_a_note():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.ReLU(), nn.Linear(4, 2))
    report = doctor(model, torch.randn(1, 4), ignore=["BN006"])
    assert codes_paths(report) == [("BN005", "1")]
    assert report.notes and "the run stopped at 1" in report.notes[0]


def test_small_per_device_batch():
    model = pooled_head()
    report = doctor(model, torch.randn(4, 3, 8, 8))
    assert codes_paths(report) == [("BN006", "")]
    finding = report.warnings[0]
    assert finding.layers == ("1", "6") and finding.details == {"batch": 4, "min_batch": 8}
    assert codes_paths(doctor(model, torch.randn(16, 3, 8, 8), per_device_batch=2)) == \
        [("BN006", "")]
    assert len(doctor(model, torch.randn(2, 3, 8, 8), per_device_batch=32)) == 0
    assert len(doctor(model, torch.randn(4, 3, 8, 8), min_batch=4)) == 0
    assert len(doctor(model.eval(), torch.randn(4, 3, 8, 8), mode="eval",
                      ignore=["BN008"])) == 0  # evaluation: the batch size does not matter


@pytest.mark.parametrize("make", [
    lambda: batchnorm.BatchRenorm2d(8),
    lambda: batchnorm.SyncBatchNorm(8),
    lambda: batchnorm.BatchNorm2d(8, virtual_batch_size=2),
], ids=["renorm", "sync", "ghost"])
def test_small_batch_is_not_reported_for_the_layers_made_for_it(make):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), make(), nn.ReLU())
    assert len(doctor(model, torch.randn(4, 3, 8, 8))) == 0


@pytest.mark.parametrize("graph", GRAPHS)
def test_unnormalized_input(graph):
    torch.manual_seed(0)
    model = ResNetLike()
    pixels = torch.randint(0, 256, (16, 3, 16, 16)).float()
    report = doctor(model, pixels, graph=graph)
    assert codes_paths(report) == [("BN007", "stem.0")]
    finding = report.warnings[0]
    assert "3 of 3 channel(s)" in finding.message and len(finding.details["mean"]) == 3
    assert abs(finding.details["mean"][0] - pixels[:, 0].mean().item()) < 1e-3
    for fine in (torch.randn(16, 3, 16, 16), torch.rand(16, 3, 16, 16)):  # [0, 1] is fine
        assert len(doctor(model, fine, graph=graph)) == 0
    tiny = torch.randn(16, 3, 16, 16) * 1e-3
    assert codes_paths(doctor(model, tiny, graph=graph)) == [("BN007", "stem.0")]


class SelfNormalizing(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ResNetLike()

    def forward(self, x):
        return self.body((x - 127.5) / 64.0)


@pytest.mark.parametrize("graph", GRAPHS)
def test_input_normalized_by_the_model_itself_or_by_a_bn_is_fine(graph):
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (16, 3, 16, 16)).float()
    assert len(doctor(SelfNormalizing(), pixels, graph=graph)) == 0
    input_bn = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2))
    assert len(doctor(input_bn, torch.randn(16, 5) * 300 + 1000, graph=graph)) == 0


# ------------------------------------------------------------ state, modes ---

def test_never_updated_statistics_at_evaluation():
    model = ResNetLike().eval()
    report = doctor(model, torch.randn(8, 3, 16, 16))
    found = report.by_code("BN008")
    assert [f.path for f in found] == ["stem.1", "layer1.bn1", "layer1.bn2", "layer2.bn1",
                                       "layer2.bn2", "layer2.down.1"]
    assert all(f.severity == "error" for f in found) and codes_paths(report) == \
        sorted(("BN008", f.path) for f in found)
    # Training from scratch is not a problem; trained statistics are not either.
    assert len(doctor(ResNetLike(), torch.randn(8, 3, 16, 16))) == 0
    assert len(doctor(trained(ResNetLike()), torch.randn(8, 3, 16, 16))) == 0


def test_non_finite_and_negative_statistics():
    model = trained(ResNetLike())
    model.layer1.bn2.running_var[3] = float("nan")
    model.layer2.bn1.running_var[0] = -1.0
    model.layer2.bn2.weight.data[2] = float("inf")
    report = doctor(model, torch.randn(8, 3, 16, 16))
    # NaN downstream of these layers is their consequence, not stale statistics.
    assert codes_paths(report) == [("BN009", "layer1.bn2"), ("BN009", "layer2.bn1"),
                                   ("BN009", "layer2.bn2")]
    messages = {f.path: f.message for f in report}
    assert "running_var has 1 non-finite" in messages["layer1.bn2"]
    assert "running_var has 1 negative" in messages["layer2.bn1"]
    assert "weight has 1 non-finite" in messages["layer2.bn2"]


def test_stale_statistics():
    model = trained(ResNetLike())
    report = doctor(model, torch.randn(8, 3, 16, 16) * 20 + 5, ignore=["BN007"])
    stale = report.by_code("BN010")
    assert stale and stale[0].path == "stem.1" and stale[0].details["rms"] > 3
    assert {f.code for f in report} == {"BN010"}
    # In training the running statistics are not used: nothing to say.
    assert "BN010" not in doctor(model.train(), torch.randn(8, 3, 16, 16) * 20 + 5).codes()


def test_train_mode_at_evaluation():
    model = trained(ResNetLike()).train()
    report = doctor(model, torch.randn(8, 3, 16, 16), mode="eval")
    assert codes_paths(report) == [("BN011", "")]
    error = report.errors[0]
    assert len(error.layers) == 6 and "model.training is True" in error.message
    model.eval()
    model.layer1.bn2.train()  # one layer switched back by hand
    assert codes_paths(doctor(model, torch.randn(8, 3, 16, 16), mode="eval")) == \
        [("BN011", "layer1.bn2")]
    assert len(doctor(model.eval(), torch.randn(8, 3, 16, 16), mode="eval")) == 0


def test_eval_mode_when_training_is_intended():
    model = trained(ResNetLike())
    report = doctor(model, torch.randn(8, 3, 16, 16), mode="train")
    assert codes_paths(report) == [("BN012", "")]
    assert len(doctor(model.train(), torch.randn(8, 3, 16, 16), mode="train")) == 0


def test_no_running_statistics_at_evaluation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    assert codes_paths(doctor(model, torch.randn(8, 3, 6, 6))) == [("BN013", "1")]


def test_weight_decay_on_gamma_and_beta():
    model = ResNetLike()
    naive = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    report = doctor(model, torch.randn(8, 3, 16, 16), optimizer=naive)
    assert codes_paths(report) == [("BN014", "")]
    finding = report.warnings[0]
    assert len(finding.layers) == 6 and finding.details["weight_decay"] == 1e-4
    assert len(finding.details["parameters"]) == 12 and "stem.1.weight" in \
        finding.details["parameters"]
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    split = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}])
    assert len(doctor(model, torch.randn(8, 3, 16, 16), optimizer=split)) == 0
    assert len(doctor(model, torch.randn(8, 3, 16, 16),
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))) == 0


def test_a_model_without_batch_norm_gets_one_note():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    report = doctor(model, torch.randn(4, 3, 8, 8))
    assert codes_paths(report) == [("BN000", "")] and report.ok and report.bn_layers == 0
    assert "no batch-norm layers" in str(report)


# ------------------------------------------------------- nothing is changed ---

@pytest.mark.parametrize("setup", ["train", "eval", "one-value", "runtime", "fails"])
def test_the_model_and_the_random_state_are_unchanged(setup):
    model = pooled_head()
    model.append(nn.Dropout(0.5))  # consumes random numbers in training
    x = torch.randn(4, 3, 8, 8)
    kwargs = {}
    if setup == "eval":
        trained(model, shape=(3, 8, 8))
    elif setup == "one-value":
        x = x[:1]
    elif setup == "runtime":
        kwargs["graph"] = "runtime"
    elif setup == "fails":
        x = torch.randn(4, 5, 8, 8)  # wrong channel count
    before = state(model)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    if setup == "fails":
        with pytest.raises(ValueError, match="the model failed on the example input"):
            doctor(model, x, **kwargs)
    else:
        doctor(model, x, **kwargs)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_is_checked_and_unchanged():
    torch.manual_seed(0)
    model = Planted().cuda()
    before = state(model)
    rng = torch.cuda.get_rng_state()
    report = doctor(model, torch.randn(16, 3, 8, 8, device="cuda"))
    assert codes_paths(report) == PLANTED
    assert_unchanged(model, before)
    assert torch.equal(torch.cuda.get_rng_state(), rng)


def test_lazy_modules_are_refused_untouched():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialized lazy modules"):
        doctor(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model[1], nn.LazyBatchNorm2d) and model[1].has_uninitialized_params()


# --------------------------------------------------------------- arguments ---

def test_bad_arguments_get_clear_errors():
    model, x = pooled_head(), torch.randn(8, 3, 8, 8)
    cases = [
        (TypeError, "model must be a torch.nn.Module", ("model", x), {}),
        (TypeError, "wrap a list of inputs in a tuple", (model, [x]), {}),
        (ValueError, "mode must be 'train', 'eval' or None", (model, x), {"mode": "test"}),
        (ValueError, "per_device_batch must be a positive int", (model, x),
         {"per_device_batch": 0}),
        (ValueError, "min_batch must be a positive int", (model, x), {"min_batch": 2.5}),
        (ValueError, "graph must be one of", (model, x), {"graph": "jit"}),
        (ValueError, "unknown check code", (model, x), {"ignore": ["BN999"]}),
        (TypeError, "optimizer must be a torch.optim.Optimizer", (model, x),
         {"optimizer": object()}),
    ]
    for error, message, args, kwargs in cases:
        with pytest.raises(error, match=message):
            doctor(*args, **kwargs)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, a, b=None):
        return self.bn(a).relu() + self.fc(b)


@pytest.mark.parametrize("graph", GRAPHS)
def test_tuple_and_dict_inputs(graph):
    torch.manual_seed(0)
    a, b = torch.randn(16, 3), torch.randn(16, 3) * 500
    report = doctor(TwoInputs(), (a, b), graph=graph)
    assert codes_paths(report) == [("BN007", "fc")] and "input 1 " in report.findings[0].message
    report = doctor(TwoInputs(), {"a": a, "b": b}, graph=graph)
    assert codes_paths(report) == [("BN007", "fc")] and "input 'b'" in report.findings[0].message


# ------------------------------------------------------------------ report ---

def test_report_text_and_json():
    report = doctor(Planted().train(), torch.randn(4, 3, 8, 8) * 100, mode="eval")
    assert isinstance(report, Report) and not report.ok
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["mode"] == "eval" and data["graph"] == "fx"
    assert data["counts"] == {"error": len(report.errors), "warning": len(report.warnings),
                              "info": 0}
    first = data["findings"][0]
    assert set(first) == {"code", "name", "severity", "path", "title", "message", "why", "fix",
                          "layers", "evidence", "confidence", "details"}
    assert [f["severity"] for f in data["findings"]] == \
        sorted((f["severity"] for f in data["findings"]), key=["error", "warning"].index)
    text = str(report)
    assert text.splitlines()[0].startswith(f"batchnorm doctor: {len(report.errors)} errors")
    for f in report:
        assert f.code in text and f.why == CHECKS[f.code].why
        assert f"{f.severity} {f.code} {CHECKS[f.code].title}" in text
    assert "fix: Call model.eval()" in text


def test_every_check_is_documented():
    names = [c.name for c in CHECKS.values()]
    assert len(set(names)) == len(names) == 15
    for code, check in CHECKS.items():
        assert check.code == code and check.severity in ("error", "warning", "info")
        assert check.why.endswith(".") and check.fix.endswith(".")
