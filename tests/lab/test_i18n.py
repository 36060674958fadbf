"""The lab in English and Spanish: catalogs, reports, terminal output, the default language.

The cross-language check reads the visible text of a report (and every text of
its figures) and looks for the *other* language's catalog texts: a fragment of
an English text that differs from its Spanish translation must not appear in
a Spanish report, and the other way round. A test breaks a Spanish report on
purpose to show the check can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import string
import subprocess
import sys
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab import runner as runner_mod
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.i18n import LANGUAGES, catalog, default_language, group_digits, translator
from batchnorm.lab.report import format_summary_table, format_value, write_report
from batchnorm.lab.runner import LabConfig, run_experiment

REPO = Path(__file__).resolve().parents[2]
EN, ES = catalog("en"), catalog("es")
OTHER = {"en": "es", "es": "en"}
LOCALE_VARS = ("LC_ALL", "LC_MESSAGES", "LANG")
# Reports checked for the other language's text: curves, bands and notes in both
# languages; bars of translated conditions in Spanish (modes re-evaluates its model
# for every report, which is slow).
CHECKED = (("compare", "en"), ("compare", "es"), ("distributions", "en"),
           ("distributions", "es"), ("modes", "es"))


def _fields(text: str) -> set[tuple[str, str | None]]:
    """The named placeholders of a format string, with their conversions (``!r``)."""
    return {(name, conversion) for _, name, _, conversion in string.Formatter().parse(text)
            if name is not None}


# ------------------------------------------------------------------ the catalogs


def test_every_key_is_in_both_languages():
    assert LANGUAGES == ("en", "es")
    only_en, only_es = sorted(set(EN) - set(ES)), sorted(set(ES) - set(EN))
    assert not only_en, f"keys missing from es.py: {only_en}"
    assert not only_es, f"keys missing from en.py: {only_es}"
    assert all(isinstance(v, str) and v.strip() for c in (EN, ES) for v in c.values())


def test_placeholders_match_between_languages():
    differ = {key: (EN[key], ES[key]) for key in EN if _fields(EN[key]) != _fields(ES.get(key, ""))}
    assert not differ, f"placeholders differ: {differ}"
    unnamed = {key: text for key, text in EN.items()
               if not all(name.isidentifier() for name, _ in _fields(text))}
    assert not unnamed, f"placeholders must be named: {unnamed}"


def _sample(name: str):
    return {"label": "BN", "experiments": "  compare  ...", "path": "runs/x/report.html"}.get(
        name, 0.5)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_text_formats(lang):
    t = translator(lang)
    for key, text in t.messages.items():
        out = t(key, **{name: _sample(name) for name, _ in _fields(text)})
        assert "{" not in out and "}" not in out, (lang, key, out)


def _source_texts() -> str:
    package = REPO / "batchnorm"
    files = [*(package / "lab").rglob("*.py"), *(package / "cli").glob("*.py")]
    return "\n".join(p.read_text(encoding="utf-8") for p in files
                     if "locales" not in p.parts)


def test_every_key_the_code_asks_for_exists_and_every_key_is_used():
    source = _source_texts()
    # t("key"), lab.t("key"), term("key"), col("key"), t.get("key", ...): a dotted literal key.
    asked = set(re.findall(r"""(?:(?<![\w.])(?:t|term|col)|\bt\.get|\blab\.(?:t|term))"""
                           r"""\(\s*["']([a-z][\w\-]*(?:\.[\w\-]+)+)["']""", source))
    assert asked, "the scan found no key: the pattern is out of date"
    assert len(asked) > 50, sorted(asked)
    assert not sorted(k for k in asked if k not in EN)
    # Keys built at run time: <experiment>.title/.claim/.description, env.<name>,
    # cli.help.<option>, the paper figures' validation/test variants.
    names = "|".join(map(re.escape, EXPERIMENTS))
    dynamic = re.compile(rf"^(?:(?:{names})\.(?:title|claim|description)|env\..+|cli\.help\..+|"
                         r"paper\.accuracy_(?:figure|caption)\.(?:validation|test))$")
    unused = sorted(k for k in EN if not dynamic.match(k)
                    and f'"{k}"' not in source and f"'{k}'" not in source)
    assert not unused, f"catalog keys no code uses: {unused}"
    for name in EXPERIMENTS:
        for part in ("title", "claim", "description"):
            assert f"{name}.{part}" in EN


def test_course_terms_in_spanish():
    text = " ".join(ES.values())
    for term in ("normalización por lotes", "batch normalization", "media", "varianza",
                 "tasa de aprendizaje", "época", "tamaño de lote", "precisión", "pérdida",
                 "paso de entrenamiento", "modo de entrenamiento", "modo de inferencia",
                 "modo de evaluación", "estadísticas móviles"):
        assert term in text, term
    assert "exactitud" not in text  # accuracy is "precisión", as in the course, everywhere


# ------------------------------------------------------------------ numbers and locale


def test_spanish_numbers():
    es, en = translator("es"), translator("en")
    assert es("col.steps_to", target=0.95) == "pasos hasta 95\u00a0%"
    assert en("col.steps_to", target=0.95) == "steps to 95%"
    assert es("modes.note_shift", gain=0.031).endswith("+3.1\u00a0%.")
    assert group_digits("50,000", "es") == "50\u00a0000" and group_digits("3,000", "es") == "3000"
    assert group_digits("1,234,567.5", "es") == "1\u00a0234\u00a0567.5"
    assert group_digits("50,000", "en") == "50,000"
    assert format_value("steps", 50000, "es") == "50\u00a0000"
    assert format_value("steps", 1200, "es") == "1200"
    assert format_value("final val acc", 0.9731, "es") == "97.3 %"
    assert format_value("flag", True, "es") == "sí" and format_value("flag", True) == "yes"


@pytest.mark.parametrize(("env", "lang"), [
    ({}, "en"),
    ({"LANG": "es_ES.UTF-8"}, "es"),
    ({"LANG": "es"}, "es"),
    ({"LANG": "es_AR.utf8"}, "es"),
    ({"LANG": "en_US.UTF-8"}, "en"),
    ({"LANG": "C.UTF-8"}, "en"),
    ({"LANG": "fr_FR.UTF-8"}, "en"),
    ({"LANG": "en_US.UTF-8", "LC_MESSAGES": "es_MX.UTF-8"}, "es"),
    ({"LANG": "es_ES.UTF-8", "LC_MESSAGES": "C"}, "en"),
    ({"LANG": "en_GB.UTF-8", "LC_MESSAGES": "en_GB", "LC_ALL": "es_ES.UTF-8"}, "es"),
    ({"LANG": "es_ES.UTF-8", "LC_ALL": "C"}, "en"),
    ({"LANG": "es_ES.UTF-8", "LC_ALL": ""}, "es"),  # empty means unset
])
def test_default_language_follows_the_locale(env, lang):
    assert default_language(env) == lang


def _env(**locale) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LOCALE_VARS}
    return {**env, **locale}


def _lab_cli(*args, **locale):
    return subprocess.run([sys.executable, "-m", "batchnorm", "lab", *args], capture_output=True,
                          text=True, check=False, cwd=REPO, env=_env(**locale), timeout=300)


def test_lang_default_follows_LANG(capsys, monkeypatch):
    spanish = _lab_cli("list", LANG="es_ES.UTF-8")  # the real entry point, a fresh process
    assert spanish.returncode == 0, spanish.stderr
    assert ES["compare.description"] in spanish.stdout
    assert EN["compare.description"] not in spanish.stdout

    def lab_list(*args, **locale):
        for name in LOCALE_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in locale.items():
            monkeypatch.setenv(name, value)
        assert main(["lab", "list", *args]) == 0
        return capsys.readouterr().out

    assert lab_list(LANG="es_ES.UTF-8") == spanish.stdout
    english = lab_list(LANG="en_US.UTF-8")
    assert EN["compare.description"] in english and ES["compare.description"] not in english
    assert lab_list() == english
    assert lab_list(LANG="es_ES.UTF-8", LC_ALL="C") == english
    assert lab_list("--lang", "en", LANG="es_ES.UTF-8") == english
    assert lab_list("--lang=es", LANG="C.UTF-8") == spanish.stdout
    monkeypatch.setenv("LANG", "es_ES.UTF-8")
    with pytest.raises(SystemExit):
        main(["lab", "--help"])
    assert "idioma del informe" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--lang", "fr"], ["--lang=fr"], ["--lang", "EN"]])
def test_unknown_lang_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["lab", "compare", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --lang: invalid choice" in err and repr(argv[-1].split("=")[-1]) in err
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        LabConfig(lang="fr")


@pytest.mark.parametrize("argv", [["--lang", "es"], ["--lang=es"], []])
def test_usage_errors_in_spanish(argv, capsys, monkeypatch):
    for name in LOCALE_VARS:
        monkeypatch.delenv(name, raising=False)
    if not argv:
        monkeypatch.setenv("LANG", "es_ES.UTF-8")
    for args, message in [(["--batch-size", "0"], "se esperaba un entero positivo, se recibió 0"),
                          (["--epochs", "two"], "se esperaba un entero positivo, se recibió 'two'"),
                          (["--lr", "inf"], "se esperaba un número positivo, se recibió inf")]:
        with pytest.raises(SystemExit) as info:
            main(["lab", "compare", *argv, *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_library_errors_in_spanish(tmp_path):
    with pytest.raises(ValueError, match="experimento desconocido 'nope'"):
        run_experiment(LabConfig(experiment="nope", lang="es", out=str(tmp_path)))


# ------------------------------------------------------------------ reports in both languages


class _Text(HTMLParser):
    """A page's visible text (and ``alt`` texts), without <style>, <script> or <code>."""

    SKIP = {"style", "script", "code"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in self.SKIP
        self.parts += [value for name, value in attrs if name == "alt" and value]

    def handle_endtag(self, tag):
        self._skip -= tag in self.SKIP

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    return "\n".join(parser.parts)


def _fragments(text: str) -> list[str]:
    return [chunk.strip() for chunk, *_ in string.Formatter().parse(text) if chunk.strip()]


def foreign_fragments(lang: str) -> set[str]:
    """Texts that can only come from the other language's catalog.

    For every key whose two translations differ: the literal pieces (between
    placeholders) of the other language's text, four characters or more, with
    a letter, and found nowhere in this language's catalog.
    """
    mine, theirs = catalog(lang), catalog(OTHER[lang])
    everything_mine = "\n".join(mine.values())
    return {piece for key in mine if mine[key] != theirs[key]
            for piece in _fragments(theirs[key])
            if len(piece) >= 4 and re.search(r"[^\W\d_]", piece) and piece not in everything_mine}


def found_foreign(text: str, lang: str) -> list[str]:
    def occurs(piece):
        left = r"(?<!\w)" if piece[0].isalnum() else ""
        right = r"(?!\w)" if piece[-1].isalnum() else ""
        return re.search(left + re.escape(piece) + right, text) is not None
    return sorted(p for p in foreign_fragments(lang) if occurs(p))


def figure_texts(result) -> str:
    texts = []
    for fig in result.figures:
        texts += [fig.title, fig.caption]
        for panel in fig.panels:
            texts += [panel.title, panel.xlabel, panel.ylabel]
            for series in panel.series:
                texts.append(series.label)
                texts += [x for x in series.x if isinstance(x, str)]
    return "\n".join(texts)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{(experiment, lang): (result, report page)}, both languages in one run folder."""
    out = tmp_path_factory.mktemp("i18n")
    done = {}
    for name, lang in CHECKED:
        result, path = run_experiment(LabConfig(experiment=name, quick=True, out=str(out),
                                                progress=False, lang=lang))
        done[name, lang] = result, path.read_text(encoding="utf-8")
    return done


@pytest.mark.parametrize(("name", "lang"), CHECKED)
def test_report_has_no_text_of_the_other_language(reports, name, lang):
    result, page = reports[name, lang]
    assert result.lang == lang
    assert foreign_fragments(lang), "nothing to look for: the check would pass vacuously"
    assert not found_foreign(visible_text(page), lang)
    assert not found_foreign(figure_texts(result), lang)
    assert not found_foreign("\n".join(result.notes), lang)
    t = translator(lang)
    assert f'<html lang="{lang}">' in page
    for key in ("report.claim", "report.reproduce", "report.summary", "report.figures"):
        assert f">{t(key)}<" in page or f">{t(key)}</strong>" in page, key
    assert escape(t(f"{name}.title")) in page and escape(t(f"{name}.claim")) in page
    for fig in result.figures:
        assert escape(fig.caption) in page


@pytest.mark.parametrize("name", ["compare", "distributions"])
def test_both_languages_share_runs_and_machine_output(reports, name):
    (en, _), (es, _) = reports[name, "en"], reports[name, "es"]
    assert en.summary == es.summary  # English keys and text values either way
    assert set(en.runs) == set(es.runs)
    assert en.display == {}  # English shows the summary as it is
    assert all(key in es.display for key in es.summary[0])  # every column translated


def test_the_check_can_fail(reports, tmp_path):
    result, page = reports["compare", "es"]
    assert not found_foreign(visible_text(page), "es")
    # An English caption left in a Spanish report is found...
    broken = copy.deepcopy(result)
    broken.figures[0].caption = EN["compare.caption"]
    text = visible_text(write_report(broken, tmp_path).read_text(encoding="utf-8"))
    assert EN["compare.caption"] in found_foreign(text, "es")
    # ...and so are summary columns shown without their translation.
    broken.display = {}
    text = visible_text(write_report(broken, tmp_path).read_text(encoding="utf-8"))
    assert EN["col.final_val_acc"] in found_foreign(text, "es")


def test_a_run_trained_for_one_language_is_reused_by_the_other(tmp_path, monkeypatch):
    english, _ = run_experiment(LabConfig(experiment="compare", quick=True, out=str(tmp_path),
                                          progress=False))
    runs = sorted(p.name for p in (tmp_path / "compare" / "runs").iterdir())
    csv = (tmp_path / "compare" / "metrics.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again for another language")

    monkeypatch.setattr(runner_mod, "train", no_training)
    spanish, _ = run_experiment(LabConfig(experiment="compare", quick=True, out=str(tmp_path),
                                          progress=False, lang="es"))
    assert sorted(p.name for p in (tmp_path / "compare" / "runs").iterdir()) == runs
    assert (tmp_path / "compare" / "metrics.csv").read_text() == csv
    assert spanish.summary == english.summary and spanish.runs == english.runs
    assert spanish.title == ES["compare.title"] != english.title


# ------------------------------------------------------------------ the demo in Spanish


def test_the_demo_in_spanish_writes_a_complete_report(tmp_path, capsys):
    from matplotlib import image as mpimg

    assert main(["lab", "compare", "--quick", "--lang", "es", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "compare"
    report = folder / "report.html"
    assert ES["compare.title"] in out and "sin BN" in out and f"informe: {report}" in out
    assert "modelo" in out.splitlines()[3] and "precisión final (val.)" in out
    assert "no BN" not in out and "report:" not in out

    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["lang"] == "es" and [r["run"] for r in metrics["summary"]] == ["BN", "no BN"]
    page = report.read_text(encoding="utf-8")
    uris = re.findall(r'<img src="data:image/png;base64,', page)
    assert len(uris) == len(metrics["figures"]) >= 1
    for fig in metrics["figures"]:
        pixels = mpimg.imread(folder / f"{fig['name']}.png")
        assert pixels.std() > 0.05
        assert f"<h3>{escape(fig['title'])}</h3>" in page and escape(fig["caption"]) in page
    for heading in ("Reproducir", "Resumen", "Observaciones", "Figuras"):
        assert f"<h2>{heading}</h2>" in page
    header = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert header == ["modelo", "precisión final (val.)", "mejor precisión (val.)",
                      "pasos hasta 50\u00a0%", "pérdida final (entren.)", "segundos (entren.)",
                      "divergió"]
    assert ">sin BN</td>" in page and ">no</td>" in page
    assert "<code>batchnorm lab compare" in page and "--lang es</code>" in page
    assert ">tiempo total</dt>" in page and ">fecha</dt>" in page
    assert not found_foreign(visible_text(page), "es")


def test_the_demo_in_spanish_opens_in_chromium(tmp_path):
    test_report = pytest.importorskip("test_report")
    if test_report.CHROMIUM is None:
        pytest.skip("needs Chromium: run scripts/install_chromium.sh (Debian package chromium)")
    result, path = run_experiment(LabConfig(experiment="compare", quick=True, progress=False,
                                            out=str(tmp_path), lang="es"))
    n, loaded, _ = test_report.images_loaded_in_chromium(path, tmp_path)
    assert n == loaded == len(result.figures)


def test_spanish_terminal_table():
    rows = [{"run": "no BN", "steps": 12000, "final val acc": 0.5, "diverged": "no"}]
    display = {"run": "modelo", "no BN": "sin BN", "final val acc": "precisión final (val.)"}
    lines = format_summary_table(rows, display=display, lang="es").splitlines()
    assert lines[0].split("  ")[0] == "modelo" and "precisión final (val.)" in lines[0]
    assert lines[2].startswith("sin BN") and "12\u00a0000" in lines[2] and "50.0 %" in lines[2]
    assert format_summary_table([], lang="es") == "(sin filas)"
