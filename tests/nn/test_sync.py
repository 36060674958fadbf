"""SyncBatchNorm across processes (gloo on the CPU), and convert/revert.

Parity: each world of 2 or 4 worker processes runs many small scenarios in
one go (a module-scoped fixture; starting processes is the slow part), and
each test compares one scenario with ONE process running our ``BatchNorm`` on
the concatenated batch: outputs, input and residual gradients, weight/bias
gradients summed over the group, running statistics, ``num_batches_tracked``,
eval mode afterwards, and the collectives each call made.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_world
from helpers import TOL, assert_close, make_input, memory_format_for

import batchnorm
from batchnorm.nn.sync import merge_stats

REPO = Path(__file__).resolve().parents[2]


_COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "barrier",
                "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter",
                "all_gather_object", "send", "recv")


@contextmanager
def count_collectives():
    """Every ``torch.distributed`` collective called inside the block, by name."""
    calls, saved = [], {}
    for name in _COLLECTIVES:
        fn = saved[name] = getattr(dist, name)

        def wrapper(*a, _name=name, _fn=fn, **k):
            calls.append(_name)
            return _fn(*a, **k)

        setattr(dist, name, wrapper)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------- parity scenarios

def _spec(name, sizes, tail, dtype=torch.float32, channels_last=False, groups=None, **options):
    return dict(name=name, sizes=sizes, tail=tail, dtype=dtype, channels_last=channels_last,
                groups=groups or [list(range(len(sizes)))], options=options)


WORLD2 = [
    _spec("equal-4d", [3, 3], (3, 2, 3)),
    _spec("unequal-2d-single-sample", [1, 4], (5,)),
    _spec("empty-rank0-3d", [0, 5], (3, 4)),
    _spec("empty-rank1-2d", [4, 0], (2,)),
    _spec("both-ranks-empty", [0, 0], (3, 2, 2)),
    _spec("leaky-relu-residual", [2, 3], (4, 3, 3), activation="leaky_relu",
          negative_slope=0.2, residual=True),
    _spec("silu-residual-channels-last-3d", [2, 1], (3, 2, 2, 3), channels_last=True,
          activation="silu", residual=True),
    _spec("bfloat16-channels-last-relu", [2, 3], (4, 3, 3), dtype=torch.bfloat16,
          channels_last=True, activation="relu", residual=True),
    _spec("float16", [3, 2], (3, 5), dtype=torch.float16),
    _spec("float64-gelu", [2, 3], (3, 4, 2), dtype=torch.float64, activation="gelu"),
    _spec("no-affine-cumulative", [2, 3], (3, 4), affine=False, momentum=None),
    _spec("no-running-stats", [3, 2], (3, 4), track_running_stats=False),
    _spec("groups-of-one", [2, 3], (3, 4), groups=[[0], [1]]),
]

WORLD4 = [
    _spec("equal-4d", [2, 2, 2, 2], (3, 2, 2)),
    _spec("unequal-and-empty", [3, 0, 1, 2], (4, 3), activation="relu", residual=True),
    _spec("one-rank-has-data", [0, 0, 4, 0], (3,)),
    _spec("bfloat16-channels-last", [1, 2, 1, 2], (3, 2, 2), dtype=torch.bfloat16,
          channels_last=True),
    _spec("sub-groups", [2, 3, 1, 2], (3, 2, 2), groups=[[0, 1], [2, 3]]),
]

STEPS = (True, True, False)  # train, train, eval


def _module_options(spec):
    o = spec["options"]
    return dict(momentum=o.get("momentum", 0.1), affine=o.get("affine", True),
                track_running_stats=o.get("track_running_stats", True),
                activation=o.get("activation"), negative_slope=o.get("negative_slope", 0.01))


def _init_params(m, C):
    if m.weight is not None:
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, C))
            m.bias.copy_(torch.linspace(-0.2, 0.2, C))


def _data(spec, step):
    """The global batch of one step: ``(x, dy, residual or None)``, every rank's rows."""
    shape = (sum(spec["sizes"]), *spec["tail"])
    fmt = memory_format_for(len(shape), spec["channels_last"])
    dtype = spec["dtype"]
    x = make_input(shape, dtype, fmt, seed=step, scale=2.0, offset=3.0 + step)
    dy = make_input(shape, dtype, fmt, seed=100 + step)
    res = make_input(shape, dtype, fmt, seed=200 + step) if spec["options"].get("residual") \
        else None
    return x, dy, res


def _rows(spec, ranks):
    """Slices of the global batch held by ``ranks``, in that order."""
    starts = [sum(spec["sizes"][:r]) for r in range(len(spec["sizes"]))]
    return [slice(starts[r], starts[r] + spec["sizes"][r]) for r in ranks]


def _parity_worker(rank, world, specs):
    results = {}
    for spec in specs:
        # new_group is collective: every rank creates every group, in order.
        groups = [dist.new_group(g) if len(g) < world else None for g in spec["groups"]]
        members = next(g for g in spec["groups"] if rank in g)
        group = groups[spec["groups"].index(members)]
        try:
            results[spec["name"]] = _parity_steps(spec, rank, group)
        except Exception:  # one scenario failing must not hide the others
            results[spec["name"]] = {"raised": traceback.format_exc()}
    return results


def _parity_steps(spec, rank, group):
    C = spec["tail"][0]
    param_dtype = torch.float64 if spec["dtype"] == torch.float64 else torch.float32
    m = batchnorm.SyncBatchNorm(C, process_group=group, dtype=param_dtype,
                                **_module_options(spec))
    _init_params(m, C)
    (mine,) = _rows(spec, [rank])
    steps = []
    for training in STEPS:
        m.train(training)
        x, dy, res = _data(spec, len(steps))
        x = x[mine].clone().requires_grad_()
        res = None if res is None else res[mine].clone().requires_grad_()
        with count_collectives() as forward_calls:
            y = m(x, res)
        with count_collectives() as backward_calls:
            y.backward(dy[mine])
        step = dict(y=y.detach(), gx=x.grad, gres=None if res is None else res.grad,
                    forward_calls=list(forward_calls), backward_calls=list(backward_calls),
                    channels_last=y.is_contiguous(memory_format=memory_format_for(
                        y.dim(), spec["channels_last"])))
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is not None:
                g = p.grad.clone()
                dist.all_reduce(g, group=group)
                step[f"g{name}"] = g
                p.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(m, name)
            step[name] = None if t is None else t.clone()
        steps.append(step)
    return steps


def _reference(spec, ranks):
    """ONE process, our BatchNorm, the concatenated batch of ``ranks``."""
    C = spec["tail"][0]
    param_dtype = torch.float64 if spec["dtype"] == torch.float64 else torch.float32
    m = batchnorm.BatchNorm(C, dtype=param_dtype, **_module_options(spec))
    _init_params(m, C)
    rows = _rows(spec, ranks)
    steps = []
    for step, training in enumerate(STEPS):
        m.train(training)
        x, dy, res = _data(spec, step)
        cat = lambda t: torch.cat([t[r] for r in rows])  # noqa: E731
        x = cat(x).requires_grad_()
        res = None if res is None else cat(res).requires_grad_()
        y = m(x, res)
        y.backward(cat(dy))
        out = dict(y=y.detach(), gx=x.grad, gres=None if res is None else res.grad)
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is not None:
                out[f"g{name}"] = p.grad.clone()
                p.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(m, name)
            out[name] = None if t is None else t.clone()
        steps.append(out)
    return steps


def _check_parity(spec, results):
    dtype = spec["dtype"]
    rtol, atol = TOL[dtype]
    stats_tol = (rtol, atol) if dtype in (torch.float32, torch.float64) else (1e-4, 1e-4)
    for members in spec["groups"]:
        want = _reference(spec, members)
        got = [results[r][spec["name"]] for r in members]
        for r, g in zip(members, got, strict=True):
            assert isinstance(g, list), f"rank {r} raised:\n{g['raised']}"
        synced = len(members) > 1
        track = spec["options"].get("track_running_stats", True)
        for step, training in enumerate(STEPS):
            where = f"{spec['name']} ranks {members} step {step}"
            w = want[step]
            mine = [g[step] for g in got]
            # Eval without running statistics uses each rank's own batch, as torch.
            local = [_reference(spec, [r])[step] for r in members] \
                if not (training or track) else [w]
            for key in ("y", "gx", "gres"):
                if w[key] is None:
                    continue
                expected = torch.cat([e[key] for e in local])
                scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
                assert_close(torch.cat([s[key] for s in mine]), expected, rtol, atol * scale,
                             name=f"{where} {key}")
            for s, r in zip(mine, members, strict=True):
                assert s["y"].dtype == dtype
                assert s["channels_last"], f"{where}: rank {r} lost the memory format"
                for key in ("gweight", "gbias"):
                    if key in w:
                        expected = sum(e[key] for e in local)
                        scale = max(1.0, expected.abs().max().item())
                        assert_close(s[key], expected, rtol, atol * scale, name=f"{where} {key}")
                for key in ("running_mean", "running_var"):
                    if w[key] is None:
                        assert s[key] is None
                        continue
                    assert_close(s[key], w[key], *stats_tol, name=f"{where} {key}")
                    # Every rank merged the same rows in the same order.
                    assert torch.equal(s[key], mine[0][key]), f"{where}: {key} differs by rank"
                if w["num_batches_tracked"] is not None:
                    assert s["num_batches_tracked"].item() == w["num_batches_tracked"].item()
                # One all-gather per training forward (plus the one-time
                # num_features check on the first), one all-reduce per backward.
                forward = (["all_gather"] * (2 if step == 0 else 1)) if training and synced \
                    else []
                backward = ["all_reduce"] if training and synced else []
                assert s["forward_calls"] == forward, f"{where}: rank {r} forward collectives"
                assert s["backward_calls"] == backward, f"{where}: rank {r} backward collectives"


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_world(2, _parity_worker, WORLD2, tmp=tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_world(4, _parity_worker, WORLD4, tmp=tmp_path_factory.mktemp("world4"))


@pytest.mark.parametrize("spec", WORLD2, ids=[s["name"] for s in WORLD2])
def test_two_processes_match_one_process_on_the_whole_batch(world2, spec):
    _check_parity(spec, world2)


@pytest.mark.parametrize("spec", WORLD4, ids=[s["name"] for s in WORLD4])
def test_four_processes_match_one_process_on_the_whole_batch(world4, spec):
    _check_parity(spec, world4)


# ---------------------------------------------------------------- errors

def _errors_worker(rank, world):
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as error:
            out[name] = (type(error).__name__, str(error))

    m = batchnorm.SyncBatchNorm(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # Rank 1's input has the wrong channel count: it still joins the exchange.
    bad = torch.randn(2, 4 if rank == 1 else 3)
    attempt("bad_input", lambda: m(bad))
    # One value per channel over the whole group (rank 0: one sample, rank 1: none).
    single = torch.randn(1 if rank == 0 else 0, 3)
    attempt("single_value", lambda: m(single))
    out["unchanged"] = all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # The group is still in step: a good call works on both ranks.
    attempt("good_after", lambda: m(torch.randn(2, 3)))
    out["nbt"] = m.num_batches_tracked.item()
    y = m(torch.randn(3, 3, requires_grad=True))
    attempt("double_backward", lambda: torch.autograd.grad(
        y.sum(), [m.weight], create_graph=True)[0].sum().backward())
    # A NaN on rank 1 only: with check_finite every rank sees non-finite statistics.
    checked = batchnorm.SyncBatchNorm(3, check_finite=True)
    x = torch.randn(2, 3)
    if rank == 1:
        x[0, 2] = float("nan")
    attempt("nan_checked", lambda: checked(x))
    out["nan_unchanged"] = bool(checked.running_mean.eq(0).all()) and \
        checked.num_batches_tracked.item() == 0
    # Ranks built with different num_features.
    other = batchnorm.SyncBatchNorm(3 if rank == 0 else 5)
    attempt("mismatched_num_features", lambda: other(torch.randn(2, other.num_features)))
    return out


@pytest.fixture(scope="module")
def errors2(tmp_path_factory):
    return run_world(2, _errors_worker, tmp=tmp_path_factory.mktemp("errors"))


def test_a_bad_input_on_one_rank_raises_on_every_rank(errors2):
    r0, r1 = errors2
    assert r1["bad_input"][0] in ("RuntimeError", "ValueError")
    assert "should contain 4 elements not 3" in r1["bad_input"][1]
    assert r0["bad_input"][0] == "RuntimeError"
    assert "group rank(s) [1] failed validation" in r0["bad_input"][1]
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["good_after"] is None and r1["good_after"] is None
    assert r0["nbt"] == r1["nbt"] == 1


def test_one_value_per_channel_over_the_group_raises_on_every_rank(errors2):
    for r in errors2:
        kind, message = r["single_value"]
        assert kind == "ValueError"
        assert "Expected more than 1 value per channel when training" in message
        assert "over the 2 ranks" in message


def test_mismatched_channel_counts_raise_on_every_rank(errors2):
    for r in errors2:
        kind, message = r["mismatched_num_features"]
        assert kind == "ValueError"
        assert "disagree on num_features" in message and "{0: 3, 1: 5}" in message


def test_check_finite_raises_on_every_rank_and_changes_nothing(errors2):
    for r in errors2:
        kind, message = r["nan_checked"]
        assert kind == "ValueError" and "channel(s) [2]" in message
        assert r["nan_unchanged"]


def test_double_backward_is_refused(errors2):
    for r in errors2:
        assert r["double_backward"][0] == "RuntimeError"
        assert "double backward" in r["double_backward"][1]


def _late_worker(rank, world, flag):
    if rank == 1:  # never arrives: waits (bounded) until rank 0 has given up
        deadline = time.monotonic() + 30
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {}
    start = time.monotonic()
    try:
        batchnorm.SyncBatchNorm(3)(torch.randn(4, 3))
        return {"raised": None}
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error),
                "seconds": time.monotonic() - start}
    finally:
        Path(flag).touch()


def test_a_rank_that_never_arrives_surfaces_as_a_timeout_error(tmp_path):
    r0, _ = run_world(2, _late_worker, str(tmp_path / "gave-up"), tmp=tmp_path, timeout_s=3)
    assert r0["raised"] == "RuntimeError"
    assert r0["message"].startswith("SyncBatchNorm: the collective")
    assert "Timed out" in r0["message"] or "timeout" in r0["message"].lower()
    assert r0["seconds"] < 20


def _dead_worker(rank, world):
    dist.barrier()  # the group is up on both ranks (else rank 0's init sees the death)
    if rank == 1:
        os._exit(0)  # dies without a word
    try:
        batchnorm.SyncBatchNorm(3)(torch.randn(4, 3))
        return {"raised": None}
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)}


def test_a_rank_that_dies_surfaces_as_a_clear_error(tmp_path):
    r0, r1 = run_world(2, _dead_worker, tmp=tmp_path, timeout_s=3)
    assert r1 is None
    assert r0["raised"] == "RuntimeError"
    assert r0["message"].startswith("SyncBatchNorm: the collective")


# ---------------------------------------------------------------- without processes

def test_without_a_process_group_it_is_plain_batch_norm():
    assert not dist.is_initialized()
    x = make_input((4, 3, 2, 2), seed=1, offset=2.0)
    dy = make_input((4, 3, 2, 2), seed=2)
    sync = batchnorm.SyncBatchNorm(3, activation="relu")
    plain = batchnorm.BatchNorm2d(3, activation="relu")
    for training in (True, False):
        outs = []
        for m in (sync, plain):
            m.train(training)
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            outs.append((y, xi.grad, m.weight.grad, m.running_mean, m.running_var))
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)


def test_input_rank_errors_are_torchs():
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        batchnorm.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        batchnorm.SyncBatchNorm(3)(torch.randn(2, 0))


def test_state_dict_matches_torch_sync_batchnorm_both_ways():
    ours = batchnorm.SyncBatchNorm(5, momentum=None, activation="silu")
    theirs = torch.nn.SyncBatchNorm(5, momentum=None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.weight.uniform_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k])
    assert "activation='silu'" in repr(ours)


def test_merge_stats_matches_the_whole_in_float64():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 6, generator=g, dtype=torch.float64) * 1e-3 + 1e4)
    for cuts in ([0, 40], [0, 0, 1, 40, 40], [0, 13, 14, 30, 40]):
        parts = [x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
        means = torch.stack([p.mean(0) if len(p) else torch.zeros(6, dtype=torch.float64)
                             for p in parts])
        m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else
                           torch.zeros(6, dtype=torch.float64) for p in parts])
        n, mean, m2 = merge_stats(counts, means, m2s)
        var, want_mean = torch.var_mean(x, 0, correction=0)
        assert n == 40
        assert_close(mean, want_mean, 1e-15, 0, name="mean")
        assert_close(m2 / n, var, 1e-8, 0, name="var")  # 1e4 offset, 1e-3 spread
    n, mean, m2 = merge_stats(torch.zeros(2, dtype=torch.float64),
                              torch.zeros(2, 3, dtype=torch.float64),
                              torch.zeros(2, 3, dtype=torch.float64))
    assert n == 0 and not mean.any() and not m2.any()


# ---------------------------------------------------------------- convert / revert

class _MyBatchNorm(torch.nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) * 2


def _zoo():
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({
        "t1": torch.nn.BatchNorm1d(3),
        "t2": torch.nn.BatchNorm2d(4, momentum=None),
        "t3": torch.nn.BatchNorm3d(2, affine=False),
        "o2": batchnorm.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2,
                                    backend="torch", eps=1e-3),
        "o1": batchnorm.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64),
        "any": batchnorm.BatchNorm(5, activation="relu"),
        "torch_sync": torch.nn.SyncBatchNorm(6),
        "inner": torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), batchnorm.BatchNorm2d(4)),
    })
    net["shared"] = net["inner"][1]
    net["t2"].weight.requires_grad_(False)
    net["o2"].eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                t = getattr(m, name)
                if t is not None:
                    t.uniform_(0.5, 1.5)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(7)
    return net


def test_convert_keeps_parameters_buffers_flags_and_options():
    net = _zoo()
    old = dict(net.named_modules())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    group = object()  # stored, not used without a process group
    net = batchnorm.convert_sync_batchnorm(net, process_group=group)
    for name, m in net.named_modules():
        if name in ("", "inner", "inner.0"):
            continue
        o = old[name]
        assert type(m) is batchnorm.SyncBatchNorm, name
        assert m.process_group is group
        for pname, p in o.named_parameters(recurse=False):
            assert getattr(m, pname) is p, f"{name}.{pname} is not the same Parameter"
        for bname, b in o.named_buffers(recurse=False):
            assert getattr(m, bname) is b, f"{name}.{bname} is not the same buffer"
        assert m.training == o.training
        assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (
            o.eps, o.momentum, o.affine, o.track_running_stats)
        assert m.activation == getattr(o, "activation", None)
    assert net["shared"] is net["inner"][1]
    assert net["o2"].negative_slope == 0.2 and net["o2"].backend == "torch"
    assert not net["t2"].weight.requires_grad
    assert net["o1"].running_mean is None and net["o1"].weight.dtype == torch.float64
    assert {k: v for k, v in net.state_dict().items()}.keys() == state.keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_convert_then_revert_gives_our_modules_back_and_the_same_outputs():
    net = _zoo()
    want = copy.deepcopy(net).eval()
    back = batchnorm.revert_sync_batchnorm(batchnorm.convert_sync_batchnorm(net)).eval()
    kinds = {name: type(m).__name__ for name, m in back.named_children()}
    assert kinds == {"t1": "BatchNorm1d", "t2": "BatchNorm2d", "t3": "BatchNorm3d",
                     "o2": "BatchNorm2d", "o1": "BatchNorm1d", "any": "BatchNorm",
                     "torch_sync": "BatchNorm", "inner": "Sequential", "shared": "BatchNorm2d"}
    assert all(type(m).__module__.startswith("batchnorm.") for name, m in back.named_modules()
               if name and name not in ("inner", "inner.0"))
    assert back["o2"].activation == "leaky_relu" and back["o2"].negative_slope == 0.2
    inputs = {"t1": (4, 3), "t2": (2, 4, 3, 3), "t3": (2, 2, 2, 2, 2), "o2": (2, 4, 3, 3),
              "any": (2, 5, 3), "torch_sync": (2, 6, 2, 2)}
    for name, shape in inputs.items():
        x = torch.randn(shape)
        assert_close(back[name](x), want[name](x), 1e-6, 1e-6, name=name)
    for k, v in want.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_convert_refuses_layers_it_does_not_understand():
    keras = batchnorm.BatchNormalization(axis=1)
    keras(torch.randn(2, 3, 2, 2))  # no longer lazy
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), _MyBatchNorm(3), keras,
                              batchnorm.BatchNorm2d(3, virtual_batch_size=2),
                              torch.nn.LazyBatchNorm2d())
    with pytest.raises(TypeError) as info:
        batchnorm.convert_sync_batchnorm(net)
    message = str(info.value)
    for part in ("1 is a test_sync._MyBatchNorm", "2 is a batchnorm.nn.keras_style."
                 "BatchNormalization", "3 uses ghost batches", "4 is lazy"):
        assert part in message
    assert type(net[0]) is torch.nn.BatchNorm2d  # nothing changed
    net = batchnorm.convert_sync_batchnorm(net, unknown="skip")
    assert [type(m).__name__ for m in net] == ["SyncBatchNorm", "_MyBatchNorm",
                                               "BatchNormalization", "BatchNorm2d",
                                               "LazyBatchNorm2d"]


def test_converting_a_single_layer_returns_the_new_layer():
    bn = batchnorm.BatchNorm3d(4)
    sync = batchnorm.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(sync) is batchnorm.SyncBatchNorm and sync.weight is bn.weight
    assert type(batchnorm.revert_sync_batchnorm(sync)) is batchnorm.BatchNorm3d


# ---------------------------------------------------------------- DDP under torchrun

DDP_SCRIPT = '''
"""A short DDP run of a small CNN with our SyncBatchNorm (and its 1-process reference)."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import batchnorm

STEPS, BATCH = 4, 8


def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False),
        batchnorm.BatchNorm2d(6, activation="relu"),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        batchnorm.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )


def train(model, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per = BATCH // world
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(BATCH, 3, 8, 8, generator=g) * 2 + 1
        target = torch.randint(0, 4, (BATCH,), generator=g)
        rows = slice(rank * per, (rank + 1) * per)
        loss = F.cross_entropy(model(x[rows]), target[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def main(out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(batchnorm.convert_sync_batchnorm(build_model()))
    losses = train(model, rank, world)
    dist.all_reduce(losses)
    if rank == 0:
        torch.save({"losses": losses / world, "state": model.module.state_dict()}, out)
    dist.barrier()  # rank 0 has written the result
    del model
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # gloo's C++ objects can abort the process while the interpreter shuts
    # down ("terminate called without an active exception"); the work is
    # done and saved, so leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_training_under_torchrun_matches_one_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "result.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate(timeout=10)
        pytest.fail(f"torchrun did not finish in 120 s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    got = torch.load(out)

    spec = importlib.util.spec_from_file_location("ddp_train", script)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    model = ref.build_model()
    losses = ref.train(model)
    assert_close(got["losses"], losses, 1e-5, 1e-6, name="losses")
    state = model.state_dict()
    assert got["state"].keys() == state.keys()
    for k, v in state.items():
        assert_close(got["state"][k], v, 1e-4, 1e-5, name=k)
