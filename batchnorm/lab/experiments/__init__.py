"""The lab's experiments: each turns one claim about BN into runs and numbers.

Every experiment is a function ``fn(lab) -> ExperimentResult`` registered in
:data:`EXPERIMENTS` with a one-line description; ``batchnorm lab <name>``
runs it. Defaults are sized for a laptop CPU (the demo, ``compare``, takes
well under 90 s on 2 cores); ``--quick`` shrinks everything for tests.

* :mod:`.training`: compare, placement, batch-size, lr, init;
* :mod:`.inference`: modes, regularization;
* :mod:`.distributions`: distributions, paper-mnist.
"""

from . import distributions, inference, training  # noqa: F401  (they register themselves)
from ._common import EXPERIMENTS, Experiment

__all__ = ["EXPERIMENTS", "Experiment"]
