"""Rebuild a trained quantized model from a Lightning checkpoint, without a Trainer."""

from __future__ import annotations

import inspect
from os import PathLike
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_quant.config import config_from_dict
from lightning_quant.surgery import QuantizationPlan, inject_quantizers

#: Key of the checkpoint entry the callbacks write (``on_save_checkpoint``) and :func:`load_from_checkpoint` reads.
CHECKPOINT_KEY = "lightning_quant"
M = TypeVar("M", bound=nn.Module)


def _init_kwargs(module_cls: type, checkpoint: dict[str, Any], init_kwargs: dict[str, Any]) -> dict[str, Any]:
    saved = dict(checkpoint.get("hyper_parameters") or {})
    params = inspect.signature(module_cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        saved = {k: v for k, v in saved.items() if k in params}
    return {**saved, **init_kwargs}


def inject_from_checkpoint(model: M, checkpoint: dict[str, Any]) -> M:
    """Inject the quantizers a checkpoint was trained with into ``model`` and load its weights (strict).

    Args:
        model: A freshly built, un-injected model of the class that was trained.
        checkpoint: A loaded Lightning checkpoint written while a lightning_quant callback was active.

    Raises:
        KeyError: If the checkpoint holds no lightning_quant entry.
        ValueError: If ``model`` does not give the structure the checkpoint was trained with.
    """
    if CHECKPOINT_KEY not in checkpoint:
        raise KeyError(
            f"The checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written while a lightning_quant callback was"
            " active. Load it with your module's own `load_from_checkpoint`."
        )
    entry = checkpoint[CHECKPOINT_KEY]
    config = config_from_dict(entry["config"])
    plan = inject_quantizers(model, config, warn=False, example_input=getattr(model, "example_input_array", None))
    saved = QuantizationPlan.from_dict(entry["plan"])
    if plan.structure() != saved.structure():
        raise ValueError(
            f"{type(model).__name__} as built now gives another quantization plan than the one in the checkpoint"
            f" (was the model's code or its init arguments changed?).\nNow:\n{plan.format()}\nCheckpoint:\n"
            f"{saved.format()}"
        )
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model


def load_from_checkpoint(
    module_cls: type[M], checkpoint_path: str | PathLike, map_location: Any = "cpu", **init_kwargs: Any
) -> M:
    """Build ``module_cls``, inject the quantizers recorded in the checkpoint, load the trained weights (strict).

    The model's init arguments come from the checkpoint's saved hyper-parameters (``save_hyperparameters()``),
    overridden by ``init_kwargs``. The returned model is in eval mode; its outputs equal those of the model that
    was saved.

    Args:
        module_cls: The LightningModule (or any ``nn.Module``) class that was trained.
        checkpoint_path: Path of a checkpoint written by a ``Trainer`` with a lightning_quant callback.
        map_location: Passed to :func:`torch.load`.
        **init_kwargs: Arguments for ``module_cls(...)``.

    Raises:
        KeyError: If the checkpoint was not written with a lightning_quant callback.
        ValueError: If the rebuilt model's structure differs from the checkpoint's.
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    model = module_cls(**_init_kwargs(module_cls, checkpoint, init_kwargs))
    inject_from_checkpoint(model, checkpoint)
    return model.eval()
