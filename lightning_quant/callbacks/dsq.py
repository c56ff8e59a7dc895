"""DSQCallback: differentiable soft quantization (Gong et al., ICCV 2019) for any LightningModule."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.config import DSQConfig
from lightning_quant.quantizers.dsq import DSQActivation, DSQWeight
from lightning_quant.quantizers.inputs import DSQInput
from lightning_quant.schedules import ConstantSchedule, Schedule, as_schedule


class DSQCallback(QuantizationCallback):
    r"""Quantization-aware training with DSQ: a hard staircase forward and the gradient of a tanh-based soft
    staircase backward, so the gradient carries the quantization error (with the straight-through estimator it is
    the same at 8 bits and at 2).

    Every ``nn.ReLU``/``nn.ReLU6`` becomes a :class:`DSQActivation` (range ``[l, u]`` per call site, learned) and every
    Linear/Conv weight goes through a :class:`DSQWeight` (range per layer, learned, starting at the weight's
    ``[min, max]``). Activation ranges start from the first batch each site sees (``[0, u]`` with ``u`` the
    ``calibration`` estimate at the site's bit width, non-finite values ignored; under DDP averaged across ranks so
    every rank starts alike; ``l`` stays 0 unless ``learn_activation_lower=True``).
    The temperature (the paper's characteristic variable alpha in (0, 1); small = close to the hard step) is a
    number, a schedule over the run, or learned per layer (``learn_temperature=True``, the paper's mode).

    Logged each epoch: ``dsq/temperature`` (or ``dsq/temperature/<layer>`` when learned) and each layer's range as
    ``dsq/lower/<layer>`` and ``dsq/upper/<layer>``.

    Args:
        act_bits: Bit width of the activations, 1..16, or None to keep them float.
        weight_bits: Bit width of the weights, 1..16, or None to keep them float.
        temperature: alpha in (0, 1), or a :mod:`lightning_quant.schedules` object whose values stay in (0, 1),
            e.g. ``CosineSchedule(0.4, 0.05)``. With ``learn_temperature=True`` it must be a number (the start).
            Default 0.2, the start used by the paper's re-implementations.
        learn_temperature: Learn alpha per layer by gradient descent, kept inside (0, 1) by a sigmoid.
        learn_activation_lower: Learn the activations' lower bound ``l`` as well as ``u`` (weights always learn
            both). Off by default: after a ReLU about half the values sit exactly at ``l = 0``, and their share of
            the gradient drags a learned ``l`` off 0 within a few hundred steps (clipping every zero to ``l > 0``, or
            wasting a level below 0).
        quantizer_lr: Learning rate of the quantizer parameters' group (ranges, learned alphas). Default 1e-3: with
            Adam a range bound moves about this much per step, and weight ranges are ~0.1 wide.
        quantizer_weight_decay: Weight decay of that group (default 0: decay would shrink the ranges).
        skip: A module name or glob pattern, or a list of them, left float (None: nothing skipped).
        first_last: ``"float"`` (default, as in the paper), ``"8bit"`` or ``"quantize"``; see :class:`PACTCallback`.
        lr_schedule: ``"follow"`` or ``"constant"``; see :class:`PACTCallback`.
        log_every_n_steps: Also log every n steps.
        verbose: Print the quantization plan at fit start.
        schedule_by: ``"step"`` (default: the schedule moves with every optimizer step over the whole run, however
            it is bounded) or ``"epoch"`` (one value per epoch); see :class:`QuantizationCallback`.
        compile_quantizers: Deprecated and ignored; see :class:`QuantizationCallback`.
        quantize_inputs: Put every quantized layer's input on an ``act_bits`` grid where no quantized activation
            already does (GELU/SiLU/Hardswish outputs, residual sums, pooling, LayerNorm, the model's input under
            ``first_last="quantize"`` or ``"8bit"``), with a learned two-sided range calibrated like the clips
            (default True). False: only the ReLU/ReLU6 modules' outputs are quantized.
        freeze_bn_stats: None (default) or the fraction of the run after which BatchNorm normalises with (and stops
            updating) its running statistics; see :class:`QuantizationCallback`.
        reestimate_bn: BatchNorm running statistics are re-estimated on the inputs of the last ``reestimate_bn``
            training forwards (default 10; 0: off) before each validation and at each epoch's end; see
            :class:`QuantizationCallback`.
        calibration: How each activation range's upper bound starts: ``"mse"`` (default, the MSE-optimal clip at
            the site's bit width), ``"percentile"`` or ``"max"``; see :class:`QuantizationCallback`.
        calibration_batches: Training batches the estimate is averaged over (default 1).

    Raises:
        ValueError: If an argument is out of range (temperature or a schedule value outside (0, 1), bits not an int
            in 1..16, negative learning rate or weight decay).
    """

    log_prefix = "dsq"

    def __init__(
        self,
        act_bits: int | None = 4,
        weight_bits: int | None = 4,
        temperature: float | Schedule = 0.2,
        learn_temperature: bool = False,
        learn_activation_lower: bool = False,
        quantizer_lr: float = 1e-3,
        quantizer_weight_decay: float = 0.0,
        skip: str | Sequence[str] | None = (),
        first_last: str = "float",
        lr_schedule: str = "follow",
        log_every_n_steps: int | None = None,
        verbose: bool = True,
        schedule_by: str = "step",
        compile_quantizers: bool | str | None = None,
        freeze_bn_stats: float | None = None,
        reestimate_bn: int = 10,
        calibration: str = "mse",
        calibration_batches: int = 1,
        quantize_inputs: bool = True,
    ) -> None:
        schedule = as_schedule(temperature, "temperature")
        schedule.check_range("temperature", 0.0, 1.0)
        if learn_temperature is True and not isinstance(schedule, ConstantSchedule):
            raise ValueError(
                f"`temperature` must be a number when `learn_temperature=True` (it is the starting value), got"
                f" {temperature!r}."
            )
        config = DSQConfig(
            quantize_inputs=quantize_inputs,
            act_bits=act_bits,
            weight_bits=weight_bits,
            temperature=schedule.endpoints()[0],
            learn_temperature=learn_temperature,
            learn_activation_lower=learn_activation_lower,
            first_last=first_last,
            skip=skip,
        )
        super().__init__(
            config,
            quantizer_lr=quantizer_lr,
            quantizer_weight_decay=quantizer_weight_decay,
            lr_schedule=lr_schedule,
            log_every_n_steps=log_every_n_steps,
            verbose=verbose,
            schedule_by=schedule_by,
            schedules={} if learn_temperature else {"temperature": schedule},
            compile_quantizers=compile_quantizers,
            freeze_bn_stats=freeze_bn_stats,
            reestimate_bn=reestimate_bn,
            calibration=calibration,
            calibration_batches=calibration_batches,
        )

    @override
    def apply_schedule_values(self, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        if "temperature" not in values:
            return
        for module in pl_module.modules():
            if isinstance(module, (DSQActivation, DSQWeight, DSQInput)):
                module.set_temperature(values["temperature"])

    @override
    def learned_values(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for name, module in pl_module.named_modules():
            if isinstance(module, DSQActivation):
                keys = module.site_names(name)
                lower, upper = module.lower.detach(), module.upper.detach()
                temperature = module.get_temperature().detach()
                for i, key in enumerate(keys):
                    values[f"lower/{key}"] = lower[i]
                    values[f"upper/{key}"] = upper[i]
                    if module.learn_temperature:
                        values[f"temperature/{key}"] = temperature[i]
            elif isinstance(module, DSQWeight):
                layer = name.removesuffix(".weight_quantizer")
                values[f"lower/{layer}.weight"] = module.lower.detach()
                values[f"upper/{layer}.weight"] = module.upper.detach()
                if module.learn_temperature:
                    values[f"temperature/{layer}.weight"] = module.get_temperature().detach().reshape(())
        return values
