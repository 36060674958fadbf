"""Running an experiment: config, data, cached training runs, output folder.

``run_experiment(LabConfig(...))`` loads the data, calls the experiment
function, and writes the run folder: ``config.json``, ``metrics.csv``,
``metrics.json``, one PNG per figure and ``report.html`` — each file atomically.

Texts come in the config's language (``LabConfig.lang``): experiments write
them with ``lab.t(key, ...)`` from :mod:`batchnorm.lab.i18n`'s catalogs. Summary
keys, summary text values and run ids come from ``lab.term(key, ...)``: always
the English text (so ``metrics.json``, ``--json`` and the cached run files do
not depend on the language, and a run trained for an English report is reused
for a Spanish one), with its translation kept in ``result.display`` for the
report and the terminal.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..tools.monitor import ActivationMonitor
from .atomic import atomic_write_bytes, atomic_write_text
from .data import Dataset, load_dataset
from .i18n import LANGUAGES, translator
from .results import ExperimentResult
from .store import RunStore, history_csv
from .train import RunResult, TrainConfig, make_model, train

__all__ = ["Lab", "LabConfig", "run_experiment"]


@dataclass(frozen=True)
class LabConfig:
    """What the user chose; ``None`` means the experiment's own default.

    Attributes:
        experiment: the experiment's name.
        dataset: ``"mnist5k"`` (embedded), ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``.
        data_root: folder with the data set's files (not for ``mnist5k``).
        out: parent folder of the run folders.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seed of every run.
        epochs, steps, batch_size, lr, arch: overrides of the experiment's defaults.
        quick: a smaller configuration (tests, a first look).
        progress: show progress bars.
        lang: language of the report and the terminal output, ``"en"`` or ``"es"``
            (it changes no number and no run).

    Raises:
        ValueError: an unknown ``lang``.
    """

    experiment: str = "compare"
    dataset: str | None = None
    data_root: str | None = None
    out: str = "runs"
    device: str = "cpu"
    seed: int = 0
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    arch: str | None = None
    quick: bool = False
    progress: bool = True
    lang: str = "en"

    def __post_init__(self):
        if self.lang not in LANGUAGES:
            raise ValueError(f"unknown language {self.lang!r}; expected one of "
                             f"{', '.join(LANGUAGES)}")

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.experiment

    def command(self) -> str:
        """The ``batchnorm lab`` command line that reproduces this config."""
        parts = ["batchnorm", "lab", self.experiment]
        defaults = LabConfig(experiment=self.experiment)
        for key, value in asdict(self).items():
            if key in ("experiment", "progress") or value == getattr(defaults, key):
                continue
            flag = "--" + key.replace("_", "-")
            parts += [flag] if value is True else [flag, str(value)]
        return shlex.join(parts)


class Lab:
    """What an experiment function works with: the data, cached training runs, the texts.

    Attributes:
        t: the :class:`~batchnorm.lab.i18n.Translator` of ``config.lang``:
            ``lab.t("compare.title")`` is a text in the report's language.
        display: English term -> its text in ``config.lang``, filled by :meth:`term`.
    """

    def __init__(self, config: LabConfig, data: Dataset, store: RunStore):
        self.config = config
        self.data = data
        self.store = store
        self.trained: list[str] = []   # labels trained in this call (the rest came from disk)
        self.runs: dict[str, RunResult] = {}
        self.t = translator(config.lang)
        self.display: dict[str, str] = {}

    def term(self, key: str, **params) -> str:
        """The English text of ``key``, remembering how to show it in ``config.lang``.

        For what must not depend on the language: run ids (they name the cached
        run files), summary keys and text values (machines read them). A
        parameter that is itself a term is shown translated.

        Example: ``lab.term("label.no_bn")`` is ``"no BN"``, shown as ``"sin BN"``
        in Spanish; ``lab.term("run.lr", label=that, lr=0.1)`` is ``"no BN lr=0.1"``.
        """
        english = translator("en")(key, **params)
        shown = {k: self.display.get(v, v) if isinstance(v, str) else v
                 for k, v in params.items()}
        self.display[english] = self.t(key, **shown)
        return english

    def show(self, term: str) -> str:
        """How ``term`` (from :meth:`term`) reads in ``config.lang``."""
        return self.display.get(term, term)

    def train_config(self, defaults: dict, **overrides) -> TrainConfig:
        """A TrainConfig from the experiment's defaults, the user's flags, then ``overrides``."""
        values = dict(defaults)
        for key in ("epochs", "steps", "batch_size", "lr", "arch"):
            user = getattr(self.config, key)
            if user is not None:
                values[key] = user
        if values.get("steps"):
            values["epochs"] = 0
        values.update(overrides)
        values["seed"] = self.config.seed
        values["dataset"] = self.data.name
        if "model_kwargs" in values:
            values["model_kwargs"] = tuple(sorted(dict(values["model_kwargs"]).items()))
        return TrainConfig(**values)

    def run(self, label: str, config: TrainConfig, *, keep_model: bool = False,
            monitor: dict | None = None):
        """Train ``config`` (or load it if it already finished); returns ``RunResult``.

        With ``keep_model`` the trained weights are also saved (and loaded) so
        an experiment can probe the model afterwards; then ``(result, model)``
        is returned. ``monitor`` holds :class:`~batchnorm.tools.ActivationMonitor`
        arguments; its records land in ``result.extra["monitor"]``.
        """
        result = self.store.load(label, config)
        model = None
        if result is not None and keep_model:
            model = self._load_model(label, config)
            if model is None:
                result = None
        if result is None:
            bar = _progress(self.show(label), self.t("progress.unit"), self.config.progress)
            model = make_model(config, self.data)
            watcher = ActivationMonitor(model, **monitor) if monitor else None
            try:
                result, model = train(config, self.data, device=self.config.device,
                                      on_step=bar.update_to, model=model)
            finally:
                bar.close()
                if watcher is not None:
                    watcher.remove()
            if watcher is not None:
                result.extra["monitor"] = watcher.to_rows()
            if keep_model:
                self._save_model(label, config, model)
            self.store.save(label, result)
            self.trained.append(label)
        self.runs[label] = result
        return (result, model) if keep_model else result

    def _model_path(self, label, config) -> Path:
        return self.store.path(label, config).with_suffix(".pt")

    def _save_model(self, label, config, model):
        import io

        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write_bytes(self._model_path(label, config), buf.getvalue())

    def _load_model(self, label, config):
        path = self._model_path(label, config)
        if not path.exists():
            return None
        model = make_model(config, self.data)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(self.config.device)


class _Bar:
    def __init__(self, label: str, unit: str, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=f"{label:>18}", unit=unit, leave=False, dynamic_ncols=True)

    def update_to(self, step: int, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = step
            if step == total or step % 10 == 0:
                self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress(label: str, unit: str, enabled: bool) -> _Bar:
    return _Bar(label, unit, enabled and sys.stderr.isatty())


def environment(config: LabConfig) -> dict:
    return {
        "batchnorm": __import__("batchnorm").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": config.device if config.device != "cuda"
        else f"cuda ({torch.cuda.get_device_name()})",
        "cpu threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_experiment(config: LabConfig, *, write: bool = True) -> tuple[ExperimentResult, Path]:
    """Run one experiment and write its folder.

    Returns:
        ``(result, report_path)``.

    Raises:
        ValueError: unknown experiment or bad option.
        batchnorm.lab.data.DataError: the data set cannot be read.
    """
    from .experiments import EXPERIMENTS

    t = translator(config.lang)
    if config.experiment not in EXPERIMENTS:
        raise ValueError(t("error.unknown_experiment", name=config.experiment,
                           names=", ".join(EXPERIMENTS)))
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(t("error.no_cuda"))
    spec = EXPERIMENTS[config.experiment]
    dataset = config.dataset or spec.dataset
    config = replace(config, dataset=dataset)
    root = config.data_root
    if root is None and dataset != "mnist5k" and (Path(".cache") / dataset).is_dir():
        root = str(Path(".cache") / dataset)  # where `make data` puts it
        config = replace(config, data_root=root)
    data = load_dataset(dataset, root)
    lab = Lab(config, data, RunStore(config.folder))
    start = time.perf_counter()
    result = spec.fn(lab)
    result.seconds = round(time.perf_counter() - start, 2)
    result.command = config.command()
    result.runs = {label: r.to_dict() for label, r in lab.runs.items()}
    result.lang = config.lang
    result.display = {**{k: v for k, v in lab.display.items() if k != v}, **result.display}
    report = config.folder / "report.html"
    if write:
        report = write_outputs(result, config, lab)
    return result, report


def write_outputs(result: ExperimentResult, config: LabConfig, lab: Lab) -> Path:
    from .plots import render_all
    from .report import write_report

    folder = config.folder
    atomic_write_text(folder / "config.json", json.dumps(asdict(config), indent=1))
    atomic_write_text(folder / "metrics.csv", history_csv(lab.runs))
    atomic_write_text(folder / "metrics.json", json.dumps(result.to_dict(), indent=1))
    images = render_all(result, folder)
    return write_report(result, folder, images=images, environment=environment(config))
