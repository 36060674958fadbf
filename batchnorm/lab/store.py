"""Run folders: atomic writes, and finished runs reused on a rerun.

A run is named by a hash of its :class:`~batchnorm.lab.train.TrainConfig`;
when it finishes its result is written to ``runs/<label>-<hash>.json`` in one
atomic step (temporary file, then rename). A sweep that is interrupted
therefore keeps every run that finished, and a rerun trains only the missing
ones: nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

from .atomic import atomic_write_text
from .train import RunResult, TrainConfig

__all__ = ["RunStore", "history_csv", "run_key"]


def run_key(config: TrainConfig) -> str:
    """A short stable hash of a config."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "run"


class RunStore:
    """The finished runs of one experiment folder.

    Args:
        folder: the experiment's output folder; runs go to ``folder/runs``.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.runs_dir = self.folder / "runs"

    def path(self, label: str, config: TrainConfig) -> Path:
        return self.runs_dir / f"{_slug(label)}-{run_key(config)}.json"

    def load(self, label: str, config: TrainConfig) -> RunResult | None:
        """The finished run for ``config``, or ``None`` if it has not finished."""
        path = self.path(label, config)
        if not path.exists():
            return None
        try:
            result = RunResult.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: train it again, the rename will replace it
        return result if result.config == config else None

    def save(self, label: str, result: RunResult) -> Path:
        return atomic_write_text(self.path(label, result.config),
                                 json.dumps(result.to_dict(), indent=1))

    def finished(self) -> list[Path]:
        return sorted(self.runs_dir.glob("*.json")) if self.runs_dir.exists() else []


def history_csv(runs: dict[str, RunResult]) -> str:
    """Every run's history as one CSV, a ``run`` column first."""
    rows = [{"run": label, **row} for label, r in runs.items() for row in r.history]
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
