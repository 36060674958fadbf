"""``batchnorm doctor``: build a model from a factory and check it for batch-norm pitfalls.

Parse, call :func:`batchnorm.tools.doctor`, render. The factory is
``module:function`` (``module`` may also be a ``.py`` file); it is called with
``--kwargs`` and returns a model, or ``(model, optimizer)`` to have the
optimizer's weight decay checked too. Exit codes: 0 no errors (warnings
allowed), 1 errors found or the model could not be built or run, 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shlex
import sys
from pathlib import Path

DTYPES = ("float32", "float64", "float16", "bfloat16")

EPILOG = r"""The factory's model is checked as returned: with --eval it should be what your
evaluation code runs (after model.eval()); a model still in training mode is
then an error (BN011). Without --eval/--train the model's own mode says which.

examples:
  batchnorm doctor torchvision.models:resnet18 --input-shape 32,3,224,224
  batchnorm doctor models.py:build --input-shape 8,3,32,32 --eval --json
  batchnorm doctor mypkg.nets:cnn --input-shape 64,1,28,28 --input-scale 64 --input-offset 128
      (inputs like raw 0-255 pixels)
  batchnorm doctor mypkg.nets:cnn --input batch.pt --eval
      (a real batch saved with torch.save: checks the running statistics against it)
  batchnorm doctor torchvision.models:resnet18 --kwargs '{"num_classes": 10}' \
      --input-shape 2,3,64,64
"""


class FactoryError(ValueError):
    """The model could not be imported, built or given its input: one clear line, exit 1."""


# ------------------------------------------------------------ argument types ---

def _factory_spec(text: str) -> str:
    module, sep, attr = text.rpartition(":")
    if not sep or not module or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise argparse.ArgumentTypeError(
            f"expected MODULE:FUNCTION (e.g. torchvision.models:resnet18 or models.py:build), "
            f"got {text!r}")
    return text


def _shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 8,3,32,32, got {text!r}")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _codes(text: str) -> list[str]:
    from ..tools.doctor import CHECKS

    codes = [c.strip().upper() for c in text.split(",") if c.strip()]
    unknown = [c for c in codes if c not in CHECKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown check code(s) {', '.join(unknown)}; the codes are {', '.join(CHECKS)}")
    return codes


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_classes\": "
                                         f"10}}', got {text!r}")
    return value


def add_parser(sub, _t=None) -> None:
    """Add ``doctor`` to ``sub``; its texts are English whatever the language."""
    p = sub.add_parser(
        "doctor", help="check a model for batch-norm pitfalls",
        description="Build a model with MODULE:FUNCTION, run it once on an example input and "
                    "report the known batch-norm pitfalls: placement, batch size, input "
                    "scale, running statistics, train/eval mode, weight decay.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", type=_factory_spec, metavar="MODULE:FUNCTION",
                   help="callable returning the model, or (model, optimizer); MODULE is "
                        "importable (the current folder is on the path) or a .py file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-shape", type=_shape, metavar="N,C,...",
                        help="shape of a random N(0, 1) example input, batch first")
    source.add_argument("--input", metavar="FILE", type=Path,
                        help="example input saved with torch.save: a tensor, a tuple of "
                             "positional arguments or a dict of keyword arguments")
    p.add_argument("--input-scale", type=_finite, default=1.0, metavar="S",
                   help="random input = offset + S * N(0, 1) (default: 1)")
    p.add_argument("--input-offset", type=_finite, default=0.0, metavar="O",
                   help="(default: 0)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="dtype of the model and input (default: float32 for a random "
                        "input; a file's own dtype, and the model as built, otherwise)")
    p.add_argument("--device", default="cpu", help="device for the model and input "
                                                   "(default: cpu)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the factory's random weights and the random input (default: 0)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eval", dest="mode", action="store_const", const="eval",
                      help="the model is about to be evaluated")
    mode.add_argument("--train", dest="mode", action="store_const", const="train",
                      help="the model is about to be trained")
    p.add_argument("--per-device-batch", type=_positive_int, metavar="N",
                   help="training batch per device, if not the example's")
    p.add_argument("--min-batch", type=_positive_int, default=8, metavar="N",
                   help="per-device batch below which BN006 warns (default: 8)")
    p.add_argument("--ignore", type=_codes, default=[], metavar="CODES",
                   help="comma-separated check codes to leave out, e.g. BN003,BN010")
    p.add_argument("--kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments for the factory, a JSON object")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ------------------------------------------------------------------ factory ---

def load_factory(spec: str):
    """The callable named by ``module:function``; :class:`FactoryError` if it cannot be found."""
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise FactoryError(f"cannot import the factory {spec!r}: no file {str(path)!r}")
        name = f"_batchnorm_doctor_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        load = lambda: loader_spec.loader.exec_module(module)  # noqa: E731
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does
        module = None

        def load():
            nonlocal module
            module = importlib.import_module(module_name)
    try:
        load()
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise FactoryError(f"cannot import the factory {spec!r}: no module named "
                               f"{err.name!r}") from err
        raise FactoryError(f"cannot import the factory {spec!r}: importing {module_name!r} "
                           f"failed: {type(err).__name__}: {err}") from err
    except Exception as err:
        raise FactoryError(f"cannot import the factory {spec!r}: importing {module_name!r} "
                           f"failed: {type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"cannot import the factory {spec!r}: {module_name!r} has no "
                               f"attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"the factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def build(spec: str, kwargs: dict, seed: int):
    """Call the factory; returns ``(model, optimizer or None)``."""
    import torch
    from torch import nn

    factory = load_factory(spec)
    torch.manual_seed(seed)
    try:
        result = factory(**kwargs)
    except Exception as err:
        raise FactoryError(f"the factory {spec!r} raised {type(err).__name__}: {err}") from err
    optimizer = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, optimizer = result
    if not isinstance(result, nn.Module):
        raise FactoryError(f"the factory {spec!r} returned {type(result).__name__}, not a "
                           "torch.nn.Module (or a (model, optimizer) pair)")
    return result, optimizer


def example_input(args):
    """The example: random ``offset + scale * N(0, 1)`` of ``--input-shape``, or ``--input``."""
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.input is None:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.input_shape, generator=gen, dtype=torch.float64)
        x = x * args.input_scale + args.input_offset
        return x.to(device=args.device, dtype=dtype or torch.float32)
    try:
        value = torch.load(args.input, map_location=args.device, weights_only=True)
    except Exception as err:
        raise FactoryError(f"cannot read --input {str(args.input)!r}: {type(err).__name__}: "
                           f"{err}") from err
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, (torch.Tensor, tuple, dict)):
        raise FactoryError(f"--input {str(args.input)!r} holds a {type(value).__name__}; "
                           "expected a tensor, a tuple/list or a dict of tensors")

    def cast(v):
        return v.to(dtype) if dtype is not None and torch.is_tensor(v) \
            and v.is_floating_point() else v
    if isinstance(value, tuple):
        return tuple(cast(v) for v in value)
    if isinstance(value, dict):
        return {k: cast(v) for k, v in value.items()}
    return cast(value)


# -------------------------------------------------------------- environment ---

def environment(spec: str) -> dict:
    """Versions and machine facts worth pasting into a bug report."""
    import numpy
    import torch

    from .. import __version__

    cuda = "not available"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        cuda = (f"{torch.version.cuda}, {count} device(s): "
                f"{torch.cuda.get_device_name(0)}")
    env = {"batchnorm": __version__, "torch": torch.__version__,
           "python": f"{platform.python_version()} ({platform.python_implementation()})",
           "platform": platform.platform(), "numpy": numpy.__version__,
           "threads": torch.get_num_threads(), "cuda": cuda}
    package = spec.rpartition(":")[0].split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    if version and package not in env:
        env[package] = str(version)
    return env


def _describe_input(x) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)} on {x.device}"
    if isinstance(x, tuple):
        return "(" + ", ".join(_describe_input(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe_input(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def run(args, argv: list[str] | None = None) -> int:
    from ..tools.doctor import doctor

    model, optimizer = build(args.factory, args.kwargs, args.seed)
    import torch

    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        model.to(device=device)
        if args.dtype:
            model.to(dtype=getattr(torch, args.dtype))
    except Exception as err:
        raise FactoryError(f"cannot put the model on --device {args.device!r}"
                           f"{' as ' + args.dtype if args.dtype else ''}: {err}") from err
    x = example_input(args)
    report = doctor(model, x, mode=args.mode, optimizer=optimizer,
                    per_device_batch=args.per_device_batch, min_batch=args.min_batch,
                    ignore=args.ignore)
    env = environment(args.factory)
    command = "batchnorm " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.input is None:
        source = (f"random, {args.input_offset:g} + {args.input_scale:g} * N(0, 1), "
                  f"seed {args.seed}")
    else:
        source = f"from {args.input}"
    if args.json:
        json.dump({"command": command, "factory": args.factory,
                   "input": {"description": _describe_input(x), "source": source},
                   "environment": env, "report": report.to_dict()}, sys.stdout, indent=1)
        print()
    else:
        print("Environment (paste it into a bug report):")
        width = max(map(len, env))
        print(f"  {'command':<{width}}  {command}")
        for key, value in env.items():
            print(f"  {key:<{width}}  {value}")
        print(f"  {'input':<{width}}  {_describe_input(x)}, {source}")
        print()
        print(report)
    return 1 if report.errors else 0
