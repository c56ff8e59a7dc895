"""PACTCallback: learned-clip activation quantization (Choi et al. 2018) for any LightningModule."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback, QuantizerGroup
from lightning_quant.config import PACTConfig
from lightning_quant.optim import WEIGHT_GROUP_NAME
from lightning_quant.quantizers.base import check_positive
from lightning_quant.quantizers.lsq import LSQWeight
from lightning_quant.quantizers.pact import PACTActivation


class PACTCallback(QuantizationCallback):
    r"""Quantization-aware training with PACT: every ``nn.ReLU``/``nn.ReLU6`` becomes ``clip(x, 0, alpha)``
    quantized to ``act_bits`` with a learned ``alpha`` per call site, and Linear/Conv weights are quantized to
    ``weight_bits`` with a learned step (LSQ, the default) or DoReFa-style.

    The model is not edited by the user: the callback swaps the modules in ``setup``, puts every alpha in one
    optimizer group of its own, logs each clip as ``pact/alpha/<layer>`` every epoch, and stores what is needed to
    rebuild the model in the checkpoint (:func:`lightning_quant.load_from_checkpoint`).

    Example::

        trainer = Trainer(callbacks=[PACTCallback(act_bits=4, weight_bits=4)])
        trainer.fit(model)

    Args:
        act_bits: Bit width of the activations, 1..16 (paper: 2-5 bits keep accuracy).
        weight_bits: Bit width of the weights, 2..16 (1..16 with DoReFa), or None to keep the weights float
            (activation-only PACT).
        weight_quantizer: ``"lsq"`` (default): a learned step per tensor (LSQ, Esser et al. 2019; PACT's learned clip
            applied to weights), started at the MSE-optimal clip of each weight; it keeps the weight's scale and
            has a zero level (pruned weights stay 0). ``"dorefa"``: the paper's DoReFa weights, which lie in
            [-1, 1] whatever the weight's scale (harmless before BatchNorm, harmful in a Linear without it) and
            have no zero level.
        per_channel: One LSQ step per output channel.
        weight_quantizer_lr: Learning rate of the LSQ steps' own group (``lightning_quant.weights``, no weight
            decay). None (default): the lr of the weights they scale, following the user's schedule, as in LSQ;
            above 4 bits times ``7 / Qp`` (``Qp = 2**(bits-1) - 1``), in a group of its own
            (``lightning_quant.weights.x<scale>``): Adam moves a parameter by about its lr per update whatever the
            gradient, and an 8-bit step is 18x smaller than a 4-bit one, so at the weights' lr it is driven through
            zero (measured: PACT W8A8 from scratch on digits at lr 1e-3 fell to chance on 2 of 4 seeds). The scale
            keeps an 8-bit step's relative move per update what a 4-bit step's is.
        alpha_init: None (default): each call site's clip starts from the data it sees on the first training
            batch(es) (``calibration``), which is what a trained model needs: a fixed large clip puts every low-bit
            level above its activations. A number: every clip starts there and is not calibrated; the paper's
            choice is 10 with ``alpha_weight_decay=2e-4`` pulling it down, the other common one a small start with
            no decay. ReLU6 sites start at ``min(alpha_init, 6)``.
        alpha_lr: Learning rate of the alpha group, the highest it sees under the user's LR scheduler (see
            ``lr_schedule``). Larger than the usual fine-tuning lr on purpose: with a small one alpha barely moves from
            its start and PACT is inert.
        alpha_weight_decay: Weight decay of the alpha group (the paper's L2 regularisation of alpha, 2e-4 in its CIFAR
            runs with ``alpha_init=10``). Default 0: a calibrated clip needs no pull.
        skip: A module name or glob pattern (``"features.0"``, ``"*.downsample.*"``), or a list of them, left float
            with what is under them; None skips nothing. A pattern that matches nothing is an error listing the
            modules that exist.
        first_last: ``"float"`` (paper): the first and last weight layers keep float weights and the activation that
            feeds the last layer stays float (the first layer's input is the model's input, never quantized).
            ``"8bit"``: those places take 8 bits. ``"quantize"``: they take ``act_bits``/``weight_bits`` like the rest.
            First and last follow execution order when the model has ``example_input_array`` (a dry run), module
            registration order otherwise.
        lr_schedule: ``"follow"`` (default): the alpha group follows the user's LR scheduler in proportion, peaking at
            ``alpha_lr`` where the user's lr peaks (its base lr; ``max_lr`` under OneCycleLR and CyclicLR; where a
            LambdaLR factor is 1), so alpha settles as the weights do.
            ``"constant"``: the alpha group's lr stays ``alpha_lr`` whatever the scheduler does.
        log_every_n_steps: Also log the clips every n steps (default: once per epoch).
        plot: At the end of fitting, write ``pact_alpha.png`` (learned clip per layer beside the largest activation
            that layer saw) into the logger's folder. Tracking the largest activation costs one reduction per
            quantized activation per step, so it is off by default.
        verbose: Print the quantization plan at fit start.
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
        calibration: ``"percentile"`` (default: the 99.99th percentile of what the site sees), ``"mse"`` (the clip
            minimising the quantization error at ``act_bits``) or ``"max"``; see :class:`QuantizationCallback`.
            Measured (README "Accuracy", fine-tuning on MNIST-5k): at 2 bits the MSE-optimal clip cuts most large
            activations and the run is unstable (W2A2 89.85 against 95.68 with the percentile, 4 seeds); at 4 bits
            both hold FP32's accuracy.
        calibration_batches: Training batches each clip's estimate is averaged over (default 1).

    Raises:
        ValueError: If an argument is out of range (bits not an int in 1..16, ``alpha_init`` or ``alpha_lr`` not
            positive, unknown ``weight_quantizer``, ``first_last`` or ``lr_schedule``).
    """

    log_prefix = "pact"
    _arg_names = {"quantizer_lr": "alpha_lr", "quantizer_weight_decay": "alpha_weight_decay"}

    def __init__(
        self,
        act_bits: int = 4,
        weight_bits: int | None = 4,
        weight_quantizer: str = "lsq",
        per_channel: bool = False,
        weight_quantizer_lr: float | None = None,
        alpha_init: float | None = None,
        alpha_lr: float = 0.01,
        alpha_weight_decay: float = 0.0,
        skip: str | Sequence[str] | None = (),
        first_last: str = "float",
        lr_schedule: str = "follow",
        log_every_n_steps: int | None = None,
        plot: bool = False,
        verbose: bool = True,
        compile_quantizers: bool | str | None = None,
        freeze_bn_stats: float | None = None,
        reestimate_bn: int = 10,
        calibration: str = "percentile",
        calibration_batches: int = 1,
        quantize_inputs: bool = True,
    ) -> None:
        config = PACTConfig(
            quantize_inputs=quantize_inputs,
            act_bits=act_bits,
            weight_bits=weight_bits,
            alpha_init=alpha_init,
            first_last=first_last,
            skip=skip,
            weight_quantizer=weight_quantizer,
            per_channel=per_channel,
        )
        if weight_quantizer_lr is not None:
            check_positive(weight_quantizer_lr, "weight_quantizer_lr")
        self.weight_quantizer_lr = None if weight_quantizer_lr is None else float(weight_quantizer_lr)
        super().__init__(
            config,
            quantizer_lr=alpha_lr,
            quantizer_weight_decay=alpha_weight_decay,
            lr_schedule=lr_schedule,
            log_every_n_steps=log_every_n_steps,
            verbose=verbose,
            compile_quantizers=compile_quantizers,
            freeze_bn_stats=freeze_bn_stats,
            reestimate_bn=reestimate_bn,
            calibration=calibration,
            calibration_batches=calibration_batches,
        )
        self.plot = plot
        self._max_seen: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

    @override
    def quantizer_groups(self, pl_module: pl.LightningModule) -> list[QuantizerGroup]:
        """Clips in ``lightning_quant`` (``alpha_lr``, ``alpha_weight_decay``); LSQ steps in
        ``lightning_quant.weights`` (``weight_quantizer_lr``, no decay: it would shrink the steps)."""
        (clips,) = super().quantizer_groups(pl_module)
        layers = [m for m in pl_module.modules() if isinstance(getattr(m, "weight_quantizer", None), LSQWeight)]
        step_ids = {id(m.weight_quantizer.step) for m in layers}
        clips.params = [p for p in clips.params if id(p) not in step_ids]
        by_scale: dict[float, list[nn.Module]] = {1.0: []}
        for layer in layers:
            scale = 1.0 if self.weight_quantizer_lr is not None else _step_lr_scale(layer.weight_quantizer.bits)
            by_scale.setdefault(scale, []).append(layer)
        return [clips] + [
            QuantizerGroup(
                WEIGHT_GROUP_NAME if scale == 1.0 else f"{WEIGHT_GROUP_NAME}.x{scale:.4g}",
                [m.weight_quantizer.step for m in group],
                self.weight_quantizer_lr,
                0.0,
                [m.weight for m in group],
                lr_scale=scale,
            )
            for scale, group in by_scale.items()
            if group or scale == 1.0
        ]

    @override
    def learned_values(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        values = {}
        for name, module in pl_module.named_modules():
            if isinstance(module, PACTActivation):
                for key, alpha in zip(module.site_names(name), module.alpha.detach()):
                    values[f"alpha/{key}"] = alpha
        return values

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.plot:
            self._max_seen = {}
            for name, module in pl_module.named_modules():
                if isinstance(module, PACTActivation):
                    self._hooks.append(module.register_forward_pre_hook(self._track_max(name)))

    def _track_max(self, name: str):
        def hook(module: PACTActivation, args: tuple) -> None:
            if not module.training:
                return
            site = module.upcoming_site()
            key = module.site_names(name)[site]
            peak = args[0].detach().amax().float()
            previous = self._max_seen.get(key)
            self._max_seen[key] = peak if previous is None else torch.maximum(previous, peak)

        return hook

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.plot:
            folder = trainer.log_dir or trainer.default_root_dir
            self.save_plot(pl_module, os.path.join(folder, "pact_alpha.png"))

    @rank_zero_only
    def save_plot(self, pl_module: pl.LightningModule, path: str) -> None:
        """Bar chart of the learned clip per layer beside the largest activation each layer saw in training."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        alphas = {k.removeprefix("alpha/"): float(v) for k, v in self.learned_values(pl_module).items()}
        names = list(alphas)
        peaks = [float(self._max_seen[n]) if n in self._max_seen else float("nan") for n in names]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], peaks, width=0.4, label="largest activation seen")
        ax.bar([x + 0.2 for x in xs], [alphas[n] for n in names], width=0.4, label="learned clip alpha")
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
        ax.set_ylabel("value")
        ax.set_title(f"PACT: learned clip per layer ({type(pl_module).__name__}, {self.config.act_bits}-bit)")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _step_lr_scale(bits: int) -> float:
    """The LSQ step group's lr relative to the weights' (see ``weight_quantizer_lr``): ``min(1, 7 / Qp)``."""
    return min(1.0, 7.0 / (2 ** (bits - 1) - 1))
