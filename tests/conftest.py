"""Shared pytest set-up: the tests folder is on ``sys.path`` for ``helpers``."""

import os

# Backend tests pick their backend explicitly; an inherited override would
# silently test something else.
os.environ.pop("BATCHNORM_BACKEND", None)
