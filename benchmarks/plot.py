"""Render a benchmark CSV: a markdown table and a PNG bar chart of the ratios.

The table and the chart are generated from the CSV only, so what the docs
show is what was measured. ``--doc`` rewrites the table between the markers
``<!-- bench-table: NAME -->`` and ``<!-- /bench-table -->`` in a markdown
file (``NAME`` is the CSV's file stem).

Examples:
    .venv/bin/python benchmarks/plot.py docs/benchmarks/cpu_batch_norm.csv
    .venv/bin/python benchmarks/plot.py docs/benchmarks/cpu_batch_norm.csv --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

PASSES = ("forward", "forward+backward", "eval")
_SHORT = {"forward": "fwd", "forward+backward": "step", "eval": "eval"}
_FMT = {"nchw": "NCHW", "channels_last": "NHWC"}
_DT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _group(rows):
    """Rows keyed by case, each with its passes, in CSV order."""
    cases: OrderedDict[str, dict[str, dict[str, str]]] = OrderedDict()
    for r in rows:
        cases.setdefault(r["case"], {})[r["pass"]] = r
    return cases


def _label(r):
    return (f"{r['shape']} {_FMT.get(r['memory_format'], r['memory_format'])} "
            f"{_DT.get(r['dtype'], r['dtype'])}{_EPILOGUE.get(r['activation'], '')}")


_EPILOGUE = {"relu": " +relu", "add_relu": " +add+relu"}


def environment_line(rows) -> str:
    r = rows[0]
    return (f"{r['device_name']}, {r['threads']} threads, torch {r['torch']}, batchnorm "
            f"{r['batchnorm']} (backend `{r['backend']}`), {r['date']}; "
            f"allocation: {r['allocation']}. Command: `{r['command']}`")


def markdown_table(rows) -> str:
    """One line per case: torch and our milliseconds per call and the ratio, per pass.

    ``ratio = torch / ours``: above 1 we are faster.
    """
    head = ["shape (N,C,H,W)", "layout", "dtype", "act"]
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    for p in passes:
        short = _SHORT[p]
        head += [f"{short} torch ms", f"{short} ours ms", f"{short} ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (3 * len(passes))]
    for case in _group(rows).values():
        any_row = next(iter(case.values()))
        cells = [any_row["shape"], _FMT.get(any_row["memory_format"], any_row["memory_format"]),
                 _DT.get(any_row["dtype"], any_row["dtype"]), any_row["activation"]]
        for p in passes:
            r = case.get(p)
            if r is None:
                cells += ["", "", ""]
                continue
            cells += [f"{float(r['torch_ms']):.3f}", f"{float(r['ours_ms']):.3f}",
                      f"**{float(r['ratio']):.2f}**" if float(r["ratio"]) >= 1
                      else f"{float(r['ratio']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return (environment_line(rows) + "\n\n" + summary_table(rows, passes) + "\n\n"
            + "\n".join(lines))


def summary_table(rows, passes) -> str:
    """Geometric mean and worst ratio per layout, dtype and epilogue, per pass."""
    groups: OrderedDict[tuple, dict[str, list[float]]] = OrderedDict()
    for r in rows:
        key = (r["memory_format"], r["dtype"], r["activation"])
        groups.setdefault(key, {}).setdefault(r["pass"], []).append(float(r["ratio"]))
    head = ["layout", "dtype", "epilogue"] + [f"{_SHORT[p]} geomean (worst)" for p in passes]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(passes)]
    for (fmt, dt, act), by_pass in groups.items():
        cells = [_FMT.get(fmt, fmt), _DT.get(dt, dt), act]
        for p in passes:
            v = by_pass.get(p)
            if not v:
                cells.append("")
                continue
            gm = math.exp(sum(math.log(x) for x in v) / len(v))
            cells.append(f"**{gm:.2f}** ({min(v):.2f})" if gm >= 1 else f"{gm:.2f} ({min(v):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ratios(rows, png: str | Path) -> Path | None:
    """Horizontal bars of torch/ours per case, one panel per pass; ``None`` without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = _group(rows)
    labels = [_label(next(iter(c.values()))) for c in cases.values()]
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(4 * len(passes), 0.22 * len(labels) + 1.6),
                             sharey=True)
    colors = {("nchw", "float32"): "#4c72b0", ("channels_last", "float32"): "#55a868",
              ("nchw", "bfloat16"): "#c44e52", ("channels_last", "bfloat16"): "#8172b2"}
    for ax, p in zip(axes, passes, strict=True):
        ratios, cols = [], []
        for c in cases.values():
            r = c.get(p)
            ratios.append(float(r["ratio"]) if r else float("nan"))
            key = (r["memory_format"], r["dtype"]) if r else None
            cols.append(colors.get(key, "#999999"))
        y = range(len(labels))
        ax.barh(list(y), ratios, color=cols)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xscale("log")
        lo = min([v for v in ratios if v == v] + [1.0])
        hi = max([v for v in ratios if v == v] + [1.0])
        ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10) if lo / 2 <= t <= hi * 2]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{p}: torch time / our time (> 1: ours faster)", fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    from matplotlib.patches import Patch

    names = {"nchw": "NCHW", "channels_last": "NHWC", "float32": "fp32", "bfloat16": "bf16"}
    fig.legend(handles=[Patch(color=c, label=f"{names[f]} {names[d]}")
                        for (f, d), c in colors.items()], fontsize=8, loc="lower center", ncol=4)
    axes[0].set_yticks(list(range(len(labels))), labels)
    axes[0].invert_yaxis()
    r0 = rows[0]
    fig.suptitle(f"batch_norm, {r0['device_name']}, {r0['threads']} threads, torch {r0['torch']}, "
                 f"{r0['date'][:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def update_doc(doc: str | Path, csv_path: str | Path) -> bool:
    """Replace the table between the markers for ``csv_path``'s stem; ``False`` if none."""
    return replace_block(doc, Path(csv_path).stem, markdown_table(H.read_csv(csv_path)))


def replace_block(doc: str | Path, name: str, text: str) -> bool:
    """Put ``text`` between ``<!-- bench-table: name -->`` and its end marker in
    ``doc``; ``False`` if the marker is not there."""
    doc = Path(doc)
    old = doc.read_text()
    pattern = re.compile(rf"(<!-- bench-table: {re.escape(name)} -->\n).*?(<!-- /bench-table -->)",
                         re.S)
    new, n = pattern.subn(lambda m: m.group(1) + text + "\n" + m.group(2), old)
    if n:
        doc.write_text(new)
    return bool(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render a benchmark CSV as a markdown table and a "
                                "PNG.", epilog=__doc__.split("Examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path)
    p.add_argument("--png", type=Path, default=None, help="Default: the CSV's path, .png")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--doc", type=Path, default=None,
                   help="markdown file whose bench-table markers get the table")
    args = p.parse_args(argv)
    rows = H.read_csv(args.csv)
    if not rows:
        print(f"error: {args.csv} has no rows", file=sys.stderr)
        return 1
    if not args.no_png:
        out = plot_ratios(rows, args.png or args.csv.with_suffix(".png"))
        if out:
            print(f"wrote {out}", file=sys.stderr)
    if args.doc:
        if not update_doc(args.doc, args.csv):
            print(f"error: no '<!-- bench-table: {args.csv.stem} -->' marker in {args.doc}",
                  file=sys.stderr)
            return 1
        print(f"updated {args.doc}", file=sys.stderr)
    else:
        print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
