"""The lab's message catalogs, one module per language: ``MESSAGES = {key: text}``.

``en`` and ``es`` have the same keys and, key by key, the same named
placeholders (``tests/lab/test_i18n.py`` checks both). Keys are grouped by
prefix: ``<experiment>.*`` (titles, claims, captions, notes), ``col.*`` (summary
columns), ``label.*`` (runs and conditions), ``axis.*``/``panel.*`` (plots),
``report.*``, ``env.*``, ``cli.*``, ``error.*``. Read them with
:func:`batchnorm.lab.i18n.translator`.
"""
