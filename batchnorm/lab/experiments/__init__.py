"""The lab's experiments: each turns one claim about BN into runs and numbers.

Every experiment is a function ``fn(lab) -> ExperimentResult`` registered in
:data:`EXPERIMENTS`; ``batchnorm lab <name>`` runs it. Its texts (the one-line
description, title, claim, captions...) are in the catalogs of
:mod:`batchnorm.lab.locales`, under ``<name>.*``. Defaults are sized for a
laptop CPU (the demo, ``compare``, takes well under 90 s on 2 cores);
``--quick`` shrinks everything for tests.

* :mod:`.training`: compare, placement, batch-size, lr, init;
* :mod:`.inference`: modes, regularization;
* :mod:`.distributions`: distributions, paper-mnist.
"""

from . import distributions, inference, training  # noqa: F401  (they register themselves)
from ._common import REGISTRY, Experiment

# The order of `batchnorm lab list`, the help and the README: the demo first,
# then the course's claims in the order it teaches them.
ORDER = ("compare", "placement", "batch-size", "lr", "init", "modes", "regularization",
         "distributions", "paper-mnist")
assert set(ORDER) == set(REGISTRY), "every registered experiment needs a place in ORDER"
EXPERIMENTS: dict[str, Experiment] = {name: REGISTRY[name] for name in ORDER}

__all__ = ["EXPERIMENTS", "ORDER", "Experiment"]
