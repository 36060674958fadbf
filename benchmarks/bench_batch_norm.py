"""Benchmark: our ``BatchNorm2d`` against ``torch.nn.BatchNorm2d``, same process.

Training mode (forward, and the training step forward+backward) and eval
mode (forward under ``no_grad``), NCHW and channels_last, float32 and
bfloat16, ResNet-like shapes, plain BN, BN+ReLU (ours fused
``activation="relu"``, torch's BN then ``torch.relu``) and BN+add+ReLU, a
residual block's tail (ours ``residual=``, torch's BN, ``+``, ``relu``).
The first-call (compile) time of the CPU kernels is measured in fresh
processes, with an empty and with a filled Numba cache. Both sides allocate
a fresh output (and fresh gradients) on every call, as a user's training step
does; neither reuses buffers between calls. Gradients are taken with
``torch.autograd.grad`` for the input, weight and bias, so no ``.grad``
accumulation is timed.

Writes one CSV row per (case, pass) with the environment (see
``benchmarks/_harness.py``), then renders the markdown table and the PNG from
that CSV (``benchmarks/plot.py``).

Examples:
    .venv/bin/python benchmarks/bench_batch_norm.py            # full run, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_batch_norm.py --quick    # a subset, ~1 min
    python benchmarks/bench_batch_norm.py --device cuda  # benchmarks/bench_gpu.py: Triton vs
                                                         # torch eager and torch.compile
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
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

# ResNet-50's BN inputs at batch 32 (stages 1-4), sized for a 2-core CPU, plus
# a small one where the per-call overhead shows.
SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7),
          (8, 64, 8, 8)]
QUICK_SHAPES = [(32, 256, 14, 14), (8, 64, 8, 8)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPILOGUES = [None, "relu", "add_relu"]
# bfloat16 gets the two main epilogues only, to keep the run short.
EPILOGUES_BY_DTYPE = {"float32": EPILOGUES, "bfloat16": [None, "relu"]}
ALLOCATION = "fresh output and gradients per call, both sides"


def _modules(C, epilogue, device):
    activation = "relu" if epilogue in ("relu", "add_relu") else None
    ours = batchnorm.BatchNorm2d(C, activation=activation, device=device)
    theirs = torch.nn.BatchNorm2d(C, device=device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(C, generator=g) + 0.5)
        ours.bias.copy_(torch.randn(C, generator=g))
        theirs.load_state_dict(ours.state_dict())
    return ours.train(), theirs.train()


def _min_bytes(numel, itemsize, pass_, epilogue):
    """The fewest bytes the op must move: read x, [residual], write y (+ read g, x,
    [y], write dx, [write the residual's gradient])."""
    res = epilogue == "add_relu"
    fwd = (2 + res) * numel * itemsize
    if pass_ in ("forward", "eval"):
        return fwd
    return fwd + (3 + (epilogue is not None) + res) * numel * itemsize


def bench_case(shape, dtype, fmt, epilogue, device, rounds, min_run_time, peak_gbps,
               quiet=0.1):
    """Rows for one (shape, dtype, memory format, epilogue): forward, step, eval."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    res = None
    if epilogue == "add_relu":
        res = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
        res.requires_grad_()
    ours, theirs = _modules(shape[1], epilogue, device)
    wrt_ours = (x, ours.weight, ours.bias) + ((res,) if res is not None else ())
    wrt_torch = (x, theirs.weight, theirs.bias) + ((res,) if res is not None else ())

    def ours_fwd():
        return ours(x) if res is None else ours(x, res)

    def torch_fwd():
        y = theirs(x)
        if res is not None:
            y = y + res
        return torch.relu(y) if epilogue is not None else y

    def ours_fb():
        return torch.autograd.grad(ours_fwd(), wrt_ours, grad)

    def torch_fb():
        return torch.autograd.grad(torch_fwd(), wrt_torch, grad)

    def in_eval(fn, module):
        def run():
            with torch.no_grad():
                return fn()
        module.eval()
        return run

    # Both sides against a float64 run of torch's module on the same values:
    # ours must be accurate, or the timing means nothing (torch's own error is
    # recorded too; its channels_last float32 backward is not always accurate).
    exact = copy.deepcopy(theirs).double()
    x64 = x.detach().double().requires_grad_()
    r64 = None if res is None else res.detach().double().requires_grad_()
    y64 = exact(x64) if r64 is None else exact(x64) + r64
    y64 = torch.relu(y64) if epilogue is not None else y64
    wrt64 = (x64, exact.weight, exact.bias) + ((r64,) if r64 is not None else ())
    want = (y64, *torch.autograd.grad(y64, wrt64, grad.double()))

    def max_rel_err(got):
        return max(((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                   for a, b in zip(got, want, strict=True))

    ours_err = max_rel_err((ours_fwd(), *ours_fb()))
    torch_err = max_rel_err((torch_fwd(), *torch_fb()))
    if not ours_err <= (1e-4 if dtype == torch.float32 else 3e-2):
        raise RuntimeError(f"ours is off by {ours_err:.3g} (relative, vs float64) on {shape} "
                           f"{dtype} {fmt} epilogue={epilogue}")

    rows = []
    ops = resolve_backend("auto", x)
    backend = ops.__name__.rsplit(".", 1)[-1]
    if hasattr(ops, "runs_on") and not ops.runs_on(x):
        backend += " (portable path for this dtype/layout)"
    fmt_name = next(k for k, v in FORMATS.items() if v == fmt)
    dtype_name = str(dtype).removeprefix("torch.")
    passes = (("forward", lambda: {"torch": torch_fwd, "ours": ours_fwd}),
              ("forward+backward", lambda: {"torch": torch_fb, "ours": ours_fb}),
              ("eval", lambda: {"torch": in_eval(torch_fwd, theirs),
                                "ours": in_eval(ours_fwd, ours)}))
    for pass_, make in passes:
        t = H.compare(make(), device, rounds, min_run_time, quiet)
        gbps = _min_bytes(x.numel(), x.element_size(), pass_, epilogue) / t["ours"].median / 1e9
        rows.append({
            "op": "batch_norm",
            "case": f"{H.shape_str(shape)} {fmt_name} {dtype_name} {epilogue or 'none'}",
            "pass": pass_, "shape": H.shape_str(shape), "dtype": dtype_name,
            "memory_format": fmt_name, "activation": epilogue or "none", "backend": backend,
            "torch_ms": t["torch"].median * 1e3, "ours_ms": t["ours"].median * 1e3,
            "ratio": t["torch"].median / t["ours"].median,
            "torch_q20_ms": t["torch"].q20 * 1e3, "torch_q80_ms": t["torch"].q80 * 1e3,
            "ours_q20_ms": t["ours"].q20 * 1e3, "ours_q80_ms": t["ours"].q80 * 1e3,
            "ours_gbps": gbps, "ours_pct_peak": 100 * gbps / peak_gbps if peak_gbps else "",
            "torch_faults": t["torch"].faults, "ours_faults": t["ours"].faults,
            "ours_max_rel_err": ours_err, "torch_max_rel_err": torch_err, "allocation": ALLOCATION,
            "others_cpu": t["ours"].others_cpu,
        })
    return rows


_FIRST_CALL = """
import json, sys, time
import torch
t0 = time.perf_counter()
import batchnorm
from batchnorm.kernels.cpu import _kernels
t1 = time.perf_counter()
x = torch.randn(8, 16, 10, 10, requires_grad=True)
m = batchnorm.BatchNorm2d(16, activation="relu")
times = []
for _ in range(3):
    start = time.perf_counter()
    m(x).sum().backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"import_s": t1 - t0, "first_step_s": times[0], "third_step_s": times[2]}))
"""


def first_call_times() -> list[dict]:
    """The CPU kernels' first training step in fresh processes: with an empty
    Numba cache (compiles), then with the cache that run filled (loads)."""
    import json
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("empty cache (compile)", "filled cache (load)"):
            out = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows.append({"case": label, **json.loads(out)})
    return rows


def first_call_table(rows) -> str:
    lines = ["| fresh process, Numba cache | import batchnorm s | first training step s "
             "| third step ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['import_s']:.2f} | {r['first_step_s']:.2f} "
              f"| {1e3 * r['third_step_s']:.2f} |" for r in rows]
    return ("BatchNorm2d(16, activation=\"relu\") on an 8x16x10x10 float32 input, one "
            "training step (forward and backward).\n\n" + "\n".join(lines))


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  .venv/bin/python benchmarks/bench_batch_norm.py\n"
               "  .venv/bin/python benchmarks/bench_batch_norm.py --quick --no-plot",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="two shapes, fewer and shorter rounds (about a minute)")
    p.add_argument("--device", default="cpu", help="cpu or cuda. Default: cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path. Default: docs/benchmarks/<device>_batch_norm.csv "
                        "(--quick: .cache/benchmarks/..., so the docs keep the full run)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (median over rounds). Default: 5, --quick 2")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange. Default: 0.2, --quick 0.1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads. Default: torch's default")
    p.add_argument("--max-others-cpu", type=float, default=0.1,
                   help="before each round, wait (up to 2 min) until other processes use less "
                        "than this share of the CPUs; negative: never wait. Default: 0.1")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda"):
        # The GPU benchmark has its own baselines (torch eager and torch.compile),
        # passes and shapes: benchmarks/bench_gpu.py.
        import bench_gpu

        return bench_gpu.main(["--device", device, *(["--out", str(args.out)] if args.out
                                                     else [])])
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = args.rounds or (2 if args.quick else 5)
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.2)
    dev_kind = device.split(":")[0]
    out = args.out or (ROOT / (".cache/benchmarks" if args.quick else "docs/benchmarks")
                       / f"{dev_kind}_batch_norm.csv")

    peak = H.measure_peak_gbps(device)
    env = H.environment(device, peak)
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, "
          f"batchnorm {env['batchnorm']}; copy bandwidth {peak:.1f} GB/s; "
          f"allocation: {ALLOCATION}", flush=True)
    rows = []
    start = time.perf_counter()
    cases = [(shape, fmt, dtype, epi)
             for shape, fmt, (dname, dtype) in itertools.product(shapes, FORMATS.values(),
                                                                DTYPES.items())
             for epi in EPILOGUES_BY_DTYPE[dname]]
    for i, (shape, fmt, dtype, act) in enumerate(cases, 1):
        quiet = args.max_others_cpu if args.max_others_cpu >= 0 else None
        new = bench_case(shape, dtype, fmt, act, device, rounds, min_run_time, peak, quiet)
        for r in new:
            r.update(env)
            r["loadavg"] = H.environment(device)["loadavg"]  # at the end of this case
            print(f"[{i:2d}/{len(cases)} {time.perf_counter() - start:5.0f}s] {r['case']:42s} "
                  f"{r['pass']:16s} torch {r['torch_ms']:8.3f} ms  ours {r['ours_ms']:8.3f} ms"
                  f"  ratio {r['ratio']:5.2f}"
                  + (f"  (busy machine: others used {r['others_cpu']:.0%} of the CPUs)"
                     if quiet is not None and r["others_cpu"] > quiet else ""), flush=True)
        rows.extend(new)
    path = H.write_csv(rows, out)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if not args.no_plot:
        png = plot.plot_ratios(H.read_csv(path), path.with_suffix(".png"))
        if png:
            print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    print()
    print(plot.markdown_table(H.read_csv(path)))
    if dev_kind == "cpu" and not args.quick:
        table = first_call_table(first_call_times())
        print("\n" + table)
        for doc in (ROOT / "docs/performance.md",):
            plot.replace_block(doc, "cpu_first_call", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
