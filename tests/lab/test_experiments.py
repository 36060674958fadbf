"""Every experiment in a tiny configuration, the run folder, determinism and resume."""

import json

import pytest
import torch
from test_data import write_idx_folder

from batchnorm.lab import runner as runner_mod
from batchnorm.lab import train as train_mod
from batchnorm.lab.data import load_dataset
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.runner import LabConfig, run_experiment
from batchnorm.lab.train import TrainConfig, make_model

FOLDER_EXPERIMENTS = {"paper-mnist"}


def _config(tmp_path, name, **kw):
    return LabConfig(experiment=name, quick=True, out=str(tmp_path), progress=False, **kw)


@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - FOLDER_EXPERIMENTS))
def test_every_experiment_runs_and_writes_its_folder(tmp_path, name):
    result, report = run_experiment(_config(tmp_path, name))
    folder = tmp_path / name
    assert report == folder / "report.html" and report.exists()
    assert result.summary and all(set(r) == set(result.summary[0]) for r in result.summary)
    for fig in result.figures:
        png = folder / f"{fig.name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert fig.caption and all(p.series for p in fig.panels)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["experiment"] == name and saved["summary"] == json.loads(
        json.dumps(result.summary))
    assert json.loads((folder / "config.json").read_text())["experiment"] == name
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("run,step,epoch,train_loss")
    assert result.command.startswith(f"batchnorm lab {name}")


def test_paper_mnist_on_an_idx_folder(tmp_path):
    root = tmp_path / "mnist"
    write_idx_folder(root, n_train=60, n_test=20)
    result, report = run_experiment(_config(tmp_path, "paper-mnist", data_root=str(root),
                                            steps=6))
    assert report.exists() and [r["run"] for r in result.summary] == ["BN", "no BN"]
    bands = result.figures[1].panels[0].series[0]
    assert bands.lo and len(bands.lo) == len(bands.y) == len(bands.hi)
    assert all(lo <= mid <= hi for lo, mid, hi in zip(bands.lo, bands.y, bands.hi, strict=True))


def test_same_seed_same_numbers(tmp_path):
    a, _ = run_experiment(_config(tmp_path / "a", "compare"))
    b, _ = run_experiment(_config(tmp_path / "b", "compare"))
    strip = [{k: v for k, v in row.items() if k not in ("seconds", "train seconds")}
             for r in (a, b) for run in r.runs.values() for row in run["history"]]
    half = len(strip) // 2
    assert strip[:half] == strip[half:]


def test_models_differing_only_in_norm_start_from_the_same_weights():
    data = load_dataset("mnist5k")
    weights = {}
    for norm in ("batch", "none", "group", "layer"):
        model = make_model(TrainConfig(norm=norm), data)
        weights[norm] = [p for n, p in model.named_parameters()
                         if p.dim() > 1]  # conv and linear weights
    for norm in ("none", "group", "layer"):
        for a, b in zip(weights["batch"], weights[norm], strict=True):
            assert torch.equal(a, b)


def test_interrupted_sweep_resumes_without_losing_or_repeating_runs(tmp_path, monkeypatch):
    real_train = train_mod.train
    calls = []

    def flaky_train(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third run
        calls.append(args[0])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "train", flaky_train)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(tmp_path, "lr"))
    runs_dir = tmp_path / "lr" / "runs"
    assert len(list(runs_dir.glob("*.json"))) == 2
    assert not list(runs_dir.glob(".*tmp"))  # no half-written file
    assert not (tmp_path / "lr" / "report.html").exists()

    monkeypatch.setattr(runner_mod, "train", real_train)
    trained = []
    original_run = runner_mod.Lab.run

    def counting_run(self, label, config, **kw):
        out = original_run(self, label, config, **kw)
        trained.extend(self.trained[len(trained):])
        return out

    monkeypatch.setattr(runner_mod.Lab, "run", counting_run)
    result, report = run_experiment(_config(tmp_path, "lr"))
    assert len(trained) == 2  # only the two missing runs were trained
    assert len(list(runs_dir.glob("*.json"))) == 4
    runs_in_csv = [line.split(",")[0] for line in
                   (tmp_path / "lr" / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted(set(runs_in_csv)) == sorted(result.runs) and len(result.runs) == 4
    assert len(runs_in_csv) == sum(len(r["history"]) for r in result.runs.values())
    assert report.exists()


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from batchnorm.lab import atomic as store

    path = tmp_path / "f.json"
    store.atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.atomic_write_text(path, "new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_steps_to_target_and_divergence_flag(tmp_path):
    cfg = TrainConfig(steps=8, epochs=0, eval_every=2, lr=1e30, norm="none",
                      model_kwargs=(("conv_filters", 2), ("dense_units", 4)))
    data = load_dataset("mnist5k")
    result, _ = train_mod.train(cfg, data)
    assert result.diverged
    assert result.steps_to(2.0) is None


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(lr=-1.0), dict(lr=float("nan")),
                                 dict(norm="weird"), dict(arch="vgg"), dict(steps=0, epochs=0)])
def test_bad_train_config_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_unknown_experiment_and_missing_cuda(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment(_config(tmp_path, "nope"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            run_experiment(_config(tmp_path, "compare", device="cuda"))
