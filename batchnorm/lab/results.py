"""What an experiment returns: plain data, no matplotlib, no HTML.

An :class:`ExperimentResult` holds the summary table and a list of
:class:`Figure` descriptions; :mod:`batchnorm.lab.plots` draws them and
:mod:`batchnorm.lab.report` writes the report. Everything here turns into JSON
with :meth:`ExperimentResult.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ExperimentResult", "Figure", "Panel", "Series"]


@dataclass
class Series:
    """One line (or one group of bars) in a panel.

    Attributes:
        label: legend entry.
        x: x values (numbers), or category names for bar panels.
        y: y values.
        lo, hi: optional band around ``y`` (percentile plots: 15th and 85th).
        dashed: draw a dashed line (e.g. training curves beside validation).
        group: series with the same group share a color (a run's training and
            validation curves); default: the label.
    """

    label: str
    x: list
    y: list
    lo: list | None = None
    hi: list | None = None
    dashed: bool = False
    group: str | None = None


@dataclass
class Panel:
    """One subplot.

    Attributes:
        title, xlabel, ylabel: the texts.
        series: what to draw.
        kind: ``"lines"`` or ``"bars"`` (grouped bars: one group per x category).
        logx, logy: logarithmic axes.
        ylim: optional ``(low, high)``.
    """

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    kind: str = "lines"
    logx: bool = False
    logy: bool = False
    ylim: tuple | None = None


@dataclass
class Figure:
    """A figure of one or more panels side by side, saved as ``{name}.png``.

    Attributes:
        name: file stem.
        title: shown above the figure in the report.
        caption: one sentence on what the figure shows.
        panels: the subplots.
    """

    name: str
    title: str
    caption: str
    panels: list[Panel]


@dataclass
class ExperimentResult:
    """An experiment's outcome.

    Attributes:
        experiment: the experiment's name (``compare``, ``placement``...).
        title: a headline for the report.
        claim: the statement about BN the experiment puts to the test.
        summary: table rows (dicts with the same keys, in column order).
        figures: what to plot.
        notes: findings in words (e.g. what a batch of one does).
        runs: label -> serialized :class:`~batchnorm.lab.train.RunResult`.
        command: the command line that reproduces the experiment.
        seconds: wall time of the whole experiment.
        lang: the language of the texts (``"en"``, ``"es"``): title, claim,
            notes and figures are written in it.
        display: how to show the summary in ``lang``: English key or text
            value -> its translation. The summary itself stays in English (its
            keys and text values are what machines read in ``metrics.json``
            and ``--json``); the report and the terminal table translate it
            through this map when they render it.
    """

    experiment: str
    title: str
    claim: str
    summary: list[dict]
    figures: list[Figure]
    notes: list[str] = field(default_factory=list)
    runs: dict = field(default_factory=dict)
    command: str = ""
    seconds: float = 0.0
    lang: str = "en"
    display: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
