"""The lab's languages: message catalogs, the default language, numbers per language.

Every text the lab shows (report, plots, terminal output) comes from a catalog
in :mod:`batchnorm.lab.locales`: one dict per language (``en.py``, ``es.py``),
the same keys in each (``"compare.title"``, ``"col.steps_to"``...), format
strings with named placeholders. A :class:`Translator` looks a key up and fills
the placeholders; a key missing from the catalog is a ``KeyError``, never a
silent fallback (the tests check that both catalogs have every key).

Numbers keep the decimal point in every language (the RAE's *Ortografía*
(2010) accepts it, and it matches the command line, the code and the JSON).
What changes in Spanish: a space before ``%`` (``95 %``), and digit groups
separated by a space from five digits up (``50 000``, but ``3000``), never by a
comma, which a Spanish reader takes for the decimal separator.

Example:
    >>> t = translator("es")
    >>> t("col.steps_to", target=0.95)
    'pasos hasta 95\\xa0%'
    >>> translator("en")("col.steps_to", target=0.95)
    'steps to 95%'
    >>> default_language({"LANG": "es_ES.UTF-8"}), default_language({"LANG": "C.UTF-8"})
    ('es', 'en')
"""

from __future__ import annotations

import functools
import os
import re
import string
from collections.abc import Mapping

__all__ = ["LANGUAGES", "Translator", "catalog", "default_language", "group_digits",
           "translator"]

LANGUAGES = ("en", "es")
NBSP = "\u00a0"  # keeps "95 %" and "50 000" on one line


def catalog(lang: str) -> dict[str, str]:
    """The message catalog of ``lang`` (key -> format string).

    Raises:
        ValueError: ``lang`` is not one of :data:`LANGUAGES`.
    """
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; expected one of {', '.join(LANGUAGES)}")
    from importlib import import_module

    return import_module(f"{__package__}.locales.{lang}").MESSAGES


def default_language(environ: Mapping[str, str] | None = None) -> str:
    """The language the environment's locale asks for: ``"es"`` or ``"en"``.

    The first of ``LC_ALL``, ``LC_MESSAGES`` and ``LANG`` that is set and not
    empty decides (POSIX's order of precedence): a value starting with ``es``
    (``es_ES.UTF-8``, ``es_AR``, ``es``) means Spanish, anything else (``C``,
    ``en_US.UTF-8``, ``fr_FR``) English.
    """
    environ = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(name, "")
        if value:
            return "es" if value.lower().startswith("es") else "en"
    return "en"


def group_digits(text: str, lang: str) -> str:
    """Localize digit grouping in ``text`` formatted with Python's ``,`` option.

    English keeps ``12,345``. Spanish separates groups with a no-break space
    from five integer digits up and writes four-digit numbers solid.

    Example:
        >>> group_digits("12,345.5", "es"), group_digits("1,200", "es")
        ('12\\xa0345.5', '1200')
    """
    if lang == "en" or "," not in text:
        return text

    def regroup(match: re.Match) -> str:
        digits = match.group(0)
        solid = sum(c.isdigit() for c in digits) <= 4
        return digits.replace(",", "" if solid else NBSP)

    return re.sub(r"\d{1,3}(?:,\d{3})+", regroup, text)


class _Formatter(string.Formatter):
    """``str.format`` with the language's percent sign and digit groups."""

    def __init__(self, lang: str):
        super().__init__()
        self.lang = lang

    def format_field(self, value, format_spec: str) -> str:
        text = super().format_field(value, format_spec)
        if self.lang == "en":
            return text
        if format_spec.endswith("%") and text.endswith("%"):
            text = text[:-1] + NBSP + "%"
        if "," in format_spec:
            text = group_digits(text, self.lang)
        return text


class Translator:
    """The texts of one language: ``t("compare.title")``, ``t("col.steps_to", target=0.95)``.

    Attributes:
        lang: the language code (``"en"``, ``"es"``).
        messages: the catalog.
    """

    def __init__(self, lang: str):
        self.messages = catalog(lang)
        self.lang = lang
        self._formatter = _Formatter(lang)

    def __call__(self, key: str, **params) -> str:
        """The text of ``key`` with ``params`` filled in.

        Raises:
            KeyError: the catalog has no ``key`` (or the text needs a parameter
                that was not given).
        """
        try:
            text = self.messages[key]
        except KeyError:
            raise KeyError(f"no text {key!r} in the {self.lang!r} catalog") from None
        return self._formatter.format(text, **params)

    def get(self, key: str, default: str, **params) -> str:
        """Like calling the translator, but ``default`` when the catalog has no ``key``."""
        return self(key, **params) if key in self.messages else default

    def __repr__(self) -> str:
        return f"Translator({self.lang!r})"


@functools.cache
def translator(lang: str) -> Translator:
    """The (shared) :class:`Translator` of ``lang``.

    Raises:
        ValueError: ``lang`` is not one of :data:`LANGUAGES`.
    """
    return Translator(lang)
