"""Draw an experiment's :class:`~batchnorm.lab.results.Figure` descriptions as PNG files.

Each :class:`~batchnorm.lab.results.Figure` becomes one PNG with its panels side
by side (two rows past three panels). ``"lines"`` panels draw every series, dashed
where asked, with a shaded band between ``lo`` and ``hi``; ``"bars"`` panels draw
grouped bars with their values on top (hatched where ``dashed``). A label keeps
its color in every panel of a figure, from the Okabe-Ito palette (readable with
the common forms of color blindness).

Matplotlib is driven through :class:`matplotlib.figure.Figure` and the Agg canvas
directly, never ``pyplot``: nothing touches the user's backend or global figure
list, no display is needed, and one call cannot leak state into the next.

The texts (titles, axis labels, legends) arrive translated in the ``Figure``;
the one text drawn here, an empty panel's "no data", comes from the catalog of
the figure's language (:mod:`batchnorm.lab.i18n`).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from batchnorm.lab.results import Figure, Panel, Series
    >>> fig = Figure("loss", "Training loss", "Loss per step.", [
    ...     Panel("Loss", "step", "loss", [Series("BN", [0, 1, 2], [2.3, 1.1, 0.6])])])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     render_figure(fig, Path(d) / "loss.png").name
    'loss.png'
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import NullLocator

from .atomic import atomic_write_bytes
from .i18n import translator
from .results import ExperimentResult, Figure, Panel

__all__ = ["PALETTE", "render_all", "render_figure"]

# Okabe & Ito (2008), "Color Universal Design": distinguishable with protanopia,
# deuteranopia and tritanopia. Yellow goes last: it is faint on white.
PALETTE = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)

_PANEL_SIZE = (5.2, 3.9)  # inches per panel
_MAX_MARKED_POINTS = 12  # sweeps (few points) get markers, curves (many) do not


def _color_map(figure: Figure) -> dict[str, str]:
    """Color key (``group``, else label) -> color, in order of first appearance."""
    colors: dict[str, str] = {}
    for panel in figure.panels:
        for series in panel.series:
            if _key(series) not in colors:
                colors[_key(series)] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def _key(series) -> str:
    return series.group or series.label


def _floats(values) -> np.ndarray:
    """Numbers as float64 with ``None`` -> NaN (a diverged run, a missing point)."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _short(value: float) -> str:
    """A value label that fits on top of a bar."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _draw_lines(ax, panel: Panel, colors: dict[str, str]) -> None:
    for series in panel.series:
        x, y = _floats(series.x), _floats(series.y)
        if len(x) != len(y):
            raise ValueError(f"series {series.label!r} in panel {panel.title!r}: "
                             f"{len(x)} x values but {len(y)} y values")
        color = colors[_key(series)]
        marker = "o" if 0 < len(x) <= _MAX_MARKED_POINTS else None
        ax.plot(x, y, color=color, linestyle="--" if series.dashed else "-", linewidth=1.8,
                marker=marker, markersize=4, label=series.label)
        if series.lo is not None and series.hi is not None:
            lo, hi = _floats(series.lo), _floats(series.hi)
            if not len(lo) == len(hi) == len(x):
                raise ValueError(f"series {series.label!r} in panel {panel.title!r}: band "
                                 f"lo/hi need {len(x)} values, got {len(lo)} and {len(hi)}")
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
    if panel.logx:
        # A sweep (batch sizes, learning rates): label the values that were run,
        # not powers of ten.
        values = sorted({float(v) for s in panel.series for v in s.x if v is not None})
        if 0 < len(values) <= _MAX_MARKED_POINTS:
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.xaxis.set_minor_locator(NullLocator())


def _draw_bars(ax, panel: Panel, colors: dict[str, str]) -> None:
    categories: list[str] = []
    for series in panel.series:
        for name in series.x:
            if str(name) not in categories:
                categories.append(str(name))
    where = {name: i for i, name in enumerate(categories)}
    n = max(len(panel.series), 1)
    width = 0.8 / n
    for k, series in enumerate(panel.series):
        if len(series.x) != len(series.y):
            raise ValueError(f"series {series.label!r} in panel {panel.title!r}: "
                             f"{len(series.x)} categories but {len(series.y)} values")
        offset = (k - (n - 1) / 2) * width
        pos = np.array([where[str(name)] for name in series.x], dtype=np.float64) + offset
        heights = _floats(series.y)
        ok = np.isfinite(heights)  # a missing value is a missing bar, not a zero
        bars = ax.bar(pos[ok], heights[ok], width=width * 0.92, color=colors[_key(series)],
                      label=series.label,
                      hatch="//" if series.dashed else None, edgecolor="white", linewidth=0.5)
        ax.bar_label(bars, labels=[_short(h) for h in heights[ok]], padding=2,
                     fontsize=8 if n <= 3 else 7)
    ax.set_xticks(range(len(categories)), categories,
                  rotation=30 if sum(len(c) for c in categories) > 40 else 0,
                  ha="right" if sum(len(c) for c in categories) > 40 else "center")
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.grid(False, axis="x")
    if not panel.logy:
        # Room above the tallest bar for its value label and a one-row legend.
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + (0.22 if n <= 5 else 0.35) * (high - low))


def _draw_panel(ax, panel: Panel, colors: dict[str, str], lang: str = "en") -> None:
    if panel.kind not in ("lines", "bars"):
        raise ValueError(f"panel {panel.title!r}: kind must be 'lines' or 'bars', "
                         f"got {panel.kind!r}")
    ax.grid(True, which="major", alpha=0.35, linewidth=0.7)
    ax.set_axisbelow(True)
    if panel.logx and panel.kind == "lines":
        ax.set_xscale("log")
    if panel.logy:
        ax.set_yscale("log")
    if panel.kind == "lines":
        _draw_lines(ax, panel, colors)
    else:
        _draw_bars(ax, panel, colors)
    if panel.ylim is not None:
        low, high = panel.ylim
        if panel.kind == "bars":  # keep the headroom made for the value labels
            high = max(high, ax.get_ylim()[1])
        ax.set_ylim(low, high)
    ax.set_title(panel.title, fontsize=11, fontweight="bold")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    if not panel.series:
        ax.text(0.5, 0.5, translator(lang)("plot.no_data"), transform=ax.transAxes,
                ha="center", va="center", color="0.5")
    elif any(s.label for s in panel.series) and not (panel.kind == "bars"
                                                     and len(panel.series) == 1):
        # (One series of bars needs no legend: the title names it.)
        many = len(panel.series) > 5
        if panel.kind == "bars":
            # One row across the top, in the headroom left above the bars.
            ax.legend(fontsize=8.5 if len(panel.series) <= 3 else 7.5,
                      ncol=min(len(panel.series), 5), handlelength=1.2, columnspacing=1.0,
                      frameon=True, framealpha=0.85, loc="upper center")
        else:
            ax.legend(fontsize=7.5 if many else 8.5, ncol=2 if many else 1, frameon=True,
                      framealpha=0.85, loc="best")


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns): side by side up to three panels, then two rows."""
    if n <= 3:
        return 1, max(n, 1)
    return 2, math.ceil(n / 2)


def render_figure(figure: Figure, path: Path, *, dpi: int = 110, lang: str = "en") -> Path:
    """Draw ``figure`` as a PNG at ``path``, written atomically.

    Args:
        figure: the description (panels of series).
        path: where the PNG goes; its folder is created if needed.
        dpi: resolution. Default: ``110`` (a 3-panel figure is about 1700 x 470 pixels).
        lang: the language of the figure's texts. Default: ``"en"``.

    Returns:
        ``path``.

    Raises:
        ValueError: a panel of unknown kind, or series whose lengths disagree.
    """
    path = Path(path)
    rows, cols = _grid(len(figure.panels))
    fig = MplFigure(figsize=(_PANEL_SIZE[0] * cols, _PANEL_SIZE[1] * rows + 0.45),
                    layout="constrained")
    FigureCanvasAgg(fig)
    fig.set_facecolor("white")
    colors = _color_map(figure)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, figure.panels, strict=False):
        _draw_panel(ax, panel, colors, lang)
    for ax in axes[len(figure.panels):]:
        ax.set_visible(False)
    if figure.title:
        fig.suptitle(figure.title, fontsize=13, fontweight="bold")
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" chunk: no version string, so a rerun on the same machine is byte-identical.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def render_all(result: ExperimentResult, out_dir: Path) -> list[Path]:
    """Draw every figure of ``result`` as ``out_dir/{figure.name}.png``.

    Returns:
        The PNG paths, in the order of ``result.figures``.
    """
    out_dir = Path(out_dir)
    return [render_figure(figure, out_dir / f"{figure.name}.png", lang=result.lang)
            for figure in result.figures]
