"""Shared pytest set-up: the tests folder is on ``sys.path`` for ``helpers``."""

import os

# Backend tests pick their backend explicitly; an inherited override would
# silently test something else.
os.environ.pop("BATCHNORM_BACKEND", None)

# The lab speaks the locale's language (Spanish under LANG=es_*); the tests
# that read its terminal output expect English unless they set --lang.
os.environ.pop("LC_ALL", None)
os.environ["LC_MESSAGES"] = "C"
