"""Record per-layer activation statistics during training, with forward hooks.

The BN paper's Figure 1 (b, c) plots the 15th, 50th and 85th percentiles of the
input to a sigmoid over training: without batch norm they drift, with it they
stay put. :class:`ActivationMonitor` records exactly that, for any layer of any
``torch.nn.Module``: mean, std, min, max, the fraction of zeros (dead ReLUs) and
the requested percentiles of a layer's output (or input), every ``k``-th
forward of the model. :func:`activation_stats` is the pure tensor helper behind
it.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["ActivationMonitor", "activation_stats"]

# torch.quantile refuses inputs with more elements than this.
QUANTILE_MAX_ELEMENTS = 2**24

_GOLDEN = (5**0.5 - 1) / 2

# The layer kinds watched when ``layers=None``: where batch norm sits and what
# it feeds. Activations used through ``torch.nn.functional`` are not modules
# and cannot be hooked.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    _ConvNd,
    nn.Linear,
    _BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
)

# Batch-norm layers that do not derive from torch's _BatchNorm (torchvision's
# FrozenBatchNorm2d, renorm or ghost variants) are recognised by class name,
# leaf modules only, so a block merely named "...BatchNorm..." is not taken.
_BN_NAME = re.compile(r"Batch_?(Norm|Renorm)", re.IGNORECASE)

LayerSpec = (
    None
    | str
    | type
    | Sequence[str | type]
    | Callable[[str, nn.Module], bool]
)


def _is_default_layer(module: nn.Module) -> bool:
    if isinstance(module, DEFAULT_LAYER_TYPES):
        return True
    return bool(_BN_NAME.search(type(module).__name__)) and next(module.children(), None) is None


def _percentile_key(q: float) -> str:
    return f"p{q:g}"


def _evenly_spaced(flat: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` elements of a 1-D tensor, one from each of ``m`` equal consecutive stretches.

    Element ``i`` is taken at ``floor((i + frac(i * phi)) * n / m)``, ``phi`` the golden
    ratio: deterministic, spread evenly over the whole tensor, and not periodic, so a
    plain stride that happens to equal a layout period (``C * H * W``, ``H * W``) cannot
    make the sample one channel or one pixel position.
    """
    n = flat.numel()
    if m >= n:
        return flat
    i = torch.arange(m, device=flat.device, dtype=torch.float64)
    position = (i + torch.frac(i * _GOLDEN)) * (n / m)
    index = position.to(torch.int64).clamp_(max=n - 1)
    return flat.index_select(0, index)


def _quantiles(sample: torch.Tensor, q: list[float]) -> torch.Tensor:
    """Linear-interpolation quantiles (torch.quantile's default definition), float64.

    On the CPU NumPy's selection (``np.quantile``, introselect, O(n)) gives the same
    numbers as ``torch.quantile``, which sorts the whole tensor, several times faster;
    elsewhere ``torch.quantile``."""
    if sample.device.type == "cpu":
        return torch.from_numpy(np.quantile(sample.numpy(force=True), q, method="linear"))
    return _torch_quantiles(sample, q)


def _torch_quantiles(sample: torch.Tensor, q: list[float]) -> torch.Tensor:
    q_t = torch.tensor(q, dtype=sample.dtype, device=sample.device)
    return torch.quantile(sample, q_t).to(torch.float64)


def activation_stats(
    x: torch.Tensor,
    percentiles: Iterable[float] = (15, 50, 85),
    *,
    max_samples: int | None = None,
    channel_stats: bool = False,
) -> dict[str, object]:
    """Summary statistics of one activation tensor, as Python numbers.

    Statistics are computed without autograd, in float32 (float64 for float64
    tensors), over all elements: ``mean``, ``std`` (the population std,
    ``correction=0``, the one batch norm divides by), ``min``, ``max`` and
    ``zero_fraction`` (the share of exact zeros: dead ReLU units). Percentiles are
    ``torch.quantile``'s (linear interpolation; computed by ``np.quantile``, the same
    definition without a full sort, for CPU tensors) on all elements when there are
    at most ``max_samples`` of them and at most ``2**24`` (``torch.quantile``'s limit);
    otherwise on ``m`` of them (the smaller limit) taken evenly over the flattened
    tensor: one from each of ``m`` equal consecutive stretches, at a fixed
    golden-ratio offset within the stretch, so the sample is deterministic (the same
    tensor gives the same numbers) yet cannot lock onto a channel or pixel period
    the way a plain stride can. Only the percentiles are subsampled; the other
    statistics are exact.

    Args:
        x: the activation, any shape, floating point.
        percentiles: percentiles in ``[0, 100]``; each becomes a key ``p{q}``
            (``p15``, ``p2.5``). Default: ``(15, 50, 85)``.
        max_samples: most elements the percentiles are computed from.
            Default: ``None`` (all, up to ``2**24``).
        channel_stats: also return ``channel_mean`` and ``channel_std``, lists over
            the channel axis 1 (``None`` for tensors with fewer than 2 dims).
            Default: ``False``.

    Returns:
        A dict with ``numel``, ``mean``, ``std``, ``min``, ``max``,
        ``zero_fraction``, one ``p{q}`` per percentile and, if asked for, the
        per-channel lists. An empty tensor gives NaN statistics. The values are
        read back with a single device synchronisation.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor.

    Example:
        >>> import torch
        >>> stats = activation_stats(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), (50,))
        >>> stats["mean"], stats["p50"], stats["zero_fraction"]
        (2.0, 2.0, 0.2)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"activation_stats needs a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    qs = [float(q) for q in percentiles]
    limit = QUANTILE_MAX_ELEMENTS if max_samples is None else min(max_samples,
                                                                   QUANTILE_MAX_ELEMENTS)
    with torch.no_grad():
        x = x.detach()
        n = x.numel()
        out: dict[str, object] = {"numel": n}
        names = ["mean", "std", "min", "max", "zero_fraction"] + [_percentile_key(q) for q in qs]
        if n == 0:
            out.update(dict.fromkeys(names, math.nan))
            if channel_stats:
                out["channel_mean"] = out["channel_std"] = None if x.dim() < 2 else []
            return out
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)  # a copy only for low-precision inputs
        flat = x.reshape(-1)
        # Two passes (cascade-summed means) rather than torch.std_mean's Welford, which is
        # about ten times slower on the CPU for the same accuracy at these sizes.
        mean = flat.mean()
        std = (flat - mean).square_().mean().sqrt_()
        lo, hi = torch.aminmax(flat)
        zeros = (x == 0).sum(dtype=torch.float64)  # a count: exact in float64
        parts = [torch.stack([mean, std, lo, hi]).to(torch.float64), zeros.reshape(1)]
        if qs:
            parts.append(_quantiles(_evenly_spaced(flat, limit), [v / 100.0 for v in qs]))
        channels = 0
        if channel_stats and x.dim() >= 2:
            channels = x.shape[1]
            dims = [0, *range(2, x.dim())]  # reduce in place of a transposed copy
            c_mean = x.mean(dim=dims, keepdim=True)
            c_std = (x - c_mean).square_().mean(dim=dims).sqrt_()
            c_mean = c_mean.reshape(-1)
            parts += [c_mean.to(torch.float64), c_std.to(torch.float64)]
        values = torch.cat(parts).tolist()  # the one sync
        values[4] /= n
        out.update(zip(names, values[: len(names)], strict=True))
        if channel_stats:
            rest = values[len(names):]
            out["channel_mean"] = rest[:channels] if x.dim() >= 2 else None
            out["channel_std"] = rest[channels:] if x.dim() >= 2 else None
        return out


def _first_float_tensor(value) -> torch.Tensor | None:
    """The first floating-point tensor in ``value`` (depth first through tuples, lists
    and dict values), or ``None``."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        return None
    for item in items:
        found = _first_float_tensor(item)
        if found is not None:
            return found
    return None


def _select_layers(model: nn.Module, layers: LayerSpec) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if layers is None:
        return [(name, m) for name, m in named if _is_default_layer(m)]
    if callable(layers) and not isinstance(layers, type):
        return [(name, m) for name, m in named if layers(name, m)]
    if isinstance(layers, (str, type)):
        layers = [layers]
    names, types = set(), []
    for item in layers:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError("layers must be None, a predicate fn(name, module) -> bool, or a "
                            "list of qualified module names and/or nn.Module types; got "
                            f"{item!r} in the list")
    valid = [name for name, _ in named]
    unknown = sorted(names.difference(valid))
    if unknown:
        shown = [n for n in valid if n][:8]
        more = f", ... ({len(valid)} in all)" if len(valid) > len(shown) + 1 else ""
        raise ValueError(f"unknown layer name(s) {unknown}: the model has no such module. "
                         f"Valid names (as in model.named_modules()) include {shown}{more}")
    types_ = tuple(types)
    return [(name, m) for name, m in named
            if name in names or (types_ and isinstance(m, types_))]


class ActivationMonitor:
    """Records per-layer activation statistics during training, with forward hooks.

    A forward pre-hook on ``model`` counts the model's forward calls; on every
    ``every``-th of them (steps ``0, every, 2 * every, ...``) a hook on each watched
    layer summarises what the layer produced (or received) with
    :func:`activation_stats` and appends one dict to :attr:`records`. The step is
    the number of counted model forwards before this one, so with one forward per
    optimizer step it is the training iteration.

    **Training** vs **inference**: only forwards in training mode
    (``model.training``) are counted and recorded, unless ``record_eval=True``;
    forwards while the monitor is disabled are not counted either. Layers run
    outside the model's forward (a submodule called on its own, activation
    checkpointing's recomputation in the backward pass) are not recorded.

    **Cost**: when off (``monitor.enabled = False``, inside :meth:`paused`, or on a
    step that is not recorded) each hook returns at once; :meth:`remove` takes every
    hook away. A recorded step costs a few reductions and a quantile selection (a
    sort on GPUs) per layer, and one device synchronisation per layer; use
    ``every`` and ``max_samples`` to bound it.

    Args:
        model: any ``nn.Module``; its forward calls are the steps.
        layers: which modules to watch. ``None``: every module of the batch-norm
            relevant kinds (:data:`DEFAULT_LAYER_TYPES`: Conv*, Linear,
            BatchNorm*, ReLU, Sigmoid, Tanh, GELU, SiLU, LeakyReLU and other
            activation modules). A list of qualified names as in
            ``model.named_modules()`` (``""`` is the model itself), a list of module
            types (or a mix of both), or a predicate ``fn(name, module) -> bool``.
            Default: ``None``.
        percentiles: percentiles in ``[0, 100]`` to record, each under a key
            ``p{q}``. Default: ``(15, 50, 85)`` (the BN paper's Figure 1).
        every: record on every ``every``-th model forward. Default: ``1``.
        what: ``"output"`` records a module's output (the first floating-point
            tensor of a tuple output); ``"input"`` its first floating-point input,
            seen before the module runs, so in-place modules do not alter it (the
            input to a sigmoid is what the paper plots). Default: ``"output"``.
        max_samples: most elements the percentiles are computed from; larger
            tensors are subsampled evenly and deterministically (see
            :func:`activation_stats`). Default: ``None`` (all, up to ``2**24``).
        channel_stats: also record ``channel_mean`` and ``channel_std``, lists over
            the channel axis 1. Default: ``False``.
        record_eval: also count and record forwards in eval mode.
            Default: ``False``.

    Attributes:
        records: one dict per watched layer per call per recorded step, with keys
            ``step``, ``layer``, ``call`` (the module's call index within that
            forward, for modules run several times), ``numel``, ``mean``, ``std``,
            ``min``, ``max``, ``zero_fraction``, ``p{q}`` per percentile and, with
            ``channel_stats``, ``channel_mean`` and ``channel_std``.
        enabled: ``False`` makes every hook return at once.
        step: model forwards counted so far.

    Raises:
        ValueError: for unknown layer names (the message lists valid ones), a bad
            ``every``, ``what``, ``percentiles`` or ``max_samples``.
        TypeError: for a ``layers`` entry that is neither a name nor a module type.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from batchnorm.tools import ActivationMonitor
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid())
        >>> with ActivationMonitor(model, [nn.Sigmoid], what="input", every=2) as mon:
        ...     for _ in range(5):
        ...         loss = model(torch.randn(16, 4)).sum()
        >>> mon.layers
        ['1']
        >>> steps, medians = mon.history("1", "p50")
        >>> steps
        [0, 2, 4]
        >>> list(mon.records[0])
        ['step', 'layer', 'call', 'numel', 'mean', 'std', 'min', 'max', 'zero_fraction',
         'p15', 'p50', 'p85']
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        percentiles: Iterable[float] = (15, 50, 85),
        every: int = 1,
        what: str = "output",
        max_samples: int | None = None,
        channel_stats: bool = False,
        record_eval: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if what not in ("output", "input"):
            raise ValueError(f'what must be "output" or "input", got {what!r}')
        if max_samples is not None and (isinstance(max_samples, bool)
                                        or not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"max_samples must be None or a positive integer, got "
                             f"{max_samples!r}")
        percentiles = tuple(percentiles)
        for q in percentiles:
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 100:
                raise ValueError(f"percentiles must be numbers in [0, 100], got {q!r}")
        keys = [_percentile_key(q) for q in percentiles]
        if len(set(keys)) != len(keys):
            raise ValueError(f"percentiles must be distinct, got {percentiles}")

        self.model = model
        self.percentiles = percentiles
        self.every = every
        self.what = what
        self.max_samples = max_samples
        self.channel_stats = channel_stats
        self.record_eval = record_eval
        self.enabled = True
        self.step = 0
        self.records: list[dict[str, object]] = []
        self._recording = False  # True only inside a model forward that is recorded
        self._current_step = -1
        self._calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

        selected = _select_layers(model, layers)
        if not selected:
            warnings.warn("ActivationMonitor: no module of the model matches `layers`; "
                          "nothing will be recorded", stacklevel=2)
        self._layers = [name for name, _ in selected]
        self._keys = ["step", "layer", "call", "numel", "mean", "std", "min", "max",
                      "zero_fraction", *keys]
        if channel_stats:
            self._keys += ["channel_mean", "channel_std"]

        # Counting runs before any other pre-hook (the root may be a watched layer with
        # what="input"); the end hook is registered last and always runs, so a forward
        # that raises does not leave the monitor recording.
        self._handles.append(model.register_forward_pre_hook(self._on_model_start,
                                                             prepend=True))
        for name, module in selected:
            if what == "output":
                handle = module.register_forward_hook(self._output_hook(name))
            else:
                handle = module.register_forward_pre_hook(self._input_hook(name))
            self._handles.append(handle)
        self._handles.append(model.register_forward_hook(self._on_model_end, always_call=True))

    # -- hooks ----------------------------------------------------------------------------

    def _on_model_start(self, module: nn.Module, args) -> None:  # noqa: ARG002
        if not self.enabled or not (module.training or self.record_eval):
            return
        step = self.step
        self.step += 1
        if step % self.every:
            return
        self._current_step = step
        self._calls.clear()
        self._recording = True

    def _on_model_end(self, module, args, output) -> None:  # noqa: ARG002
        self._recording = False

    def _output_hook(self, name: str):
        def hook(module, args, output):  # noqa: ARG001
            if self._recording:
                self._record(name, output)

        return hook

    def _input_hook(self, name: str):
        def hook(module, args):  # noqa: ARG001
            if self._recording:
                self._record(name, args)

        return hook

    def _record(self, name: str, value) -> None:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        tensor = _first_float_tensor(value)
        if tensor is None:
            return
        stats = activation_stats(tensor, self.percentiles, max_samples=self.max_samples,
                                 channel_stats=self.channel_stats)
        self.records.append({"step": self._current_step, "layer": name, "call": call, **stats})

    # -- control --------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Qualified names of the watched modules, in ``model.named_modules()`` order."""
        return list(self._layers)

    @contextlib.contextmanager
    def paused(self):
        """Context manager: nothing is counted or recorded inside it.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.ReLU())
            >>> mon = ActivationMonitor(model)
            >>> with mon.paused():
            ...     _ = model(torch.randn(2, 3))
            >>> mon.records, mon.step
            ([], 0)
            >>> mon.remove()
        """
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Remove every hook this monitor added; the records stay. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recording = False

    def clear(self) -> None:
        """Drop the records; the step count goes on."""
        self.records.clear()

    def __enter__(self) -> ActivationMonitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- results --------------------------------------------------------------------------

    def to_rows(self) -> list[dict[str, object]]:
        """The records, one dict per layer per call per recorded step (a new list)."""
        return list(self.records)

    def history(self, layer: str, key: str, call: int | None = None
                ) -> tuple[list[int], list[object]]:
        """One statistic of one layer over training, ready to plot.

        Args:
            layer: a watched layer's qualified name.
            key: a record key, e.g. ``"mean"`` or ``"p50"``.
            call: only this call index of a module run several times per forward.
                Default: ``None`` (every call; steps then repeat).

        Returns:
            ``(steps, values)``, two lists of the same length.

        Raises:
            ValueError: if ``layer`` is not watched.
            KeyError: if ``key`` is not a record key.
        """
        if layer not in self._layers:
            raise ValueError(f"layer {layer!r} is not watched; watched layers: {self._layers}")
        if key not in self._keys:
            raise KeyError(f"no statistic {key!r}; record keys: {self._keys}")
        rows = [r for r in self.records
                if r["layer"] == layer and (call is None or r["call"] == call)]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self._layers)}, what={self.what!r}, "
                f"every={self.every}, enabled={self.enabled}, step={self.step}, "
                f"records={len(self.records)})")
