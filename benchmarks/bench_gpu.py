"""GPU benchmark: our Triton batch norm against torch eager and ``torch.compile``.

``python benchmarks/bench_batch_norm.py --device cuda`` runs this module.

Sides, same process, same inputs and parameters:

* **ours**: ``batchnorm.BatchNorm2d`` (``backend="auto"``: the Triton kernels
  on CUDA), the epilogue fused (``activation="relu"``, ``residual=``);
* **eager**: ``torch.nn.BatchNorm2d`` (cuDNN or PyTorch's native kernels, as
  PyTorch chooses), then ``+ residual`` and ``torch.relu``;
* **compile**: the same eager function through ``torch.compile`` (inductor,
  static shapes), which fuses the epilogue itself.

Passes: ``forward`` (training forward, as a step runs it: inputs require
grad), ``backward`` (``torch.autograd.grad`` of a recorded forward, graph
retained) and ``forward+backward``. Each side allocates fresh outputs and
gradients per call. Times: ``triton.testing.do_bench`` medians (L2 flushed).

Bandwidth is counted from the bytes a two-pass kernel must move, the same
for every side: forward 3 tensor passes (read x for the statistics, read x
and write y), backward 5 (read dy and x for the sums, read them again and
write dx), plus one per residual (forward: read it; backward: write its
gradient). ``pct_copy`` is that rate over a device-to-device ``copy_``'s.

Cases: ResNet-50's BN inputs at N=256 and N=32 ((64,112,112), (256,56,56),
(512,28,28), (1024,14,14), (2048,7,7)), bfloat16 channels_last and float32
NCHW, plain, +ReLU, +add+ReLU. Rows go to ``docs/benchmarks/cuda_batch_norm.csv``
(``--append`` adds to it, so a long run can be split into parts), the table
between the ``cuda_batch_norm`` markers of ``docs/performance.md``, the chart
next to the CSV.

Examples:
    python benchmarks/bench_batch_norm.py --device cuda                     # everything
    python benchmarks/bench_batch_norm.py --device cuda --batch 256 --configs bf16_nhwc
    python benchmarks/bench_batch_norm.py --device cuda --batch 32 --append
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke --device cpu --backend triton
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path

import torch

import batchnorm
from batchnorm._backend import resolve_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import plot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
CONFIGS = {"bf16_nhwc": (torch.bfloat16, torch.channels_last),
           "fp32_nchw": (torch.float32, torch.contiguous_format)}
EPILOGUES = ("none", "relu", "add_relu")
PASSES = ("forward", "backward", "forward+backward")
SIDES = ("ours", "eager", "compile")
FIELDS = ["case", "pass", "shape", "config", "epilogue", "backend",
          *(f"{s}_ms" for s in SIDES), "ratio_eager", "ratio_compile", "gbytes",
          *(f"{s}_gbps" for s in SIDES), *(f"{s}_pct_copy" for s in SIDES),
          "ours_max_rel_err", "eager_max_rel_err", "compile_max_rel_err",
          "device", "device_name", "peak_gbps", "torch", "triton", "batchnorm", "command", "date"]


def tensor_passes(pass_: str, epilogue: str) -> int:
    """Tensor-sized passes a two-pass kernel must make (see the module docstring)."""
    res = epilogue == "add_relu"
    fwd, bwd = 3 + res, 5 + res
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[pass_]


def _eager_fn(module, epilogue):
    def run(x, res):
        y = module(x)
        if epilogue == "add_relu":
            y = y + res
        return torch.relu(y) if epilogue != "none" else y
    return run


def _sides(C, epilogue, device, compile_backend, backend):
    activation = None if epilogue == "none" else "relu"
    ours = batchnorm.BatchNorm2d(C, activation=activation, device=device,
                                 backend=backend).train()
    theirs = torch.nn.BatchNorm2d(C, device=device).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(C, generator=g) + 0.5)
        ours.bias.copy_(torch.randn(C, generator=g))
    compiled_mod = torch.nn.BatchNorm2d(C, device=device).train()
    theirs.load_state_dict(ours.state_dict())
    compiled_mod.load_state_dict(ours.state_dict())
    fns = {"ours": (lambda x, res: ours(x) if res is None else ours(x, res)),
           "eager": _eager_fn(theirs, epilogue),
           "compile": torch.compile(_eager_fn(compiled_mod, epilogue), backend=compile_backend,
                                    dynamic=False)}
    params = {"ours": ours, "eager": theirs, "compile": compiled_mod}
    return fns, params


def bench_case(shape, config, epilogue, device, peak, compile_backend, sides, timer,
               backend="auto"):
    dtype, fmt = CONFIGS[config]
    gen = torch.Generator(device=device).manual_seed(0)

    def make():
        return torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(
            memory_format=fmt)

    x, dy = make().requires_grad_(), make()
    res = make().requires_grad_() if epilogue == "add_relu" else None
    fns, params = _sides(shape[1], epilogue, device, compile_backend, backend)
    fns = {s: fns[s] for s in sides}

    def wrt(side):
        m = params[side]
        return (x, m.weight, m.bias) + ((res,) if res is not None else ())

    # Accuracy first: every side against torch eager in float64 on the same values.
    exact = torch.nn.BatchNorm2d(shape[1], device=device, dtype=torch.float64).train()
    exact.load_state_dict({k: v.double() if v.is_floating_point() else v
                           for k, v in params["ours"].state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    r64 = None if res is None else res.detach().double().requires_grad_()
    y64 = _eager_fn(exact, epilogue)(x64, r64)
    want = (y64, *torch.autograd.grad(y64, (x64, exact.weight, exact.bias)
                                      + ((r64,) if r64 is not None else ()), dy.double()))
    del x64, r64, y64
    errs = {}
    for side, fn in fns.items():
        y = fn(x, res)
        got = (y, *torch.autograd.grad(y, wrt(side), dy))
        errs[side] = max(((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                         for a, b in zip(got, want, strict=True))
        del y, got
    del want
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    if not errs["ours"] <= limit:
        raise RuntimeError(f"ours is off by {errs['ours']:.3g} (relative, vs float64) on "
                           f"{shape} {config} {epilogue}")

    def forward(side):
        return lambda: fns[side](x, res)

    def backward(side):
        y = fns[side](x, res)
        return lambda: torch.autograd.grad(y, wrt(side), dy, retain_graph=True)

    def step(side):
        return lambda: torch.autograd.grad(fns[side](x, res), wrt(side), dy)

    ops = resolve_backend(backend, x)
    backend = ops.__name__.rsplit(".", 1)[-1]
    nbytes_pass = x.numel() * x.element_size()
    rows = []
    for pass_, make_fn in (("forward", forward), ("backward", backward),
                           ("forward+backward", step)):
        ms = {side: timer(make_fn(side)) * 1e3 for side in fns}
        gbytes = tensor_passes(pass_, epilogue) * nbytes_pass / 1e9
        row = {"case": f"{H.shape_str(shape)} {config} {epilogue}", "pass": pass_,
               "shape": H.shape_str(shape), "config": config, "epilogue": epilogue,
               "backend": backend, "gbytes": gbytes}
        for side in SIDES:
            t = ms.get(side)
            row[f"{side}_ms"] = t if t is not None else ""
            row[f"{side}_gbps"] = gbytes / (t / 1e3) if t else ""
            row[f"{side}_pct_copy"] = 100 * gbytes / (t / 1e3) / peak if t and peak else ""
            row[f"{side}_max_rel_err"] = errs.get(side, "")
        for base in ("eager", "compile"):
            row[f"ratio_{base}"] = ms[base] / ms["ours"] if base in ms else ""
        rows.append(row)
    return rows


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_rows(rows, path: Path, append: bool) -> Path:
    """Write (or append to) the CSV, atomically: a temp file renamed over it."""
    old = []
    if append and path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in [*old, *rows]:
            w.writerow({k: _fmt(v) for k, v in r.items()})
    tmp.replace(path)
    return path


def summary_table(rows) -> str:
    """The issue's goals, per config and epilogue: time summed over the shapes."""
    lines = ["| config | epilogue | pass | ours ms | eager ms | compile ms | vs eager "
             "| vs compile | ours % of copy (large shapes) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["config"], r["epilogue"], r["pass"]) for r in rows},
                  key=lambda k: (k[0], EPILOGUES.index(k[1]), PASSES.index(k[2])))
    for config, epi, pass_ in keys:
        sel = [r for r in rows if (r["config"], r["epilogue"], r["pass"]) == (config, epi, pass_)]
        tot = {s: sum(float(r[f"{s}_ms"]) for r in sel if r[f"{s}_ms"] != "") for s in SIDES}
        big = [float(r["ours_pct_copy"]) for r in sel
               if r["ours_pct_copy"] != "" and float(r["gbytes"]) >= 1.0]
        pct = f"{min(big):.0f}-{max(big):.0f} %" if big else ""
        ratio = {b: (f"**{tot[b] / tot['ours']:.2f}**" if tot[b] / tot["ours"] >= 1 else
                     f"{tot[b] / tot['ours']:.2f}") if tot[b] and tot["ours"] else ""
                 for b in ("eager", "compile")}
        lines.append(f"| {config} | {epi} | {pass_} | {tot['ours']:.3f} | {tot['eager']:.3f} | "
                     f"{tot['compile']:.3f} | {ratio['eager']} | {ratio['compile']} | {pct} |")
    return "\n".join(lines)


def full_table(rows) -> str:
    lines = ["| shape | config | epilogue | pass | ours ms | eager ms | compile ms | vs eager "
             "| vs compile | ours GB/s | % of copy |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(k, spec=".3f", r=r):
            return format(float(r[k]), spec) if r[k] != "" else ""
        lines.append(f"| {r['shape']} | {r['config']} | {r['epilogue']} | {r['pass']} | "
                     f"{f('ours_ms')} | {f('eager_ms')} | {f('compile_ms')} | "
                     f"{f('ratio_eager', '.2f')} | {f('ratio_compile', '.2f')} | "
                     f"{f('ours_gbps', '.0f')} | {f('ours_pct_copy', '.0f')} |")
    return "\n".join(lines)


def render(rows) -> str:
    r = rows[0]
    head = (f"{r['device_name']}, torch {r['torch']}, triton {r['triton']}, batchnorm "
            f"{r['batchnorm']} (backend `{r['backend']}`), {r['date']}; copy bandwidth "
            f"{r['peak_gbps']} GB/s. Command: `{r['command']}`")
    return head + "\n\n" + summary_table(rows) + "\n\n" + full_table(rows)


def plot_png(rows, png: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PASSES), figsize=(13, 0.2 * len(rows) / 3 + 2),
                             sharey=True)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for ax, pass_ in zip(axes, PASSES, strict=True):
        by_case = {r["case"]: r for r in rows if r["pass"] == pass_}
        for k, (base, color) in enumerate((("eager", "#4c72b0"), ("compile", "#dd8452"))):
            vals = [float(by_case[c][f"ratio_{base}"]) if c in by_case and
                    by_case[c][f"ratio_{base}"] != "" else math.nan for c in cases]
            ax.barh([i + 0.4 * k for i in range(len(cases))], vals, height=0.4, color=color,
                    label=f"vs torch {base}")
        ax.axvline(1.0, color="black", lw=1)
        ax.set_title(f"{pass_}: their time / ours (> 1: ours faster)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks([i + 0.2 for i in range(len(cases))], cases)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"batch_norm on {rows[0]['device_name']}, {rows[0]['date'][:10]}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="examples:" + __doc__.split("Examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", default="256,32", help="batch sizes, comma-separated")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: "
                   + ", ".join(CONFIGS))
    p.add_argument("--epilogues", default=",".join(EPILOGUES))
    p.add_argument("--sides", default=",".join(SIDES), help="ours is always timed")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--backend", default="auto",
                   help="our backend; --smoke on a CPU checks the Triton kernels with "
                        "TRITON_INTERPRET=1 and --backend triton")
    p.add_argument("--out", type=Path, default=None,
                   help="Default: docs/benchmarks/cuda_batch_norm.csv "
                        "(--smoke: .cache/benchmarks/)")
    p.add_argument("--append", action="store_true", help="add to the CSV instead of replacing it")
    p.add_argument("--doc", type=Path, default=ROOT / "docs/performance.md")
    p.add_argument("--smoke-shapes", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, eager and aot_eager only, timed with perf_counter: checks "
                        "that this script runs (any device; writes under .cache/)")
    return p


def _perf_counter_timer(fn, reps=3):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # The backward pass alone is timed on one recorded graph (retain_graph=True),
    # which compiled backwards refuse while they donate their saved buffers.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    device = args.device
    sides = ["ours", *[s for s in args.sides.split(",") if s in SIDES and s != "ours"]]
    if args.smoke:
        shapes = [(4, 3, 5, 6), (2, 16, 3, 3)][:args.smoke_shapes]
        compile_backend, timer, peak = "aot_eager", _perf_counter_timer, 0.0
        out = args.out or ROOT / ".cache/benchmarks/smoke_batch_norm.csv"
        doc = None
    else:
        if not (device.startswith("cuda") and torch.cuda.is_available()):
            print("error: the GPU benchmark needs a CUDA device", file=sys.stderr)
            return 2
        shapes = [(int(n), *s) for n in args.batch.split(",") for s in STAGES]
        compile_backend = args.compile_backend
        timer = lambda fn: H.time_gpu(fn).median  # noqa: E731
        peak = H.measure_peak_gbps(device)
        out, doc = args.out or ROOT / "docs/benchmarks/cuda_batch_norm.csv", args.doc
    env = H.environment(device, peak)
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}; copy "
          f"{peak:.0f} GB/s", flush=True)
    rows = []
    cases = list(itertools.product(shapes, args.configs.split(","), args.epilogues.split(",")))
    for i, (shape, config, epi) in enumerate(cases, 1):
        new = bench_case(shape, config, epi, device, peak, compile_backend, sides, timer,
                         args.backend)
        for r in new:
            r.update(env)
            print(f"[{i}/{len(cases)}] {r['case']:36s} {r['pass']:16s} ours "
                  f"{float(r['ours_ms']):8.3f} ms  vs eager {_fmt(r['ratio_eager']):>6s}  "
                  f"vs compile {_fmt(r['ratio_compile']):>6s}", flush=True)
        rows.extend(new)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    path = write_rows(rows, out, args.append)
    print(f"wrote {path}")
    with path.open(newline="") as f:
        all_rows = list(csv.DictReader(f))
    png = plot_png(all_rows, path.with_suffix(".png"))
    if png:
        print(f"wrote {png}")
    text = render(all_rows)
    print("\n" + text)
    if doc is not None and not plot.replace_block(doc, path.stem, text):
        print(f"note: no '<!-- bench-table: {path.stem} -->' marker in {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
