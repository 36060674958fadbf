"""``python -m batchnorm``: the same as the ``batchnorm`` command."""

from .cli import main

raise SystemExit(main())
