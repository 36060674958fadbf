"""Tests for ``batchnorm.lab.plots`` and ``batchnorm.lab.report``.

A small :class:`ExperimentResult` is built by hand (line panels with bands and
dashed series, a bar panel, log axes, a title that tries to inject a script),
drawn, and written as a report. The report is then opened in headless Chromium
(Debian's ``chromium``; ``make test`` installs it with
``scripts/install_chromium.sh``) to check that every embedded image loads.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

from batchnorm.lab import plots, report  # noqa: E402
from batchnorm.lab.plots import PALETTE, render_all, render_figure  # noqa: E402
from batchnorm.lab.report import format_summary_table, format_value, write_report  # noqa: E402
from batchnorm.lab.results import ExperimentResult, Figure, Panel, Series  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"

# ------------------------------------------------------------------ the result


def _curve(steps, start, rate, seed):
    rng = np.random.default_rng(seed)
    y = start * np.exp(-rate * steps) + 0.02 + 0.01 * rng.random(len(steps))
    return y.tolist()


def make_result() -> ExperimentResult:
    steps = np.arange(0, 500, 10)
    bn = _curve(steps, 2.3, 0.02, 0)
    plain = _curve(steps, 2.3, 0.006, 1)
    loss = Panel(
        "Validation loss", "step", "cross-entropy (log)",
        [
            Series("with BN", steps.tolist(), bn, lo=[v * 0.8 for v in bn],
                   hi=[v * 1.25 for v in bn]),
            Series("without BN", steps.tolist(), plain, lo=[v * 0.8 for v in plain],
                   hi=[v * 1.25 for v in plain]),
            Series("with BN (train)", steps.tolist(), [v * 0.9 for v in bn], dashed=True),
        ],
        logy=True,
    )
    acc = Panel(
        "Validation accuracy", "step", "accuracy",
        [
            Series("with BN", steps.tolist(), [1 - v / 2.5 for v in bn]),
            Series("without BN", steps.tolist(), [1 - v / 2.5 for v in plain]),
            Series("without BN (train)", steps.tolist(), [1 - v / 2.6 for v in plain],
                   dashed=True),
        ],
        ylim=(0.0, 1.0),
    )
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    sweep = Panel(
        "Learning-rate sweep", "learning rate", "final accuracy",
        [Series("with BN", lrs, [0.90, 0.95, 0.97, 0.96]),
         Series("without BN", lrs, [0.80, 0.91, 0.60, None])],  # None: diverged
        logx=True,
    )
    bars = Panel(
        "Final accuracy", "placement", "accuracy",
        [Series("with BN", ["after ReLU", "before ReLU", "none"], [0.973, 0.968, None]),
         Series("without BN", ["none"], [0.912])],
        kind="bars",
    )
    return ExperimentResult(
        experiment="compare",
        title=f"BN vs no BN {EVIL}",
        claim="BN speeds up training & lets you use higher rates <really>.",
        summary=[
            {"model": "with BN", "final_val_acc": 0.9731, "seconds": 12.34,
             "steps_to_95": 1200, "best_loss": 0.052349},
            {"model": "without <BN>", "final_val_acc": 0.912, "seconds": 9.0,
             "steps_to_95": None, "best_loss": 0.1},
        ],
        figures=[
            Figure("curves", "Training curves", "Loss and accuracy per step; bands are "
                   "15th-85th percentiles over seeds.", [loss, acc]),
            Figure("final", f"Final numbers {EVIL}", "Grouped bars: <b>not bold</b>.",
                   [bars, sweep]),
            Figure("four", "Four panels wrap to two rows", "Two rows of two.",
                   [acc, loss, bars, sweep]),
        ],
        notes=["A batch of one in train mode gives garbage.", f"Escaped {EVIL}"],
        command="batchnorm lab compare --steps 500 --seed 0",
        seconds=21.5,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ plots


def test_render_all_writes_valid_pngs(tmp_path):
    result = make_result()
    paths = render_all(result, tmp_path / "run")
    assert [p.name for p in paths] == ["curves.png", "final.png", "four.png"]
    for path in paths:
        width, height = png_size(path)
        pixels = mpimg.imread(path)  # decodes every chunk: a truncated file fails here
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 0.05, f"{path.name} looks blank"
    # Two panels side by side are wide; four panels wrap to a 2x2 grid.
    w, h = png_size(paths[0])
    assert 900 <= w <= 2400 and 350 <= h <= 800 and w > 1.8 * h
    w4, h4 = png_size(paths[2])
    assert abs(w4 - w) < 0.1 * w and h4 > 1.7 * h
    assert no_temp_files(tmp_path / "run")


def test_render_is_deterministic(tmp_path):
    figure = make_result().figures[1]
    a = render_figure(figure, tmp_path / "a.png").read_bytes()
    b = render_figure(figure, tmp_path / "b.png", dpi=110).read_bytes()
    assert a == b
    w, _ = png_size(render_figure(figure, tmp_path / "c.png", dpi=55))
    assert abs(w - png_size(tmp_path / "a.png")[0] / 2) <= 2


def _share_near(pixels: np.ndarray, hex_color: str, tol: float = 0.08) -> float:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels[..., :3] - rgb).max(axis=-1) < tol).mean())


def test_same_label_same_color_across_panels(tmp_path):
    # "B" is the first series of the right panel: per-panel color cycling would make
    # it blue; one color per label over the figure makes it vermillion.
    x = list(range(20))
    figure = Figure("colors", "", "", [
        Panel("left", "x", "y", [Series("A", x, x), Series("B", x, x[::-1])]),
        Panel("right", "x", "y", [Series("B", x, x)]),
    ])
    pixels = mpimg.imread(render_figure(figure, tmp_path / "colors.png"))
    right = pixels[:, pixels.shape[1] // 2:]
    assert _share_near(right, PALETTE[1]) > 0.002
    assert _share_near(right, PALETTE[0]) < 0.0002
    assert len(set(PALETTE)) == len(PALETTE) >= 8


@pytest.mark.parametrize("bad", ["kind", "lengths", "band"])
def test_render_rejects_bad_figures_and_writes_nothing(tmp_path, bad):
    series = Series("A", [1, 2, 3], [1, 2, 3])
    panel = Panel("p", "x", "y", [series])
    if bad == "kind":
        panel.kind = "pie"
    elif bad == "lengths":
        series.y = [1, 2]
    else:
        series.lo, series.hi = [0, 1], [2, 3]
    with pytest.raises(ValueError, match="'p'"):
        render_figure(Figure("bad", "t", "c", [panel]), tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_render_is_atomic(tmp_path, monkeypatch):
    figure = make_result().figures[0]
    path = render_figure(figure, tmp_path / "curves.png")
    before = path.read_bytes()

    def boom(src, dst):
        assert Path(src).parent == Path(dst).parent  # a rename in the same folder
        assert png_size(Path(src))[0] > 100  # the whole PNG was written first
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        render_figure(make_result().figures[1], path)
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_render_leaves_pyplot_and_backend_alone(tmp_path):
    # The user's backend (here "svg", from MPLBACKEND) is not switched to Agg, and
    # pyplot, with its global figure list, is never imported.
    code = textwrap.dedent(f"""
        import sys, matplotlib
        from pathlib import Path
        from batchnorm.lab.plots import render_figure
        from batchnorm.lab.results import Figure, Panel, Series
        fig = Figure("f", "t", "c", [Panel("p", "x", "y", [Series("a", [1, 2], [3, 4])])])
        render_figure(fig, Path({str(tmp_path / "f.png")!r}))
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
    """)
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env["MPLBACKEND"] = "svg"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]  # no font or backend warnings
    assert png_size(tmp_path / "f.png")[0] > 100


# ------------------------------------------------------------------ terminal table


@pytest.mark.parametrize(("key", "value", "text"), [
    ("final_val_acc", 0.9731, "97.3 %"),
    ("val_acc", 1.0, "100.0 %"),
    ("acc_gap", -0.02, "-0.02"),  # not a fraction in [0, 1]: not a percentage
    ("seconds", 12.34, "12.3"),
    ("wall_s", 3.0, "3.0"),
    ("train_time", 0.26, "0.3"),
    ("steps_to_95", None, "—"),
    ("steps", 50000, "50,000"),
    ("steps", np.int64(7), "7"),
    ("loss", np.float32(0.5), "0.5"),
    ("loss", 0.052349, "0.05235"),
    ("lr", 1e-4, "0.0001"),
    ("loss", float("nan"), "NaN"),
    ("bn", True, "yes"),
    ("model", "with BN", "with BN"),
])
def test_format_value(key, value, text):
    assert format_value(key, value) == text


def test_format_summary_table_aligns_columns():
    rows = make_result().summary
    lines = format_summary_table(rows).splitlines()
    assert lines[0].split() == list(rows[0])
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + len(rows)
    body = lines[2:]
    assert "97.3 %" in body[0] and "91.2 %" in body[1]
    assert "12.3" in body[0] and "1,200" in body[0] and "—" in body[1]
    # Text left-aligned, numbers right-aligned: the accuracy column ends at the same place.
    assert body[0].index("97.3 %") + 6 == body[1].index("91.2 %") + 6
    assert body[0].startswith("with BN ") and body[1].startswith("without <BN>")
    assert format_summary_table([]) == "(no rows)"


def test_format_summary_table_takes_the_union_of_keys():
    text = format_summary_table([{"a": 1}, {"a": 2, "b": 0.5}])
    assert text.splitlines()[0].split() == ["a", "b"]
    assert "—" in text.splitlines()[2]


# ------------------------------------------------------------------ report.html


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(result, images, report path), drawn once: the tests below only read them."""
    result = make_result()
    out = tmp_path_factory.mktemp("run")
    images = render_all(result, out)
    path = write_report(result, out, images=images,
                        environment={"device": "cpu", "torch": torch.__version__,
                                     "wall_time": 21.5})
    return result, images, path


def test_report_embeds_every_figure(written):
    result, images, path = written
    assert path.name == "report.html"
    text = path.read_text(encoding="utf-8")
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == len(result.figures) == 3
    for uri, image in zip(uris, images, strict=True):
        assert base64.b64decode(uri) == image.read_bytes()
    for image in images:
        w, h = png_size(image)
        assert f'width="{w}" height="{h}"' in text


def test_report_text_summary_and_escaping(written):
    result, _, path = written
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text and "<b>" not in text
    assert "higher rates &lt;really&gt;" in text and "&amp; lets" in text
    assert "<code>batchnorm lab compare --steps 500 --seed 0</code>" in text
    for cell in ["97.3 %", "91.2 %", "12.3", "9.0", "1,200", "—", "0.05235",
                 "without &lt;BN&gt;"]:
        assert f">{cell}</td>" in text, cell
    header = re.findall(r"<th[^>]*>([^<]*)</th>", text)
    assert header == list(result.summary[0])
    assert "A batch of one in train mode gives garbage." in text
    for figure in result.figures:
        assert figure.caption.replace("<b>", "&lt;b&gt;").replace("</b>", "&lt;/b&gt;") in text
    assert "Loss and accuracy per step" in text
    footer = text[text.index("<footer>"):]
    assert torch.__version__ in footer and ">cpu<" in footer and "21.5 s" in footer
    assert "wall time" in footer and re.search(r">20\d\d-\d\d-\d\d", footer)


def test_report_is_self_contained(written):
    text = written[2].read_text(encoding="utf-8")
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "http://" not in text and "https://" not in text


def test_report_renders_the_figures_when_no_images_are_given(tmp_path):
    result = make_result()
    path = write_report(result, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == [
        "curves.png", "final.png", "four.png"]
    assert path.read_text(encoding="utf-8").count("data:image/png;base64,") == 3


def test_report_checks_images(tmp_path):
    result = make_result()
    images = render_all(result, tmp_path)
    with pytest.raises(ValueError, match="3 figures but 2 images"):
        write_report(result, tmp_path, images=images[:2])
    (tmp_path / "fake.png").write_bytes(b"GIF89a not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(result, tmp_path, images=[*images[:2], tmp_path / "fake.png"])
    assert not (tmp_path / "report.html").exists()


def test_report_without_figures_notes_or_command(tmp_path):
    result = ExperimentResult("modes", "Modes", "Eval mode differs.", [], [])
    text = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert "(no rows)" in text and "<img" not in text and "Reproduce" not in text
    assert "Findings" not in text


def test_report_is_written_atomically(tmp_path, monkeypatch):
    result = make_result()
    images = render_all(result, tmp_path)

    def boom(src, dst):
        assert Path(src).parent == Path(dst).parent == tmp_path  # same folder: a rename
        assert Path(src).stat().st_size > 1000  # the whole page was written first
        raise OSError("interrupted (simulated)")

    # No previous report: nothing appears.
    with monkeypatch.context() as m:
        m.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="simulated"):
            write_report(result, tmp_path, images=images)
    assert not (tmp_path / "report.html").exists()
    assert no_temp_files(tmp_path)

    # A previous report stays intact.
    path = write_report(result, tmp_path, images=images)
    before = path.read_bytes()
    result.title = "A different title"
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_report(result, tmp_path, images=images)
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_report_module_does_not_need_matplotlib():
    # The CLI prints the summary table without drawing anything.
    code = ("import sys; import batchnorm.lab.report as r; "
            "r.format_summary_table([{'a': 1}]); "
            "assert 'matplotlib' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.__name__ and plots.__name__


# ------------------------------------------------------------------ in a real browser

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Chromium: run scripts/install_chromium.sh (Debian package chromium)")

# Runs in a copy of report.html (never the original): after the page's load event,
# counts the images and those that decoded, and writes both into the DOM.
_CHECK_SCRIPT = """
<script>
(() => {
  const report = () => {
    const imgs = [...document.images];
    const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0);
    const out = document.createElement("pre");
    out.id = "bn-check";
    out.textContent = `images=${imgs.length} loaded=${loaded.length} sizes=` +
      imgs.map(i => `${i.naturalWidth}x${i.naturalHeight}`).join(",");
    document.body.append(out);
  };
  if (document.readyState === "complete") report(); else addEventListener("load", report);
})();
</script>
"""


def run_chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


def images_loaded_in_chromium(report_path: Path, tmp_path: Path) -> tuple[int, int, list[str]]:
    page = report_path.read_text(encoding="utf-8")
    assert page.count("</body>") == 1
    check = report_path.with_name("check.html")
    check.write_text(page.replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom = run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    found = re.search(r'id="bn-check">images=(\d+) loaded=(\d+) sizes=([0-9x,]*)<', dom)
    assert found, f"check script did not report; DOM tail:\n{dom[-2000:]}"
    return int(found[1]), int(found[2]), [s for s in found[3].split(",") if s]


@needs_chromium
def test_report_images_load_in_chromium(written, tmp_path):
    result, images, path = written
    original = path.read_bytes()
    n, loaded, sizes = images_loaded_in_chromium(path, tmp_path)
    assert n == loaded == len(result.figures)
    assert sizes == ["{}x{}".format(*png_size(p)) for p in images]
    assert path.read_bytes() == original  # the check ran in a copy


@needs_chromium
def test_chromium_check_notices_a_broken_image(written, tmp_path):
    # The check must be able to fail: corrupt one embedded PNG in a copy.
    result, _, path = written
    text = path.read_text(encoding="utf-8")
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = path.with_name("broken.html")
    broken.write_text(text[:start] + "AAAA" + text[start + 4:], encoding="utf-8")
    n, loaded, _ = images_loaded_in_chromium(broken, tmp_path)
    assert n == len(result.figures) and loaded == n - 1


@needs_chromium
def test_report_screenshot_in_chromium(written, tmp_path):
    path = written[2]
    shot = tmp_path / "report-screenshot.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri())
    assert png_size(shot) == (1280, 2000)
    pixels = mpimg.imread(shot)
    assert shot.stat().st_size > 50_000 and pixels.std() > 0.05
    # The first figure (Okabe-Ito blue lines) is on screen, not just the page's text.
    assert _share_near(pixels, PALETTE[0]) > 0.001
