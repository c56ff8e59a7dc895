"""Rebuild a trained quantized model from a Lightning checkpoint, without a Trainer."""

from __future__ import annotations

import inspect
from os import PathLike
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_quant.config import config_from_dict
from lightning_quant.surgery import RECIPE_KEY, QuantizationPlan, decode_recipe, inject_quantizers

#: Key of the checkpoint entry written by lightning_quant 0.1's callbacks; still read, no longer written (the recipe
#: now travels in the model's own ``state_dict`` under :data:`~lightning_quant.surgery.RECIPE_KEY`).
CHECKPOINT_KEY = "lightning_quant"
M = TypeVar("M", bound=nn.Module)


def _init_kwargs(module_cls: type, checkpoint: dict[str, Any], init_kwargs: dict[str, Any]) -> dict[str, Any]:
    saved = dict(checkpoint.get("hyper_parameters") or {})
    params = inspect.signature(module_cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        saved = {k: v for k, v in saved.items() if k in params}
    return {**saved, **init_kwargs}


def checkpoint_recipe(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The ``{"config": ..., "plan": ...}`` recipe stored in a loaded checkpoint.

    Raises:
        KeyError: If the checkpoint holds none, with what to call instead.
    """
    state = checkpoint.get("state_dict", checkpoint)
    for key, value in state.items():
        if key == RECIPE_KEY or key.endswith("." + RECIPE_KEY):
            return decode_recipe(value)
    if CHECKPOINT_KEY in checkpoint:  # written by lightning_quant 0.1 as a checkpoint entry: still readable
        return checkpoint[CHECKPOINT_KEY]
    quantizer_keys = [k for k in state if k.endswith((".alpha", ".lower", ".upper")) or ".weight_quantizer." in k]
    if quantizer_keys:
        raise KeyError(
            f"The checkpoint holds quantizer parameters ({quantizer_keys[:3]}...) but no recipe (no {RECIPE_KEY!r}"
            " key): it was written by an older lightning_quant with `save_weights_only=True`. Build the model, call"
            " `lightning_quant.inject_quantizers(model, <the config it was trained with>)`, then"
            " `model.load_state_dict(checkpoint['state_dict'])`."
        )
    raise KeyError(
        f"The checkpoint holds no quantization recipe (no {RECIPE_KEY!r} key in its state_dict): it was written from a"
        " model without quantizers. Load it with your module's own `YourModule.load_from_checkpoint(path)`; to"
        " quantize it, fine-tune it with a lightning_quant callback."
    )


def inject_from_checkpoint(model: M, checkpoint: dict[str, Any]) -> M:
    """Inject the quantizers a checkpoint was trained with into ``model`` and load its weights (strict).

    Works on full and weights-only Lightning checkpoints alike, and on a plain ``{"state_dict": ...}`` dict.

    Args:
        model: A freshly built, un-injected model of the class that was trained.
        checkpoint: A loaded checkpoint of a model that held lightning_quant quantizers.

    Raises:
        KeyError: If the checkpoint holds no recipe (the message says what to call instead).
        ValueError: If ``model`` does not give the structure the checkpoint was trained with.
    """
    entry = checkpoint_recipe(checkpoint)
    config = config_from_dict(entry["config"])
    saved = QuantizationPlan.from_dict(entry["plan"])
    example = getattr(model, "example_input_array", None)
    plan = inject_quantizers(model, config, warn=False, example_input=example, saved_plan=saved)
    if plan.structure() != saved.structure():
        raise ValueError(
            f"{type(model).__name__} as built now gives another quantization plan than the one in the checkpoint"
            f" (was the model's code or its init arguments changed?).\nNow:\n{plan.format()}\nCheckpoint:\n"
            f"{saved.format()}"
        )
    model.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=True)
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
        checkpoint_path: Path of a checkpoint written by a ``Trainer`` with a lightning_quant callback (full or
            ``save_weights_only=True``).
        map_location: Passed to :func:`torch.load`.
        **init_kwargs: Arguments for ``module_cls(...)``.

    Raises:
        KeyError: If the checkpoint holds no quantization recipe (the message says what to call instead).
        ValueError: If the rebuilt model's structure differs from the checkpoint's.
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    model = module_cls(**_init_kwargs(module_cls, checkpoint, init_kwargs))
    inject_from_checkpoint(model, checkpoint)
    return model.eval()
