"""QuantNoiseCallback: quantization noise on a random fraction of the weights (Fan et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.config import QuantNoiseConfig
from lightning_quant.quantizers.quant_noise import QuantNoiseWeight
from lightning_quant.schedules import Schedule, as_schedule


class QuantNoiseCallback(QuantizationCallback):
    r"""Train with QuantNoise: at every training forward a fresh random fraction ``p`` of each covered layer's weights
    takes its quantized value (scalar mode) or is dropped by blocks (block mode); the rest stay float, and the
    gradient passes straight through. The stored weights never change outside the optimizer's step.

    At evaluation, scalar mode quantizes the whole weight to ``bits`` (scale and zero point observed from the current
    weights for ``2**bits`` levels); block mode uses no noise (the block proxy prepares for product quantization,
    a separate step). The rate ``p`` is a number or a schedule over the run (this package's addition; the paper
    keeps it fixed), logged as ``quant_noise/p``.

    Example::

        Trainer(callbacks=[QuantNoiseCallback(bits=4, p=LinearSchedule(0.1, 0.5))])

    Args:
        bits: Bit width of the scalar quantizer, 1..16 (scalar mode).
        p: Noise rate in [0, 1] ([0, 1) in block mode), or a :mod:`lightning_quant.schedules` object whose values
            stay there. fairseq: 0.5 for scalar noise, 0.05-0.2 for block noise.
        mode: ``"scalar"`` or ``"block"``.
        block_size: Consecutive input features per block in block mode (fairseq: 8); must divide every covered
            layer's input features (whole kernels are the blocks of k x k convolutions).
        layer_types: Layer types to cover: any of ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``,
            ``"Embedding"``.
        skip: A module name or glob pattern, or a list of them, left float (None: nothing skipped).
        first_last: ``"quantize"`` (default: the paper noises every layer), ``"float"`` or ``"8bit"``.
        log_every_n_steps: Also log ``quant_noise/p`` every n steps.
        verbose: Print the quantization plan at fit start.
        schedule_by: ``"step"`` (default: the schedule moves with every optimizer step over the whole run, however
            it is bounded) or ``"epoch"`` (one value per epoch); see :class:`QuantizationCallback`.
        compile_quantizers: Deprecated and ignored; see :class:`QuantizationCallback`.
        freeze_bn_stats: None (default) or the fraction of the run after which BatchNorm normalises with (and stops
            updating) its running statistics; see :class:`QuantizationCallback`.
        reestimate_bn: BatchNorm running statistics are re-estimated on the inputs of the last ``reestimate_bn``
            training forwards (default 10; 0: off) before each validation and at each epoch's end; see
            :class:`QuantizationCallback`.

    Raises:
        ValueError: If an argument is out of range; at ``setup``, if ``block_size`` does not divide a layer's input
            features (the message names the layer).
    """

    log_prefix = "quant_noise"
    learns_parameters = False

    def __init__(
        self,
        bits: int = 4,
        p: float | Schedule = 0.5,
        mode: str = "scalar",
        block_size: int = 8,
        layer_types: Sequence[str] = ("Linear", "Conv2d", "Embedding"),
        skip: str | Sequence[str] | None = (),
        first_last: str = "quantize",
        log_every_n_steps: int | None = None,
        verbose: bool = True,
        schedule_by: str = "step",
        compile_quantizers: bool | str | None = None,
        freeze_bn_stats: float | None = None,
        reestimate_bn: int = 10,
    ) -> None:
        config = QuantNoiseConfig(
            weight_bits=bits,
            mode=mode,
            block_size=block_size,
            layer_types=layer_types,
            skip=skip,
            first_last=first_last,
        )
        rate = as_schedule(p, "p")
        rate.check_range("p", 0.0, 1.0, low_open=False, high_open=mode == "block")
        super().__init__(
            config,
            quantizer_lr=None,
            log_every_n_steps=log_every_n_steps,
            verbose=verbose,
            schedule_by=schedule_by,
            schedules={"p": rate},
            compile_quantizers=compile_quantizers,
            freeze_bn_stats=freeze_bn_stats,
            reestimate_bn=reestimate_bn,
        )

    @override
    def apply_schedule_values(self, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        for module in pl_module.modules():
            if isinstance(module, QuantNoiseWeight):
                module.set_p(values["p"])
