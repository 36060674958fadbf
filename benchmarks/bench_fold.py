"""Benchmark: CPU inference with BN folded into the convolutions, against BN left in.

Three networks in eval mode, float32, NCHW, under ``torch.inference_mode()``:

* ``conv-bn-relu``: six 3x3 conv -> BatchNorm2d -> ReLU layers of 64 channels
  at 56x56 (ResNet-50's first stage size), batch 8;
* ``resnet18``: ResNet-18 (He et al. 2016; torchvision's layout, built here
  from ``torch.nn`` modules because torchvision does not import beside the
  project's torch wheel), 224x224 images, batch 1 and 8;
* ``mobilenetv2-s1-3``: the stem and first three stages of MobileNetV2
  (Sandler et al. 2018; torchvision's layout, 32 -> 16 -> 24 -> 32 channels,
  inverted residual blocks: 1x1 expand conv -> BN -> ReLU6, 3x3 depthwise conv
  -> BN -> ReLU6, 1x1 project conv -> BN, residual add where the shapes match),
  224x224 images, so the blocks run at 112x112, 56x56 and 28x28, batch 1 and 8.
  Its 1x1 and depthwise convolutions are cheap next to a 3x3 dense one, so BN
  is a much larger share of the time than in the other two networks.

For each: the network with PyTorch's ``BatchNorm2d`` (**unfolded**), the same
network after :func:`batchnorm.tools.fold_batchnorm` (**folded**), and the
network with our BN (``convert_batchnorm(..., fuse_activation="fx")``: our
layers, the ReLU after a BN fused into it, a ReLU6 left as its own module
because our ``activation=`` has no ReLU6; **ours unfolded**). Timed with
``benchmarks/_harness.py``: interleaved rounds of
``torch.utils.benchmark.Timer.blocked_autorange``, each round started when other
processes leave the CPUs quiet; the median over rounds is kept. Before timing,
every variant's output is checked against a float64 run of the unfolded network.

CSV (``docs/benchmarks/cpu_fold.csv``, the harness's schema): one row per
(network, batch) and comparison; ``torch_ms`` is always the unfolded network
with PyTorch's BN, ``ours_ms`` the folded network (``pass = folded``) or the
network with our BN (``pass = ours-unfolded``); ``ratio = torch_ms / ours_ms``.

Examples:
    .venv/bin/python benchmarks/bench_fold.py                 # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_fold.py --quick         # smaller inputs, -> .cache/
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from batchnorm.tools import convert_batchnorm, fold_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout and module names."""

    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths, 1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, w, stride),
                                                     BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1x1), depthwise (3x3), project (1x1, linear)."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenetv2_stages(stages=3):
    """MobileNetV2's stem and first ``stages`` stages, no classifier (``stages=3``:
    the layers of torchvision's ``mobilenet_v2().features[:7]``)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # t, c, n, s
    layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                   nn.ReLU6(inplace=True)], 32
    for t, c, n, s in settings[:stages]:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*layers)


def conv_bn_relu(depth=6, width=64):
    layers = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU()]
    return nn.Sequential(*layers)


def trained_statistics(model, seed=0):
    """Running statistics and affine parameters as after training (not 0, 1, 1, 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(C, generator=g) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(C, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(C, generator=g) * 0.1)
    return model.eval()


CASES = {  # name: (builder, input shapes, activation after the BN layers)
    "conv-bn-relu": (conv_bn_relu, [(8, 3, 56, 56)], "relu"),
    "resnet18": (ResNet18, [(1, 3, 224, 224), (8, 3, 224, 224)], "relu"),
    "mobilenetv2-s1-3": (mobilenetv2_stages, [(1, 3, 224, 224), (8, 3, 224, 224)], "relu6"),
}
QUICK = {"conv-bn-relu": [(2, 3, 28, 28)], "resnet18": [(1, 3, 64, 64)],
         "mobilenetv2-s1-3": [(1, 3, 64, 64)]}


def inference(model, x):
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def max_rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def bench_case(name, shape, rounds, min_run_time, quiet):
    torch.manual_seed(0)
    unfolded = trained_statistics(CASES[name][0]())
    folded = fold_batchnorm(copy.deepcopy(unfolded), strict=True)
    ours = convert_batchnorm(copy.deepcopy(unfolded), fuse_activation="fx").eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = copy.deepcopy(unfolded).double()(x.double())
        errors = {k: max_rel_err(m(x), want) for k, m in
                  (("unfolded", unfolded), ("folded", folded), ("ours", ours))}
    for k, err in errors.items():
        if not err <= 1e-4:
            raise RuntimeError(f"{name} {shape}: {k} is off by {err:.3g} (relative, vs float64)")
    t = H.compare({"unfolded": inference(unfolded, x), "folded": inference(folded, x),
                   "ours": inference(ours, x)}, "cpu", rounds, min_run_time, quiet)
    rows = []
    for pass_, key in (("folded", "folded"), ("ours-unfolded", "ours")):
        rows.append({
            "op": "fold", "case": f"{name} {H.shape_str(shape)}", "pass": pass_,
            "shape": H.shape_str(shape), "dtype": "float32", "memory_format": "nchw",
            "activation": CASES[name][2], "backend": "auto",
            "torch_ms": t["unfolded"].median * 1e3, "ours_ms": t[key].median * 1e3,
            "ratio": t["unfolded"].median / t[key].median,
            "torch_q20_ms": t["unfolded"].q20 * 1e3, "torch_q80_ms": t["unfolded"].q80 * 1e3,
            "ours_q20_ms": t[key].q20 * 1e3, "ours_q80_ms": t[key].q80 * 1e3,
            "torch_faults": t["unfolded"].faults, "ours_faults": t[key].faults,
            "ours_max_rel_err": errors[key], "torch_max_rel_err": errors["unfolded"],
            "allocation": "eval mode, torch.inference_mode(), fresh outputs",
            "others_cpu": t[key].others_cpu,
        })
    return rows


def markdown_table(rows) -> str:
    """One line per (network, input): the three timings and the two ratios."""
    cases: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        cases.setdefault(r["case"], {})[r["pass"]] = r
    r0 = rows[0]
    env = (f"{r0['device_name']}, {r0['threads']} threads, torch {r0['torch']}, batchnorm "
           f"{r0['batchnorm']}, {r0['date']}. Command: `{r0['command']}`")
    lines = ["| network | input (N,C,H,W) | unfolded, torch's BN ms | folded ms | "
             "**folded speed-up** | unfolded, our BN ms | torch's BN / ours |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, passes in cases.items():
        f, o = passes["folded"], passes["ours-unfolded"]
        lines.append(f"| {case.split()[0]} | {f['shape']} | {float(f['torch_ms']):.2f} | "
                     f"{float(f['ours_ms']):.2f} | **{float(f['ratio']):.2f}x** | "
                     f"{float(o['ours_ms']):.2f} | {float(o['ratio']):.2f} |")
    return env + "\n\n" + "\n".join(lines)


def update_doc(doc: Path, csv_path: Path) -> bool:
    text = doc.read_text()
    pattern = re.compile(rf"(<!-- bench-table: {re.escape(csv_path.stem)} -->\n).*?"
                         r"(<!-- /bench-table -->)", re.S)
    table = markdown_table(H.read_csv(csv_path))
    new, n = pattern.subn(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    if n:
        doc.write_text(new)
    return bool(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  .venv/bin/python benchmarks/bench_fold.py\n"
                                       "  .venv/bin/python benchmarks/bench_fold.py --quick")
    p.add_argument("--quick", action="store_true", help="small inputs, 2 short rounds")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path. Default: docs/benchmarks/cpu_fold.csv (--quick: .cache/...)")
    p.add_argument("--doc", type=Path, default=None,
                   help="markdown file whose 'bench-table: cpu_fold' markers get the table. "
                        "Default: docs/performance.md (not with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="Default: 5, --quick 2")
    p.add_argument("--min-run-time", type=float, default=None, help="Default: 0.5, --quick 0.1")
    p.add_argument("--max-others-cpu", type=float, default=0.1,
                   help="wait before each round until other processes use less than this "
                        "share of the CPUs; negative: never wait. Default: 0.1")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.5)
    quiet = args.max_others_cpu if args.max_others_cpu >= 0 else None
    out = args.out or (ROOT / (".cache/benchmarks" if args.quick else "docs/benchmarks")
                       / "cpu_fold.csv")
    doc = args.doc or (None if args.quick else ROOT / "docs/performance.md")
    env = H.environment("cpu")
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}", flush=True)
    rows, start = [], time.perf_counter()
    for name, (_, shapes, _) in CASES.items():
        for shape in (QUICK[name] if args.quick else shapes):
            for r in bench_case(name, shape, rounds, min_run_time, quiet):
                r.update(env)
                r["loadavg"] = H.environment("cpu")["loadavg"]
                rows.append(r)
                print(f"[{time.perf_counter() - start:4.0f}s] {r['case']:28s} {r['pass']:14s} "
                      f"unfolded {r['torch_ms']:8.2f} ms  {r['pass']} {r['ours_ms']:8.2f} ms  "
                      f"ratio {r['ratio']:.2f}", flush=True)
    path = H.write_csv(rows, out)
    print(f"\nwrote {path}")
    if doc is not None:
        print(f"{'updated' if update_doc(doc, path) else 'no cpu_fold markers in'} {doc}")
    print()
    print(markdown_table(H.read_csv(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
