"""Data flow between a model's layers, for :func:`batchnorm.tools.doctor`.

The doctor asks questions like "does this conv feed that BN and nothing else?"
and "is this BN's output the model's output?". Execution order cannot answer
them (a conv that runs just before a BN may reach it only through a residual
add), so the doctor works on a small data-flow graph with two sources:

* :func:`trace_fx`: ``torch.fx`` symbolic tracing, every leaf module kept
  whole. The graph of the code, with every use of every value.
* :class:`RuntimeRecorder`: one real run of the model, leaf modules seen by
  forward hooks and everything between them (``x + y``, ``F.softmax``,
  ``x.flatten(1)``) by a ``TorchFunctionMode``. A tensor's producer is found
  by identity and version counter, so an in-place change (``out += identity``)
  counts as a new value. Works when FX cannot trace (data-dependent control
  flow), but sees only the branches this input took and only uses that go
  through torch functions.

Both give the same :class:`Node` graph; the doctor's checks read only that.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

__all__ = ["Graph", "Node", "RuntimeRecorder", "is_leaf", "trace_fx"]

# Calls that read a tensor's metadata: they use it without consuming its values.
_METADATA = frozenset({"size", "dim", "numel", "getattr", "shape", "dtype", "device", "ndim",
                       "ndimension", "is_contiguous", "stride"})


def is_leaf(module: nn.Module) -> bool:
    """A module the graph keeps whole: no children, or a batch-norm layer.

    BN subclasses that hold children (timm's ``BatchNormAct2d`` keeps its
    activation as a child) still count as one BN layer."""
    return next(module.children(), None) is None or isinstance(module, _BatchNorm) \
        or type(module).__name__.startswith("FrozenBatchNorm")


@dataclass(eq=False)
class Node:
    """One value-producing step: the model's input, a leaf module call, a
    torch function or method, or the model's output.

    ``data`` is the producer of the call's first positional argument (the
    tensor a layer transforms); ``inputs`` are the producers of all its tensor
    arguments; ``users`` the steps that consume its output, metadata reads
    (``x.size()``, ``x.shape``) left out. ``args`` / ``kwargs`` keep the
    call's non-tensor arguments (tensors replaced by ``None``)."""

    kind: str  # "input" | "module" | "function" | "output" | "attr"
    name: str  # module path, function name, or input name
    module: nn.Module | None = None
    data: Node | None = None
    inputs: list[Node] = field(default_factory=list)
    users: list[Node] = field(default_factory=list)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    single: bool = True  # for "output": the model returns one tensor

    def __repr__(self) -> str:
        return f"Node({self.kind}, {self.name!r})"


@dataclass
class Graph:
    """A model's data flow. ``source`` is ``"fx"`` or ``"runtime"``."""

    source: str
    nodes: list[Node]

    def module_nodes(self):
        return (n for n in self.nodes if n.kind == "module")

    def input_nodes(self):
        return [n for n in self.nodes if n.kind == "input"]


def _link(nodes: list[Node]) -> None:
    for node in nodes:
        for producer in dict.fromkeys(node.inputs):
            if node.kind != "function" or node.name not in _METADATA:
                producer.users.append(node)


def function_name(target) -> str:
    """``operator.add``, ``torch.add``, ``Tensor.add_``, ``Tensor.__iadd__`` -> ``"add"``."""
    name = getattr(target, "__name__", None) or str(target)
    name = name.strip("_")
    if name.startswith("i") and hasattr(operator, name) and name[1:] in _ARITH:
        name = name[1:]  # iadd -> add
    return name


_ARITH = frozenset({"add", "sub", "mul", "truediv", "floordiv", "matmul", "pow", "and", "or"})


# ---------------------------------------------------------------- torch.fx ---

class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace_fx(model: nn.Module) -> Graph:
    """The graph of ``model``'s code by ``torch.fx`` symbolic tracing.

    Raises whatever tracing raises (``torch.fx.proxy.TraceError``, ``TypeError``
    on data-dependent control flow, ...); the caller falls back to a run."""
    fx_graph = _LeafTracer().trace(model)
    mapped: dict[fx.Node, Node] = {}
    nodes = []
    for n in fx_graph.nodes:
        if n.op == "placeholder":
            node = Node("input", str(n.target))
        elif n.op == "call_module":
            node = Node("module", str(n.target), module=model.get_submodule(n.target))
        elif n.op == "call_function":
            node = Node("function", function_name(n.target))
        elif n.op == "call_method":
            node = Node("function", function_name(n.target))
        elif n.op == "get_attr":
            node = Node("attr", str(n.target))
        else:  # output
            node = Node("output", "output", single=isinstance(n.args[0], fx.Node))
        node.inputs = [mapped[a] for a in n.all_input_nodes]
        first = n.args[0] if n.args else None
        node.data = mapped.get(first) if isinstance(first, fx.Node) else None
        node.args = tuple(None if isinstance(a, fx.Node) else a for a in n.args)
        node.kwargs = {k: None if isinstance(v, fx.Node) else v for k, v in n.kwargs.items()}
        mapped[n] = node
        nodes.append(node)
    _link(nodes)
    return Graph("fx", nodes)


# ----------------------------------------------------------------- runtime ---

def tensors_in(value) -> list[torch.Tensor]:
    """The tensors in ``value`` (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _const(value):
    return None if tensors_in(value) else value


class RuntimeRecorder(TorchFunctionMode):
    """Records the data flow of one run of ``model`` (see the module docstring).

    Use as a context manager around the forward: it installs forward hooks on
    the leaf modules and is the active ``TorchFunctionMode``; then
    :meth:`graph` turns what it saw into a :class:`Graph`. Work done inside
    ``quiet()`` (the doctor's own statistics) is not recorded."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.nodes: list[Node] = []
        self._producers: dict[int, tuple[weakref.ref, int, Node]] = {}
        self._depth = 0
        self._pending: list[tuple[Node | None, list[Node]]] = []
        self._handles = []

    # Producers by identity: a live weak reference to the very tensor, same version.
    def _producer(self, t: torch.Tensor) -> Node | None:
        entry = self._producers.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == _version(t):
            return entry[2]
        return None

    def _produced(self, node: Node, value) -> None:
        for t in tensors_in(value):
            self._producers[id(t)] = (weakref.ref(t), _version(t), node)

    def _resolve(self, args, kwargs) -> tuple[Node | None, list[Node]]:
        first = args[0] if args else None
        data = self._producer(first) if isinstance(first, torch.Tensor) else None
        found = (self._producer(t) for t in tensors_in(list(args) + list(kwargs.values())))
        return data, [n for n in found if n is not None]

    def add_inputs(self, args: tuple, kwargs: dict) -> None:
        """Name the model's input tensors before the run."""
        named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in named:
            if tensors_in(value):
                node = Node("input", name)
                self.nodes.append(node)
                self._produced(node, value)

    def add_output(self, output) -> None:
        node = Node("output", "output", single=isinstance(output, torch.Tensor))
        node.inputs = [n for n in map(self._producer, tensors_in(output)) if n is not None]
        node.data = node.inputs[0] if node.single and node.inputs else None
        self.nodes.append(node)

    def quiet(self):
        recorder = self

        class _Quiet:
            def __enter__(self):
                recorder._depth += 1

            def __exit__(self, *exc):
                recorder._depth -= 1

        return _Quiet()

    def __enter__(self):
        names = {m: name for name, m in self.model.named_modules()}
        for module, name in names.items():
            if name and is_leaf(module):  # a leaf root is traced through, as torch.fx does
                self._handles.append(module.register_forward_pre_hook(
                    self._pre_hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(
                    self._make_post_hook(name), with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _pre_hook(self, _module, args, kwargs):
        outermost = self._depth == 0
        self._depth += 1
        self._pending.append(self._resolve(args, kwargs) if outermost else (None, []))

    def _make_post_hook(self, name):
        def post_hook(module, args, kwargs, output):
            self._depth -= 1
            data, inputs = self._pending.pop()
            if self._depth == 0:
                node = Node("module", name, module=module, data=data, inputs=inputs,
                            args=tuple(map(_const, args)),
                            kwargs={k: _const(v) for k, v in kwargs.items()})
                self.nodes.append(node)
                self._produced(node, output)
        return post_hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._depth:
            return func(*args, **kwargs)
        data, inputs = self._resolve(args, kwargs)
        out = func(*args, **kwargs)
        if tensors_in(out):
            node = Node("function", function_name(func), data=data, inputs=inputs,
                        args=tuple(map(_const, args)),
                        kwargs={k: _const(v) for k, v in kwargs.items()})
            self.nodes.append(node)
            self._produced(node, out)
        return out

    def graph(self) -> Graph:
        _link(self.nodes)
        return Graph("runtime", self.nodes)
