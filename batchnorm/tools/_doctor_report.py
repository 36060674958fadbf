"""What :func:`batchnorm.tools.doctor` reports: the catalog of checks, findings, the report.

Every check has a stable code (``BN001``...), a short name, a default
severity, and the explanation of why it matters and how to fix it. Codes are
never renumbered: a removed check leaves a gap.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field

__all__ = ["CHECKS", "SEVERITIES", "Check", "Finding", "Report"]

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Check:
    code: str
    name: str
    severity: str
    title: str
    why: str
    fix: str


_WEIGHT_DECAY_FIX = (
    "Give normalization parameters (and biases) their own group with weight_decay=0, e.g. "
    "decay = [p for p in model.parameters() if p.ndim > 1]; "
    "rest = [p for p in model.parameters() if p.ndim <= 1]; "
    "torch.optim.SGD([{'params': decay, 'weight_decay': wd}, "
    "{'params': rest, 'weight_decay': 0.0}], lr=lr)."
)

CHECKS: dict[str, Check] = {c.code: c for c in [
    Check("BN000", "no-batchnorm", "info", "no batch-norm layers",
          "There is nothing batch-norm specific to check; the input and mode checks still ran.",
          "Pass the model that holds the BN layers, if this is a wrapper that builds them later."),
    Check("BN001", "bias-before-bn", "warning", "bias right before batch norm",
          "Batch norm subtracts each channel's mean (the batch's in training, the running one "
          "at inference), so a per-channel constant added just before it is removed again; BN's "
          "own shift (beta) does that job. The bias only costs parameters, memory and time.",
          "Build the layer with bias=False (e.g. nn.Conv2d(..., bias=False)). In a trained "
          "model it is harmless: fold_batchnorm removes it for inference."),
    Check("BN002", "bn-after-norm", "warning", "batch norm right after another normalization",
          "The input is already normalized: the second layer re-estimates statistics the first "
          "one fixed, adding parameters, time and (for BN) a dependence on the batch without "
          "changing what the network can represent.",
          "Remove one of the two (usually the second), or restore the layer meant to sit "
          "between them (a conv, linear or activation)."),
    Check("BN003", "bn-before-output", "warning", "batch norm right before the output",
          "A final BN pins every output unit to a fixed mean and spread over the batch, so the "
          "scores cannot move freely, and in training each sample's prediction depends on the "
          "rest of its batch: the train/eval mismatch lands directly on the loss and the "
          "predictions.",
          "End with a linear or conv layer after the last normalization. If a normalized "
          "output is intended (an embedding or projection head), ignore this check "
          "(ignore=['BN003'])."),
    Check("BN004", "dropout-before-bn", "warning", "dropout right before batch norm",
          "Dropout changes the variance of its output between training (units dropped, the "
          "rest scaled by 1/(1-p)) and inference (nothing dropped), so the running variance BN "
          "learns in training does not match what it sees at inference: the 'variance shift' "
          "(Li et al., 2019), which costs accuracy.",
          "Put dropout after the last BN layer (e.g. just before the classifier) or after BN "
          "instead of before it."),
    Check("BN005", "one-value-per-channel", "error", "one value per channel in training",
          "With one value per channel the batch mean is that value and the batch variance is "
          "zero: the output is beta whatever the input and no gradient flows. PyTorch raises "
          "'Expected more than 1 value per channel when training'.",
          "Train with more than one sample per device (DataLoader(drop_last=True) avoids a "
          "last batch of one), use GroupNorm or LayerNorm for single samples, or keep BN in "
          "eval mode (frozen statistics, batchnorm.tools.freeze_batchnorm) for this stage."),
    Check("BN006", "small-batch", "warning", "per-device batch too small for batch norm",
          "Statistics of a few samples are noisy and differ from the running statistics used "
          "at inference. Wu & He (2018), ResNet-50 on ImageNet: 23.6 % top-1 error with 32 "
          "images per device, 24.8 % with 8, 27.3 % with 4, 34.7 % with 2, while GroupNorm "
          "stays at about 24 % at every size.",
          "Use GroupNorm (nn.GroupNorm(32, C)); SyncBatchNorm across devices "
          "(batchnorm.convert_sync_batchnorm) so the statistics cover the global batch; frozen "
          "BN when fine-tuning (batchnorm.convert_frozen_batchnorm); or Batch Renormalization "
          "(batchnorm.BatchRenorm2d)."),
    Check("BN007", "unnormalized-input", "warning", "input far from normalized",
          "Layer initializations assume inputs of about unit scale. Raw values such as 0-255 "
          "pixels make the first activations and their gradients hundreds of times too large, "
          "so training needs a far smaller learning rate or diverges, and no BN protects the "
          "first layer. Normalizing the inputs is the course's first pitfall.",
          "Standardize each input channel with the training set's statistics: "
          "x = (x - mean) / std (for images: scale to [0, 1], then "
          "torchvision.transforms.Normalize(mean, std))."),
    Check("BN008", "stats-never-updated", "error", "running statistics never updated",
          "At inference BN normalizes with its running statistics; at their initial values "
          "(mean 0, variance 1) it only applies gamma and beta, so activations keep whatever "
          "scale the layers before give them. Usual causes: a model evaluated before any "
          "training step in train mode, or a checkpoint loaded without its BN buffers "
          "(load_state_dict(..., strict=False)).",
          "Load the trained state with strict=True, or compute the statistics from training "
          "data: batchnorm.tools.recalibrate_batchnorm(model, loader)."),
    Check("BN009", "non-finite-state", "error", "non-finite batch-norm state",
          "NaN or infinite statistics or parameters make every output of the layer NaN at "
          "inference, and a moving average of NaN stays NaN, so training does not repair it; "
          "a negative running variance has no square root. Usually an overflow during "
          "training (learning rate too high, float16 without loss scaling) or a damaged "
          "checkpoint.",
          "Reload a good checkpoint, or reset the layer (reset_running_stats()) and recompute "
          "its statistics (batchnorm.tools.recalibrate_batchnorm); check_finite=True on our BN "
          "layers raises at the first non-finite batch."),
    Check("BN010", "stale-stats", "warning", "running statistics far from this data",
          "At inference BN uses its running statistics; when they no longer describe the data "
          "(other preprocessing, a domain shift, weights changed after the statistics were "
          "taken) the layer stops normalizing: activations drift and accuracy drops. One small "
          "example batch is noisy, so the limits are wide.",
          "Check that the input preprocessing matches training's; then recompute the "
          "statistics on representative data: batchnorm.tools.recalibrate_batchnorm(model, "
          "loader)."),
    Check("BN011", "train-mode-at-eval", "error", "training mode at evaluation",
          "In training mode BN normalizes each batch with its own statistics and updates the "
          "running statistics: results depend on the batch size and on which samples share a "
          "batch (a single sample can fail), and every evaluation batch changes the model. "
          "torch.no_grad() does not change the mode.",
          "Call model.eval() before evaluating, and model.train() before training again."),
    Check("BN012", "eval-mode-at-train", "warning", "eval mode while training",
          "In eval mode BN uses and never updates its running statistics and dropout is off, so "
          "training runs without batch normalization; usually an evaluation that forgot to "
          "switch back.",
          "Call model.train() at the start of every training epoch; to freeze BN on purpose, "
          "use batchnorm.tools.freeze_batchnorm, which survives model.train()."),
    Check("BN013", "no-running-stats-at-eval", "warning", "no running statistics at evaluation",
          "Without running statistics BN normalizes with the batch's statistics even in eval "
          "mode: a prediction depends on the other samples in its batch and on the batch size, "
          "and a single sample with one value per channel fails.",
          "Build the layer with track_running_stats=True and train (or recalibrate) it; keep "
          "False only for deliberate batch-wise (transductive) evaluation."),
    Check("BN014", "weight-decay-on-bn", "warning", "weight decay on batch-norm gamma/beta",
          "gamma and beta are one scale and one shift per channel and hardly overfit; decay "
          "pulls them toward zero, which shrinks residual branches and the channels feeding "
          "the output. Large-batch ImageNet recipes (Goyal et al. 2017; Jia et al. 2018) and "
          "timm leave them (and biases) out of weight decay.",
          _WEIGHT_DECAY_FIX),
]}


@dataclass(frozen=True)
class Finding:
    """One problem found by :func:`batchnorm.tools.doctor`.

    Attributes:
        code: the check's stable id (``"BN001"``); :data:`CHECKS` has the rest.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        path: the module the finding is about (``model.get_submodule(path)``);
            ``""`` for the model as a whole or its input.
        message: what is wrong, with the numbers.
        layers: every module concerned (``(path,)`` for one layer).
        evidence: what it was found from: ``"fx"`` (torch.fx data flow),
            ``"runtime"`` (data flow of one run), ``"run"`` (values seen while
            running the example), ``"state"``, ``"mode"``, ``"input"`` or
            ``"optimizer"``.
        confidence: ``"high"``; ``"medium"`` for placement found from one run
            (branches not taken and uses outside torch functions unseen).
        details: numbers behind the message, JSON-able.
    """

    code: str
    severity: str
    path: str
    message: str
    layers: tuple[str, ...] = ()
    evidence: str = "state"
    confidence: str = "high"
    details: dict = field(default_factory=dict)

    @property
    def check(self) -> Check:
        return CHECKS[self.code]

    @property
    def name(self) -> str:
        return self.check.name

    @property
    def title(self) -> str:
        return self.check.title

    @property
    def why(self) -> str:
        return self.check.why

    @property
    def fix(self) -> str:
        return self.check.fix

    def to_dict(self) -> dict:
        return {"code": self.code, "name": self.name, "severity": self.severity,
                "path": self.path, "title": self.title, "message": self.message,
                "why": self.why, "fix": self.fix, "layers": list(self.layers),
                "evidence": self.evidence, "confidence": self.confidence,
                "details": self.details}

    def __str__(self) -> str:
        return f"{self.severity} {self.code} {_where(self.path)}: {self.message}"


def _where(path: str) -> str:
    return path or "(model)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class Report:
    """The doctor's findings, errors first.

    ``str(report)`` is the human text; :meth:`to_dict` / :meth:`to_json` the
    machine form. Iterating yields the findings."""

    findings: list[Finding]
    mode: str
    graph: str | None
    bn_layers: int
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def infos(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "info"]

    @property
    def ok(self) -> bool:
        """No errors (warnings and infos allowed)."""
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def __iter__(self):
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "counts": self.counts(), "mode": self.mode, "graph": self.graph,
                "bn_layers": self.bn_layers, "notes": list(self.notes),
                "findings": [f.to_dict() for f in self.findings]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        c = self.counts()
        found = ", ".join(_plural(c[s], s) for s in ("error", "warning") if c[s])
        if c["info"]:
            found += (", " if found else "") + _plural(c["info"], "note")
        source = {"fx": "data flow from torch.fx", "runtime": "data flow from one run",
                  None: "no data flow"}[self.graph]
        intent = "for training" if self.mode == "train" else "for evaluation"
        return (f"batchnorm doctor: {found or 'no findings'} "
                f"({_plural(self.bn_layers, 'BN layer')}, {source}, checked {intent})")

    def __str__(self) -> str:
        return self.format()

    def format(self, width: int = 100, max_paths: int = 8) -> str:
        """The human text: a summary line, notes, then one block per check. Layers
        with the same message share a line naming at most ``max_paths`` of them
        (``findings`` and ``to_dict()`` have them all)."""
        lines = [self.summary()]
        wrap = textwrap.TextWrapper(width=width, initial_indent="  ",
                                    subsequent_indent="       ")
        for note in self.notes:
            lines += textwrap.wrap("note: " + note, width=width, subsequent_indent="      ")
        groups: dict[tuple[str, str], list[Finding]] = {}
        for f in self.findings:
            groups.setdefault((f.severity, f.code), []).append(f)
        for (severity, code), found in groups.items():
            check = CHECKS[code]
            count = f" ({len(found)} findings)" if len(found) > 1 else ""
            lines += ["", f"{severity} {code} {check.title}{count}"]
            by_message: dict[str, list[str]] = {}
            for f in found:
                by_message.setdefault(f.message, []).append(_where(f.path))
            for message, paths in by_message.items():
                where = ", ".join(paths[:max_paths])
                if len(paths) > max_paths:
                    where += f" and {len(paths) - max_paths} more"
                lines += textwrap.wrap(f"{where}: {message}", width=width,
                                       initial_indent="  ", subsequent_indent="    ")
            lines += wrap.wrap("why: " + check.why) + wrap.wrap("fix: " + check.fix)
        return "\n".join(lines)
