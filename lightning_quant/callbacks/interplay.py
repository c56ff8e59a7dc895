"""How the quantization callbacks live beside Lightning's own callbacks that touch the model.

The quantization callback edits the model in ``setup``. Callbacks that run their own ``setup`` first see the model as
it was:

* ``StochasticWeightAveraging`` and ``EMAWeightAveraging`` (any ``WeightAveraging``) copy the model in ``setup``; a
  copy taken before the swap lacks the quantizers' parameters and crashes once averaging starts. They are set up
  again right after the swap, so they average the quantized model in either order.
* ``ModelPruning`` keeps references to the layers it prunes. The swap keeps every layer object (it changes the
  layer's class in place), so those references stay valid in either order. A pruned weight must stay exactly 0 once
  quantized, which only a weight quantizer with a zero level guarantees: other pairings are refused here.
* ``BaseFinetuning`` freezes and unfreezes by walking modules, which includes the quantizers inside them; quantizers
  created after it froze a module start frozen too (:mod:`lightning_quant.surgery` copies the trainability of the
  layer they belong to).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging

from lightning_quant.surgery import weight_quantizers

try:  # lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging

    _AVERAGING: tuple[type[Callback], ...] = (StochasticWeightAveraging, WeightAveraging)
except ImportError:  # pragma: no cover - older lightning
    _AVERAGING = (StochasticWeightAveraging,)


def check_other_callbacks(trainer: pl.Trainer, me: Callback, pl_module: pl.LightningModule, stage: str) -> None:
    """Re-run the ``setup`` of averaging callbacks listed before ``me``; refuse pruning without a zero level.

    Args:
        trainer: The trainer.
        me: The quantization callback (its position in ``trainer.callbacks`` says who ran before it).
        pl_module: The model, already injected.
        stage: The stage passed to ``setup``.

    Raises:
        ValueError: If ``ModelPruning`` is used with a weight quantizer that has no zero level.
    """
    callbacks = list(trainer.callbacks)
    earlier = callbacks[: callbacks.index(me)] if me in callbacks else []
    for callback in earlier:
        if isinstance(callback, _AVERAGING):
            # Their setup only copies the model (no state yet: checkpoints are restored after setup).
            callback.setup(trainer, pl_module, stage)
    if any(isinstance(c, ModelPruning) for c in callbacks):
        lacking = sorted(
            {type(q).__name__ for _, q in weight_quantizers(pl_module) if not getattr(q, "has_zero_level", False)}
        )
        if lacking:
            raise ValueError(
                f"ModelPruning with {type(me).__name__}: the weight quantizer(s) {lacking} have no zero level, so a"
                " pruned weight (exactly 0) would be quantized to a non-zero value and the pruning undone. Use a"
                " weight quantizer with a zero level (PACT's default, weight_quantizer='lsq'; QuantNoise), keep the"
                " weights float (`weight_bits=None`), or prune after quantization-aware training."
            )
