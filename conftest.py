"""Root pytest set-up: keep optional extras optional.

``--doctest-modules`` imports every module under ``batchnorm/``; the Keras
layer needs the ``keras`` extra, so without it its modules are not collected
(its tests skip themselves with ``pytest.importorskip``).
"""

import importlib.util


def _has_keras() -> bool:
    spec = importlib.util.find_spec("keras")
    return spec is not None and spec.origin is not None  # not a stray namespace folder


collect_ignore_glob = [] if _has_keras() else ["batchnorm/keras/*"]
