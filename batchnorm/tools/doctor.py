"""Find the known batch-norm pitfalls in a model: :func:`doctor`.

The doctor runs the model once on an example input, with hooks, and inspects
its module tree, its data flow and its state. It reports each problem with
the layer's path, what is wrong, why it matters and the fix
(:mod:`batchnorm.tools._doctor_report` holds the catalog, ``BN000``-``BN014``).

**Placement** (BN001-BN004) follows the data flow, never the execution order
alone: a conv whose output reaches a BN only through a residual add is not
"right before" it. The graph comes from ``torch.fx`` when the model traces,
else from the run itself (:mod:`batchnorm.tools._doctor_graph`), and the
findings then say so with ``confidence="medium"``.

**Nothing changes.** Parameters, buffers (``running_mean``,
``num_batches_tracked``...), every module's train/eval flag and the random
number generators are restored after the run, which happens under
``torch.no_grad()``. A BN that would fail in training on one value per
channel runs that one call in eval mode, so the rest of the model is still
checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from . import _doctor_checks as checks
from ._doctor_checks import LayerCall, is_bn, is_frozen_bn
from ._doctor_graph import RuntimeRecorder, tensors_in, trace_fx
from ._doctor_report import CHECKS, Finding, Report

__all__ = ["CHECKS", "Finding", "Report", "doctor"]

_MODES = (None, "train", "eval")
_GRAPHS = ("auto", "fx", "runtime")


def doctor(model: nn.Module, example_input, *, mode: str | None = None, optimizer=None,
           per_device_batch: int | None = None, min_batch: int = 8, graph: str = "auto",
           ignore: Iterable[str] = ()) -> Report:
    """Check ``model`` for the known batch-norm pitfalls.

    Runs ``model`` once on ``example_input`` (restoring everything it could
    change, see the module docstring) and returns a :class:`Report`.

    Args:
        model: any ``nn.Module``; BN layers are torch's ``_BatchNorm`` subclasses
            (ours included) and FrozenBatchNorm modules.
        example_input: a tensor, a tuple of positional arguments, or a dict of
            keyword arguments for ``model``. Its statistics are checked (BN007)
            and its batch size is taken as the per-device training batch.
        mode: what the model is about to be used for: ``"train"`` or ``"eval"``.
            Default: ``None``, the model's own mode (``model.training``). Saying
            ``"eval"`` finds a model left in training mode (BN011).
        optimizer: a ``torch.optim.Optimizer`` (anything with ``param_groups``)
            to check for weight decay on BN's gamma and beta (BN014).
        per_device_batch: the training batch per device, when the example's is
            not (BN005, BN006). Default: ``None``.
        min_batch: per-device batch below which BN006 suggests an alternative.
            Default: ``8``.
        graph: where placement checks get the data flow: ``"auto"`` (torch.fx,
            else the run), ``"fx"`` (raise if the model does not trace) or
            ``"runtime"``. Default: ``"auto"``.
        ignore: codes to leave out, e.g. ``["BN003"]``.

    Returns:
        A :class:`Report`: ``.errors``, ``.warnings``, ``str()``, ``to_dict()``.

    Raises:
        TypeError: ``model`` is not a module, or an argument has the wrong type.
        ValueError: a bad argument, uninitialized lazy modules, or the model
            fails on ``example_input`` (the model is left unchanged).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from batchnorm.tools import doctor
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> report = doctor(model, torch.randn(16, 3, 8, 8))
        >>> [(f.code, f.path) for f in report], report.ok
        ([('BN001', '0')], True)
    """
    args, kwargs = _check_arguments(model, example_input, mode, optimizer, per_device_batch,
                                    min_batch, graph)
    ignored = _check_ignore(ignore)
    intent = mode or ("train" if model.training else "eval")
    bns = [(name, m) for name, m in model.named_modules() if is_bn(m) or is_frozen_bn(m)]
    findings = checks.state_findings(model, bns, intent, explicit=mode is not None)
    if optimizer is not None:
        findings += checks.weight_decay_findings(model, optimizer)
    notes: list[str] = []
    with _unchanged(model, args, kwargs):
        data_flow = None
        if graph != "runtime":
            try:
                data_flow = trace_fx(model)
            except Exception as err:  # any tracing failure: fall back to the run
                if graph == "fx":
                    raise ValueError(f"torch.fx cannot trace the model: {_first_line(err)}; "
                                     "use graph='auto' or graph='runtime'") from err
                notes.append(
                    f"torch.fx could not trace the model ({_first_line(err)}); placement "
                    "checks (BN001-BN004) follow the data flow of one run of the example: "
                    "branches it did not take are not checked and tensors used outside torch "
                    "functions are not seen.")
        recorder = None if data_flow is not None else RuntimeRecorder(model)
        calls, stopped = _run(model, args, kwargs, recorder)
        if recorder is not None and stopped is None:
            data_flow = recorder.graph()
    if stopped is not None:
        notes.append(stopped)
    if data_flow is not None:
        findings += checks.placement_findings(data_flow)
    findings += checks.input_findings(args, kwargs, data_flow)
    findings += checks.run_findings(model, calls, intent, per_device_batch,
                                    _batch_size(args, kwargs), min_batch)
    if not bns:
        findings.append(Finding("BN000", "info", "", "the model has no batch-norm layers"))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rank = {"error": 0, "warning": 1, "info": 2}
    # A module called more than once reports a placement once.
    unique = {(f.code, f.path, f.message): f for f in findings if f.code not in ignored}
    findings = sorted(unique.values(),
                      key=lambda f: (rank[f.severity], f.code, order.get(f.path, -1)))
    return Report(findings, mode=intent, graph=data_flow.source if data_flow else None,
                  bn_layers=len(bns), notes=notes)


# ------------------------------------------------------------------ inputs ---

def _check_arguments(model, example_input, mode, optimizer, per_device_batch, min_batch, graph):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    if graph not in _GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(map(repr, _GRAPHS))}, got {graph!r}")
    for name, value in (("per_device_batch", per_device_batch), ("min_batch", min_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if optimizer is not None and not isinstance(getattr(optimizer, "param_groups", None), list):
        raise TypeError("optimizer must be a torch.optim.Optimizer (with param_groups), got "
                        f"{type(optimizer).__name__}")
    lazy = [name for name, m in model.named_modules()
            if getattr(m, "has_uninitialized_params", lambda: False)()]
    if lazy:
        raise ValueError(f"the model has uninitialized lazy modules ({', '.join(lazy[:3])}); "
                         "run one forward pass first: the doctor does not change the model")
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, tuple):
        return example_input, {}
    if isinstance(example_input, dict) and all(isinstance(k, str) for k in example_input):
        return (), dict(example_input)
    raise TypeError("example_input must be a tensor, a tuple of positional arguments or a dict "
                    f"of keyword arguments, got {type(example_input).__name__} (wrap a list of "
                    "inputs in a tuple: (inputs,))")


def _check_ignore(ignore) -> set[str]:
    ignored = {ignore} if isinstance(ignore, str) else set(ignore)
    unknown = sorted(ignored - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check code(s) {', '.join(unknown)}; the codes are "
                         f"{', '.join(CHECKS)}")
    return ignored


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _batch_size(args, kwargs) -> int | None:
    for t in tensors_in(list(args) + list(kwargs.values())):
        if t.dim() >= 1:
            return t.shape[0]
    return None


# ----------------------------------------------------------------- the run ---

@contextlib.contextmanager
def _unchanged(model: nn.Module, args, kwargs):
    """Restore parameters, buffers (the very objects and their values), module
    modes and the random number generators on exit; no autograd inside."""
    saved = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None:
                    saved.append((store, name, t, t.detach().clone()))
    modes = [(m, m.training) for m in model.modules()]
    tensors = [t for *_, t, _copy in saved] + tensors_in(list(args) + list(kwargs.values()))
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for store, name, t, copy in saved:
                store[name] = t
                t.copy_(copy)
        for m, training in modes:
            m.training = training


def _run(model, args, kwargs, recorder: RuntimeRecorder | None):
    """Run the model once with a hook on every BN; returns ({path: LayerCall}, stop note)."""
    calls: dict[str, LayerCall] = {}
    handles = []
    quiet = recorder.quiet if recorder is not None else contextlib.nullcontext

    def pre_hook(path):
        def hook(module, hook_args, hook_kwargs):
            x = hook_args[0] if hook_args else hook_kwargs.get("input")
            if path in calls or not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            with quiet():
                calls[path] = call = _observe(module, x)
            if call.batch_stats and call.values == 1 and module.training \
                    and module.running_mean is not None:
                module.training = False  # one call in eval mode: the run goes on
                call.flipped = True
        return hook

    def post_hook(path):
        def hook(module, _args, _output):
            call = calls.get(path)
            if call is not None and call.flipped and not module.training:
                module.training = True
        return hook

    for path, m in model.named_modules():
        if is_bn(m):
            handles.append(m.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook(path)))
    stopped = None
    try:
        with recorder if recorder is not None else contextlib.nullcontext():
            if recorder is not None:
                recorder.add_inputs(args, kwargs)
            output = model(*args, **kwargs)
            if recorder is not None:
                recorder.add_output(output)
    except Exception as err:
        failed = [p for p, c in calls.items() if c.batch_stats and c.values == 1 and not c.flipped]
        if not failed:
            raise ValueError(f"the model failed on the example input: {_first_line(err)}") \
                from err
        stopped = (f"the run stopped at {failed[-1]} (one value per channel without running "
                   "statistics); layers after it were not checked")
    finally:
        for handle in handles:
            handle.remove()
    return calls, stopped


def _observe(module: nn.Module, x: torch.Tensor) -> LayerCall:
    channels = x.shape[1]
    values = x.numel() // max(channels, 1)
    batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    mean = var = None
    if values and channels:
        flat = x.detach().transpose(0, 1).reshape(channels, -1).to(torch.float64)
        var, mean = torch.var_mean(flat, dim=1, correction=0)
        mean, var = mean.cpu(), var.cpu()
    return LayerCall(tuple(x.shape), values, batch_stats, False, mean, var)
