"""Write an experiment's report: one self-contained ``report.html``, and a terminal table.

The page holds the title, the claim under test, the command that reproduces it,
the summary table, the findings, every figure (PNG embedded as a ``data:`` URI,
with its title and a sentence on what it shows) and the environment. It loads
nothing from outside and needs no JavaScript, so it opens offline and can be
mailed as one file. Every text is escaped.

The page is in the result's language (``result.lang``): its fixed headings come
from the catalogs of :mod:`batchnorm.lab.i18n`, and the summary's English keys
and text values are shown through ``result.display``.

Example:
    >>> print(format_summary_table([
    ...     {"model": "with BN", "final_val_acc": 0.9731, "seconds": 12.34},
    ...     {"model": "without BN", "final_val_acc": 0.912, "seconds": 9.0}]))
    model       final_val_acc  seconds
    ----------  -------------  -------
    with BN            97.3 %     12.3
    without BN         91.2 %      9.0
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import numbers
import re
import struct
from pathlib import Path

from .atomic import atomic_write_text
from .i18n import group_digits, translator
from .results import ExperimentResult

__all__ = ["format_summary_table", "format_value", "write_report"]

_SECONDS_KEY = re.compile(r"(second|(^|_)s$|(^|_)sec($|_)|(^|_)time($|_)|wall)", re.IGNORECASE)
_MISSING = "—"


def format_value(key: str, value, lang: str = "en") -> str:
    """One summary cell as text.

    Accuracies (a key containing ``acc``, a value in [0, 1]) become percentages,
    durations (``seconds``, ``wall_s``, ``time``...) get one decimal, ``None``
    is a dash, integers get thousands separators, other floats 4 significant digits.
    ``key`` is the English (machine) key; ``lang`` only changes how the text
    reads (Spanish: ``sí``/``no``, ``97.3 %``, ``50 000``).

    Example:
        >>> format_value("val_acc", 0.9731), format_value("wall_s", 3.14159)
        ('97.3 %', '3.1')
        >>> format_value("steps_to_97", None), format_value("steps", 50000)
        ('—', '50,000')
    """
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return translator(lang)("value.yes" if value else "value.no")
    if isinstance(value, numbers.Integral):
        return group_digits(f"{int(value):,}", lang)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if "acc" in key.lower() and 0.0 <= value <= 1.0:
            return f"{100.0 * value:.1f} %"
        if _SECONDS_KEY.search(key):
            return f"{value:.1f}"
        if abs(value) >= 1000:
            return group_digits(f"{value:,.0f}", lang)
        return f"{value:.4g}"
    return str(value)


def _columns(rows: list[dict]) -> list[str]:
    """The first row's keys in order, then any key a later row adds."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(key: str, value, display: dict, lang: str) -> str:
    if isinstance(value, str):
        return display.get(value, value)
    return format_value(key, value, lang)


def format_summary_table(rows: list[dict], *, display: dict | None = None,
                         lang: str = "en") -> str:
    """The summary rows as an aligned plain-text table for a terminal.

    Numbers are right-aligned, text left-aligned; a missing cell is a dash.

    Args:
        rows: the summary (English keys and text values).
        display: English key or text value -> what to show instead
            (:attr:`ExperimentResult.display`). Default: ``None``, shown as they are.
        lang: the language of yes/no and of number formats. Default: ``"en"``.

    Returns:
        The table, lines joined by ``\\n`` (no trailing newline); ``(no rows)`` when empty.
    """
    if not rows:
        return translator(lang)("report.no_rows")
    display = display or {}
    columns = _columns(rows)
    cells = [[_cell(c, row.get(c), display, lang) for c in columns] for row in rows]
    numeric = [all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
               for c in columns]
    headers = [display.get(c, c) for c in columns]
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line([h.ljust(w) if not num else h.rjust(w)
                 for h, w, num in zip(headers, widths, numeric, strict=True)]),
           "  ".join("-" * w for w in widths)]
    out += [line(values) for values in cells]
    return "\n".join(out)


# ---------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1d2330;
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 2rem 1.5rem 3rem; }
.kicker { margin: 0; color: #5a6475; font-size: .85rem; letter-spacing: .06em;
  text-transform: uppercase; }
h1 { margin: .2rem 0 .8rem; font-size: 1.9rem; line-height: 1.25; }
h2 { margin: 2.2rem 0 .7rem; font-size: 1.25rem; border-bottom: 1px solid #dde1e7;
  padding-bottom: .3rem; }
h3 { margin: 0 0 .6rem; font-size: 1.05rem; }
.claim { margin: 0; padding: .8rem 1rem; background: #eaf2fb; border-left: 4px solid #0072B2;
  border-radius: 4px; }
pre { margin: 0; padding: .8rem 1rem; background: #1d2330; color: #f1f3f6; border-radius: 6px;
  overflow-x: auto; font: 14px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas,
    "DejaVu Sans Mono", monospace; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; background: #fff; font-size: .95rem;
  box-shadow: 0 1px 2px rgba(0,0,0,.06); }
th, td { padding: .45rem .9rem; border-bottom: 1px solid #e6e9ee; white-space: nowrap; }
th { background: #eef0f4; text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f8fafc; }
ul.notes { padding-left: 1.3rem; }
ul.notes li { margin: .3rem 0; }
figure { margin: 0 0 1.6rem; padding: 1rem 1rem .8rem; background: #fff; border-radius: 8px;
  box-shadow: 0 1px 3px rgba(0,0,0,.08); }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { margin-top: .6rem; color: #3c4454; }
footer { margin-top: 2.5rem; padding-top: .8rem; border-top: 1px solid #dde1e7;
  color: #5a6475; font-size: .82rem; }
footer dl { display: flex; flex-wrap: wrap; gap: .2rem 1.6rem; margin: 0; }
footer dt { font-weight: 600; display: inline; }
footer dd { display: inline; margin: 0 0 0 .3rem; }
"""


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk; ``None`` if it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _duration(seconds) -> str:
    if not _is_number(seconds) or not math.isfinite(seconds):
        return str(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def _default_environment(result: ExperimentResult) -> dict:
    env: dict = {}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    env["date"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    env["wall time"] = result.seconds
    return env


def _environment_html(environment: dict, t) -> str:
    items = []
    for key, value in environment.items():
        if key == "wall time":
            value = _duration(value)
        name = t.get("env." + str(key).replace(" ", "_"), str(key))
        items.append(f"<div><dt>{html.escape(name)}</dt>"
                     f"<dd>{html.escape(str(value))}</dd></div>")
    return "<dl>" + "".join(items) + "</dl>"


def _table_html(rows: list[dict], display: dict, lang: str) -> str:
    if not rows:
        return f"<p>{html.escape(translator(lang)('report.no_rows'))}</p>"
    columns = _columns(rows)
    numeric = [all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
               for c in columns]
    head = "".join(f'<th{" class=num" if num else ""} scope="col">'
                   f"{html.escape(str(display.get(c, c)))}</th>"
                   for c, num in zip(columns, numeric, strict=True))
    body = []
    for row in rows:
        cells = "".join(
            f'<td{" class=num" if num else ""}>'
            f"{html.escape(_cell(str(c), row.get(c), display, lang))}</td>"
            for c, num in zip(columns, numeric, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _figure_html(figure, image: Path) -> str:
    data = Path(image).read_bytes()
    size = _png_size(data)
    if size is None:
        raise ValueError(f"{image}: not a PNG file")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    title = html.escape(figure.title or figure.name)
    return (f'<figure id="fig-{html.escape(figure.name)}"><h3>{title}</h3>'
            f'<img src="{uri}" alt="{title}" width="{size[0]}" height="{size[1]}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def _render_html(result: ExperimentResult, images: list[Path], environment: dict) -> str:
    esc = html.escape
    t = translator(result.lang)
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="{esc(result.lang)}"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(t('report.page_title', title=result.title))}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f'<header><p class="kicker">{esc(t("report.kicker", experiment=result.experiment))}</p>',
        f"<h1>{esc(result.title)}</h1>",
        f'<p class="claim"><strong>{esc(t("report.claim"))}</strong> {esc(result.claim)}</p>'
        "</header>",
    ]
    if result.command:
        parts.append(f"<section><h2>{esc(t('report.reproduce'))}</h2>"
                     f"<pre><code>{esc(result.command)}</code></pre></section>")
    table = _table_html(result.summary, result.display, result.lang)
    parts.append(f"<section><h2>{esc(t('report.summary'))}</h2>{table}</section>")
    if result.notes:
        notes = "".join(f"<li>{esc(note)}</li>" for note in result.notes)
        parts.append(f"<section><h2>{esc(t('report.findings'))}</h2>"
                     f'<ul class="notes">{notes}</ul></section>')
    if result.figures:
        parts.append(f"<section><h2>{esc(t('report.figures'))}</h2>")
        parts += [_figure_html(f, img) for f, img in zip(result.figures, images, strict=True)]
        parts.append("</section>")
    parts.append(f"<footer>{_environment_html(environment, t)}</footer>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def write_report(result: ExperimentResult, out_dir: Path, *, images: list[Path] | None = None,
                 environment: dict | None = None) -> Path:
    """Write ``out_dir/report.html``, self-contained, atomically.

    Args:
        result: what the experiment returned.
        out_dir: the run folder; created if needed.
        images: the PNG of each figure, in the order of ``result.figures``. Default:
            ``None``, which draws them with :func:`batchnorm.lab.plots.render_all`
            into ``out_dir``.
        environment: shown in the footer (``torch``, ``device``, ``date``, ``wall time``...);
            merged over defaults for the torch version, the date and ``result.seconds``.

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: ``images`` does not have one PNG per figure, or a file is not a PNG.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        from batchnorm.lab.plots import render_all  # matplotlib only when drawing

        images = render_all(result, out_dir)
    images = [Path(p) for p in images]
    if len(images) != len(result.figures):
        raise ValueError(f"images: {len(result.figures)} figures but {len(images)} images")
    env = _default_environment(result)
    for key, value in (environment or {}).items():
        key = str(key).replace("_", " ")
        env["wall time" if key in ("seconds", "wall s") else key] = value
    text = _render_html(result, images, env)

    path = out_dir / "report.html"
    atomic_write_text(path, text)
    return path
