"""``freeze_batchnorm`` / ``unfreeze_batchnorm``: BN left alone by fine-tuning and ``train()``.

The usual recipe, ``bn.eval()`` on every BN layer, lasts until the training
loop calls ``model.train()``, which puts every layer back in training mode:
the statistics move again and the batch is normalized with its own
statistics. Here a frozen layer carries a mark and two hooks instead:

* **statistics** (``stats=True``): a forward pre-hook runs the layer in
  inference mode (``training=False`` for the duration of its forward, then
  the flag is put back), so it normalizes with ``running_mean`` and
  ``running_var`` and never updates them or ``num_batches_tracked``,
  whatever ``model.train()`` / ``model.eval()`` said. Works for PyTorch's BN
  layers, ours, SyncBatchNorm (no communication then), renorm and timm's.
* **affine parameters** (``affine=True``): ``weight`` and ``bias`` get
  ``requires_grad=False``; an optimizer then skips them (no gradient, no
  weight decay).

:func:`unfreeze_batchnorm` removes the hooks and gives ``weight`` and
``bias`` back the ``requires_grad`` they had; the layers' modes were never
changed, so nothing else needs restoring. The mark (a dict in the layer's
``__dict__``) and the hooks survive ``copy.deepcopy``, ``pickle`` and
``torch.save(model)``; a ``state_dict`` does not carry them.

:func:`~batchnorm.tools.convert_batchnorm` makes new layer objects, which do
not carry the mark: convert first, then freeze.

Layers that are frozen by construction (:class:`~batchnorm.FrozenBatchNorm`,
torchvision's ``FrozenBatchNorm2d``) are left alone.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import display, require_batchnorm

__all__ = ["freeze_batchnorm", "frozen_batchnorm", "unfreeze_batchnorm"]

_MARK = "_batchnorm_freeze"


def _inference_pre_hook(module: nn.Module, args) -> None:  # noqa: ARG001
    mark = module.__dict__.get(_MARK)
    if mark is not None and mark["stats"] and module.training:
        module.training = False
        mark["restore_training"] = True


def _inference_post_hook(module: nn.Module, args, output) -> None:  # noqa: ARG001
    mark = module.__dict__.get(_MARK)
    if mark is not None and mark.pop("restore_training", False):
        module.training = True


def freeze_batchnorm(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze the statistics, the affine parameters, or both, of every BN layer of ``model``.

    Frozen statistics survive ``model.train()``: see :mod:`batchnorm.tools.freeze`.
    Freezing again adds to what is frozen (``stats=False, affine=True`` on a
    layer whose statistics are frozen keeps them frozen);
    :func:`unfreeze_batchnorm` undoes all of it at once.

    Args:
        model: the model, or a part of it (``model.backbone``).
        stats: run every BN layer in inference mode, whatever the model's mode.
            Default: ``True``.
        affine: ``requires_grad=False`` on every BN ``weight`` and ``bias``.
            Default: ``True``.

    Returns:
        ``model``, changed in place.

    Raises:
        ValueError: both ``stats`` and ``affine`` are false; ``model`` has no
            BN layer; ``stats`` and a layer has no running statistics
            (``track_running_stats=False``: it has nothing to freeze to).
            Nothing is changed then.

    Example:
        >>> import torch
        >>> from batchnorm.tools import freeze_batchnorm, unfreeze_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> net = freeze_batchnorm(net).train()
        >>> _ = net(torch.randn(8, 4))
        >>> net[1].running_mean.tolist(), net[1].weight.requires_grad
        ([0.0, 0.0, 0.0], False)
        >>> unfreeze_batchnorm(net)[1].weight.requires_grad
        True
    """
    if not (stats or affine):
        raise ValueError("freeze_batchnorm: stats and affine are both False; nothing to freeze")
    layers = [(n, m) for n, m in require_batchnorm(model, "freeze_batchnorm")
              if isinstance(m, _BatchNorm)]
    if stats:
        bad = [display(n) for n, m in layers
               if m.running_mean is None or m.running_var is None]
        if bad:
            raise ValueError("freeze_batchnorm: these layers have no running statistics "
                             "(track_running_stats=False), so their statistics cannot be "
                             "frozen (pass stats=False to freeze only weight and bias): "
                             + ", ".join(bad))
    for _, m in layers:
        mark = m.__dict__.get(_MARK)
        if mark is None:
            mark = {"stats": False, "affine": False, "requires_grad": {}, "hooks": ()}
            m.__dict__[_MARK] = mark
        if stats and not mark["stats"]:
            mark["stats"] = True
            mark["hooks"] = (m.register_forward_pre_hook(_inference_pre_hook),
                             m.register_forward_hook(_inference_post_hook, always_call=True))
        if affine and not mark["affine"]:
            mark["affine"] = True
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    mark["requires_grad"][name] = p.requires_grad
                    p.requires_grad_(False)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm` on every BN layer of ``model``.

    Hooks removed, ``requires_grad`` of ``weight`` and ``bias`` as before the
    first freeze; layers that were not frozen are not touched.

    Returns:
        ``model``, changed in place.

    Raises:
        ValueError: ``model`` has no BN layer.
    """
    for _, m in require_batchnorm(model, "unfreeze_batchnorm"):
        mark = m.__dict__.pop(_MARK, None)
        if mark is None:
            continue
        for handle in mark["hooks"]:
            handle.remove()
        for name, requires_grad in mark["requires_grad"].items():
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(requires_grad)
    return model


def frozen_batchnorm(model: nn.Module) -> dict[str, dict[str, bool]]:
    """``{layer name: {"stats": ..., "affine": ...}}`` for the layers frozen by
    :func:`freeze_batchnorm`.

    Example:
        >>> import torch
        >>> from batchnorm.tools import freeze_batchnorm, frozen_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
        >>> _ = freeze_batchnorm(net[1], affine=False)
        >>> frozen_batchnorm(net)
        {'1': {'stats': True, 'affine': False}}
    """
    return {name: {"stats": mark["stats"], "affine": mark["affine"]}
            for name, m in model.named_modules() if (mark := m.__dict__.get(_MARK))}
