"""The lifecycle shared by every quantization callback.

Where each step happens, and why (Lightning 2.x ``Trainer._run`` order):

* ``setup`` (every stage, before the checkpoint's weights load and before DDP wraps the model): inject the
  quantizers. Injection is idempotent, so ``fit`` twice or ``validate`` after ``fit`` changes nothing. Callbacks
  that captured the model in their own ``setup`` before this one ran (weight averaging) are set up again, and
  pairings that can not work are refused here, before any step (:mod:`lightning_quant.callbacks.interplay`).
* ``on_fit_start`` (after ``configure_optimizers``, before the optimizer state is restored): move the quantizer
  parameters into one optimizer group of their own, extend the LR schedulers for it, and measure the run's length
  for the schedules.
* ``on_train_batch_start``: move the schedules. Each value is a pure function of the optimizer step (or the epoch),
  read from the trainer at that moment, so every DDP rank agrees and a resumed run -- whose loop counters Lightning
  restores only after ``on_fit_start`` -- uses at every step the value the uninterrupted run used.
* ``on_validation_start`` (during fit) and ``on_train_epoch_end``: re-estimate the BatchNorm running statistics on
  the inputs of the last training forwards (``reestimate_bn``), before validation and checkpoints see them; then log
  what the quantizers learned.
* ``state_dict``/``load_state_dict``: plain values only (torch's ``weights_only`` loading accepts them); a
  checkpoint written with another recipe is refused. The recipe itself travels in the model's ``state_dict``
  (the buffer ``lightning_quant_recipe``), so weights-only checkpoints can be rebuilt too.

Subclasses only say which config they build, what to log and which schedules to move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.batchnorm import InputRecorder, batchnorms, common_ancestor, reestimate_batchnorm
from lightning_quant.calibration import get_clip_estimator
from lightning_quant.calibrator import ActivationCalibrator, check_calibration_batches
from lightning_quant.callbacks.interplay import check_other_callbacks
from lightning_quant.config import QuantConfig, recipe_difference
from lightning_quant.optim import (
    GROUP_NAME,
    LR_SCHEDULE_MODES,
    add_quantizer_group,
    extend_scheduler,
    find_quantizer_group,
    set_group_lr,
)
from lightning_quant.quantizers.base import ActivationQuantizer, WeightQuantizer, check_positive
from lightning_quant.schedules import ConstantSchedule, Schedule, progress_of
from lightning_quant.surgery import QuantizationPlan, inject_quantizers

CHECKPOINT_VERSION = 2


@dataclass
class QuantizerGroup:
    """One optimizer group of quantizer parameters.

    Args:
        name: The group's ``name`` (``LearningRateMonitor`` shows it).
        params: Its parameters.
        lr: Its learning rate (the highest it sees under the user's scheduler); None: the lr of the group holding
            ``reference``, following that group's schedule exactly.
        weight_decay: Its weight decay.
        reference: Parameters whose group sets the lr when ``lr`` is None.
        lr_scale: With ``lr=None``: the group's lr is the reference group's times this, following its schedule.
    """

    name: str
    params: list[nn.Parameter]
    lr: float | None
    weight_decay: float = 0.0
    reference: list[nn.Parameter] = field(default_factory=list)
    lr_scale: float = 1.0


#: Allowed values of ``schedule_by``: what "training progress" counts.
SCHEDULE_UNITS = ("step", "epoch")


@rank_zero_only
def _print(message: str) -> None:
    print(message, flush=True)


class QuantizationCallback(Callback):
    """Base class of :class:`PACTCallback`, :class:`DSQCallback` and :class:`QuantNoiseCallback`.

    Args:
        config: The recipe (what to quantize, how).
        quantizer_lr: Learning rate of the quantizer parameters' own optimizer group: the highest lr the group sees
            (see ``lr_schedule``). None only for methods without learned quantizer parameters.
        quantizer_weight_decay: Weight decay (L2) of that group.
        lr_schedule: ``"follow"``: the group follows the user's LR scheduler in proportion, peaking at
            ``quantizer_lr`` where the user's group peaks (its base lr for StepLR, CosineAnnealingLR,
            ExponentialLR and ReduceLROnPlateau; ``max_lr`` for OneCycleLR and CyclicLR; the lr at which a LambdaLR
            factor is 1). ``"constant"``: its lr stays ``quantizer_lr``.
        log_every_n_steps: Also log the learned values every n optimizer steps (None: once per epoch only).
        verbose: Print the quantization plan at fit start (rank zero).
        schedules: The method's schedules by name (e.g. ``{"temperature": CosineSchedule(0.4, 0.05)}``).
        schedule_by: What moves the schedules. ``"step"`` (default): the optimizer step, progress
            ``global_step / (total steps - 1)`` with the total from ``trainer.estimated_stepping_batches``, so the
            value moves over the whole run however it is bounded (``max_epochs``, ``max_steps``, both,
            ``limit_train_batches``, gradient accumulation) and a run of one epoch is not stuck at one value.
            ``"epoch"``: one value per epoch, progress ``epoch / (epochs - 1)`` (the papers' "each epoch"), with the
            number of epochs taken from ``max_epochs`` or, when ``max_steps`` ends the run first, from the steps.
            A run bounded by ``max_time`` alone has no known length: a moving schedule is then an error at fit start.
        compile_quantizers: Deprecated and ignored (warns once if given); removed in the next release. The
            quantizers' kernels are custom ops that PyTorch's dispatcher runs by device (C on CPU, Triton on CUDA);
            there is nothing left to switch.
        calibration: How activation clips still to be calibrated start: ``"mse"`` (default: the clip minimising
            the quantization MSE of what the site sees, at its bit width, as LSQ+ and ACIQ do), ``"percentile"``
            (99.99th percentile) or ``"max"``.
        calibration_batches: On how many of the first training batches each site's clip is estimated (the mean
            of the per-batch estimates, written before each of those forwards quantizes; under DDP averaged across
            ranks). A resumed run or a reloaded model never calibrates again.
        freeze_bn_stats: None (default): BatchNorm trains as the user set it up. A fraction ``f`` of the run (in
            the ``schedule_by`` unit): from there on every BatchNorm layer runs in eval mode during training, so it
            normalises with its running statistics and stops updating them (torch.ao's ``freeze_bn_stats``): the
            last part of training sees the statistics the deployed model (BatchNorm folded into the weights) uses.
            Its affine weight and bias still train.
        reestimate_bn: Re-estimate the BatchNorm running statistics from the inputs of the last ``n`` training
            forwards (default 10), before each validation during fit and at each epoch's end, so validation,
            checkpoints and the trained model use statistics of the weights and clips they have (Nagel et al. 2022).
            The running averages kept during training mix statistics of many steps' weights, and a low-bit weight
            flips between levels from step to step: measured on MNIST-5k (README "Accuracy"). The inputs replayed
            are those of the smallest module holding every BatchNorm and quantized layer (kept detached, ``n`` of
            them: the memory of ``n`` input batches), run without gradients, dropout off, quantizers as in
            evaluation; the statistics are averaged across DDP ranks. BatchNorm layers the user keeps in eval mode,
            or frozen by ``freeze_bn_stats``, are left alone. 0 turns it off.

    Raises:
        ValueError: If an argument is out of range.
    """

    #: Prefix of logged keys, e.g. ``"pact"``.
    log_prefix = "quant"
    #: Whether the method has learned quantizer parameters (which then need ``quantizer_lr``).
    learns_parameters = True
    #: Public argument names of the quantizer lr/wd in a subclass (PACT calls them ``alpha_lr``...), for messages.
    _arg_names: dict[str, str] = {}

    def __init__(
        self,
        config: QuantConfig,
        quantizer_lr: float | None,
        quantizer_weight_decay: float = 0.0,
        lr_schedule: str = "follow",
        log_every_n_steps: int | None = None,
        verbose: bool = True,
        schedules: dict[str, Schedule] | None = None,
        schedule_by: str = "step",
        compile_quantizers: bool | str | None = None,
        calibration: str = "mse",
        calibration_batches: int = 1,
        freeze_bn_stats: float | None = None,
        reestimate_bn: int = 10,
    ) -> None:
        super().__init__()
        if isinstance(reestimate_bn, bool) or not isinstance(reestimate_bn, int) or reestimate_bn < 0:
            raise ValueError(
                "`reestimate_bn` must be an int >= 0 (how many of the last training forwards BatchNorm statistics are"
                f" re-estimated on; 0 turns it off), got {reestimate_bn!r}."
            )
        self.reestimate_bn = reestimate_bn
        self._bn_recorder: InputRecorder | None = None
        self._bn_layers: list[nn.Module] = []
        self._bn_training: list[nn.Module] = []  # those in training mode at the last training step
        self._bn_module_name = ""
        self._bn_steps = 0  # training steps since the last re-estimation
        self._bn_warned = False
        if freeze_bn_stats is not None and (
            isinstance(freeze_bn_stats, bool)
            or not isinstance(freeze_bn_stats, (int, float))
            or not 0.0 <= freeze_bn_stats <= 1.0
        ):
            raise ValueError(
                "`freeze_bn_stats` must be None or a fraction of the run in [0, 1] (where BatchNorm stops updating"
                f" its running statistics and normalises with them), got {freeze_bn_stats!r}."
            )
        self.freeze_bn_stats = None if freeze_bn_stats is None else float(freeze_bn_stats)
        get_clip_estimator(calibration)  # validates the name
        check_calibration_batches(calibration_batches)
        self.calibration = calibration
        self.calibration_batches = calibration_batches
        self._calibrator: ActivationCalibrator | None = None
        if compile_quantizers is not None:
            rank_zero_deprecation(
                "`compile_quantizers` is deprecated and ignored: each quantizer has one kernel per device, chosen by"
                " PyTorch's dispatcher. Remove the argument; it goes in the next release."
            )
        lr_name = self._arg_names.get("quantizer_lr", "quantizer_lr")
        if self.learns_parameters:
            if quantizer_lr is None:
                raise ValueError(
                    f"`{lr_name}` must be a finite number > 0 (the learning rate of the quantizer parameters' own"
                    f" optimizer group), got None."
                )
            check_positive(quantizer_lr, lr_name)
        check_positive(
            quantizer_weight_decay,
            self._arg_names.get("quantizer_weight_decay", "quantizer_weight_decay"),
            allow_zero=True,
        )
        if lr_schedule not in LR_SCHEDULE_MODES:
            raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULE_MODES}, got {lr_schedule!r}.")
        if schedule_by not in SCHEDULE_UNITS:
            raise ValueError(f"`schedule_by` must be one of {SCHEDULE_UNITS}, got {schedule_by!r}.")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps` must be None or an int >= 1, got {log_every_n_steps!r}.")
        self.config = config
        self.quantizer_lr = None if quantizer_lr is None else float(quantizer_lr)
        self.quantizer_weight_decay = float(quantizer_weight_decay)
        self.lr_schedule = lr_schedule
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        self.schedules: dict[str, Schedule] = dict(schedules or {})
        self.schedule_by = schedule_by
        self.plan: QuantizationPlan | None = None
        self._groups: list[tuple[int, int, float | None]] = []  # (optimizer, group, constant lr or None)
        self._run_length: int | None = None  # total optimizer steps or epochs, measured at fit start
        self._applied: dict[str, float] = {}  # the schedule values last written into the modules
        self._warned = False

    # ------------------------------------------------------------------ what subclasses provide
    def apply_schedule_values(self, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        """Write the schedule values into the quantizer modules (subclasses that have schedules)."""

    def learned_values(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """What to log each epoch, keys without the ``log_prefix``."""
        return {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def quantizer_modules(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in pl_module.named_modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))]

    def quantizer_parameters(self, pl_module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Every parameter owned by a quantizer, by name, once (identity), in registration order."""
        ids = {id(p) for _, m in self.quantizer_modules(pl_module) for p in m.parameters()}
        return [(n, p) for n, p in pl_module.named_parameters() if id(p) in ids]

    def recipe(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"{type(self).__name__} supports single-device training and DDP (`strategy` 'auto', 'ddp', 'ddp_spawn',"
                f" 'ddp_find_unused_parameters_true', ...), got {type(strategy).__name__}. Sharded strategies (FSDP,"
                " DeepSpeed) are not supported yet."
            )

    # ------------------------------------------------------------------ schedules
    def _moving_schedules(self) -> list[str]:
        return [name for name, s in self.schedules.items() if not isinstance(s, ConstantSchedule)]

    def _measure_run_length(self, trainer: pl.Trainer) -> int | None:
        """Total optimizer steps (``schedule_by="step"``) or epochs (``"epoch"``) of the run; None if unknown."""
        steps = trainer.estimated_stepping_batches
        if self.schedule_by == "step":
            return max(int(steps), 1) if math.isfinite(steps) else None
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if trainer.max_steps == -1 or not math.isfinite(steps):
            return epochs
        # `max_steps` may end the run before `max_epochs` does: count the epochs those steps take.
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return epochs
        per_epoch = max(math.ceil(batches / max(trainer.accumulate_grad_batches, 1)), 1)
        by_steps = max(math.ceil(int(steps) / per_epoch), 1)
        return by_steps if epochs is None else min(epochs, by_steps)

    def _check_run_length(self, trainer: pl.Trainer) -> None:
        moving = self._moving_schedules()
        needs_length = bool(self.schedules) or self.freeze_bn_stats is not None
        self._run_length = self._measure_run_length(trainer) if needs_length else None
        if self.freeze_bn_stats is not None and self._run_length is None:
            raise ValueError(
                f"{type(self).__name__}: `freeze_bn_stats={self.freeze_bn_stats}` is a fraction of the run, and this"
                f" run has no known length (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, max_time"
                " set). Set `max_steps` or `max_epochs` on the Trainer."
            )
        if moving and self._run_length is None:
            raise ValueError(
                f"{type(self).__name__}: the schedule of {moving} needs the run's length, and this run has none"
                f" (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, max_time set: a time limit alone"
                " does not say how many steps remain). Set `max_steps` or `max_epochs` on the Trainer, or give"
                " a constant value."
            )
        if moving and self._run_length == 1:
            rank_zero_warn(
                f"{type(self).__name__}: this run has a single {self.schedule_by}, so the schedule of {moving} holds"
                " its start value throughout. Use `schedule_by='step'` to move it within the epoch.",
            )

    def training_progress(self, trainer: pl.Trainer) -> float:
        """Where the run is, in [0, 1]: the optimizer step (or epoch) over the last one of the run."""
        if not self._run_length:
            return 0.0
        position = trainer.global_step if self.schedule_by == "step" else trainer.current_epoch
        return progress_of(position, self._run_length)

    def schedule_values(self, trainer: pl.Trainer) -> dict[str, float]:
        """Every schedule's value at the trainer's current position."""
        progress = self.training_progress(trainer)
        return {name: schedule.at(progress) for name, schedule in self.schedules.items()}

    def _apply_schedules(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self.schedule_values(trainer)
        if values != self._applied:  # one write per change, not one per step
            self.apply_schedule_values(pl_module, values)
            self._applied = values

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        example = getattr(pl_module, "example_input_array", None)
        self.plan = inject_quantizers(pl_module, self.config, warn=False, example_input=example)
        check_other_callbacks(trainer, self, pl_module, stage)
        if not self._warned:
            self._warned = True
            for message in self.plan.warnings:
                rank_zero_warn(message)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_run_length(trainer)
        if self.verbose and self.plan is not None:
            _print(self.plan.format(f"{type(self).__name__}: quantization plan of {type(pl_module).__name__}"))
        if getattr(trainer.strategy, "_start_method", "popen") != "popen":
            rank_zero_warn(
                f"{type(self).__name__} with strategy {type(trainer.strategy).__name__}"
                f"(start_method={trainer.strategy._start_method!r}): Lightning copies the trained weights back into"
                " your model object with `strict=False`, which drops the quantizer parameters because that object was"
                " never injected. After `fit`, load the trained quantized model with"
                " `lightning_quant.load_from_checkpoint(YourModule, checkpoint_path)`, or use `strategy='ddp'`."
            )
        self._groups = []
        if trainer.optimizers:
            for group in self.quantizer_groups(pl_module):
                if group.params:
                    self._groups.append(self._add_group(trainer, group))
        self._remove_calibrator()
        calibrator = ActivationCalibrator(pl_module, self.calibration, self.calibration_batches)
        self._calibrator = None if calibrator.done else calibrator
        self._start_bn_recorder(pl_module)
        self._applied = {}
        if trainer.ckpt_path is None:
            # A fresh run starts at the start values. A resumed one is left alone: its loop counters are still 0 at
            # this point, and the restored buffers hold the right values until the first batch sets them.
            self._apply_schedules(trainer, pl_module)

    def quantizer_groups(self, pl_module: pl.LightningModule) -> list[QuantizerGroup]:
        """The optimizer groups the quantizer parameters go to; by default one, with ``quantizer_lr``."""
        if self.quantizer_lr is None:
            return []
        params = [p for _, p in self.quantizer_parameters(pl_module)]
        return [QuantizerGroup(GROUP_NAME, params, self.quantizer_lr, self.quantizer_weight_decay)]

    def _add_group(self, trainer: pl.Trainer, group: QuantizerGroup) -> tuple[int, int, float | None]:
        """Add (or find) one quantizer group; returns ``(optimizer index, group index, lr to hold or None)``."""
        constant = group.lr if self.lr_schedule == "constant" else None
        for i, optimizer in enumerate(trainer.optimizers):
            existing = find_quantizer_group(optimizer, group.name)
            if existing is not None:  # the user returned an optimizer this callback already extended
                return i, existing, constant
        opt_index, group_index, source = add_quantizer_group(
            trainer.optimizers, group.params, group.lr, group.weight_decay, group.name, group.reference, group.lr_scale
        )
        optimizer = trainer.optimizers[opt_index]
        for config in trainer.lr_scheduler_configs:
            if getattr(config.scheduler, "optimizer", None) is optimizer:
                extend_scheduler(config.scheduler, source, group.lr, group.lr_scale)
        if constant is not None:
            set_group_lr(optimizer, group_index, constant)
        return opt_index, group_index, constant

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_schedules(trainer, pl_module)
        if self.freeze_bn_stats is not None and self.training_progress(trainer) >= self.freeze_bn_stats:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                    module.eval()  # Lightning puts the model back in train mode after each validation: re-applied
        for opt_index, group_index, constant in self._groups:
            if constant is not None:
                set_group_lr(trainer.optimizers[opt_index], group_index, constant)

    def _remove_calibrator(self) -> None:
        if self._calibrator is not None:
            self._calibrator.remove()
            self._calibrator = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_calibrator()
        self._stop_bn_recorder()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_calibrator()
        self._stop_bn_recorder()

    # ------------------------------------------------------------------ BatchNorm re-estimation
    def _start_bn_recorder(self, pl_module: pl.LightningModule) -> None:
        self._stop_bn_recorder()
        layers = batchnorms(pl_module)
        if not self.reestimate_bn or not layers:
            return
        quantized = [m for _, m in self.quantizer_modules(pl_module)]
        name, module = common_ancestor(pl_module, [*layers, *quantized])
        self._bn_recorder = InputRecorder(module, self.reestimate_bn)
        self._bn_layers, self._bn_module_name = layers, name or type(pl_module).__name__

    def _stop_bn_recorder(self) -> None:
        if self._bn_recorder is not None:
            self._bn_recorder.remove()
            self._bn_recorder = None
        self._bn_layers, self._bn_training, self._bn_steps = [], [], 0

    def _reestimate_bn(self, trainer: pl.Trainer) -> None:
        """Re-estimate the statistics of the BatchNorm layers that trained, if a training forward ran since the
        last time (the same on every rank: the ranks step together, and the reduction is collective)."""
        recorder = self._bn_recorder
        if recorder is None or self._calibrator is not None or not self._bn_training or not self._bn_steps:
            return
        self._bn_steps = 0
        if not recorder.fresh:
            if not self._bn_warned:
                self._bn_warned = True
                rank_zero_warn(
                    f"{type(self).__name__}: BatchNorm statistics are not re-estimated: `{self._bn_module_name}`, the"
                    " smallest module holding every BatchNorm and quantized layer, is never called in a training step"
                    " (its submodules are called one by one). Pass `reestimate_bn=0` to silence this."
                )
            return
        with trainer.precision_plugin.train_step_context():  # autocast as the recorded forwards ran (mixed precision)
            reestimate_batchnorm(recorder.module, recorder.forwards(), self._bn_training)
        recorder.mark_used()
        if trainer.world_size > 1:
            for layer in self._bn_training:
                for stat in (layer.running_mean, layer.running_var):
                    stat.copy_(trainer.strategy.reduce(stat.clone(), reduce_op="mean"))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._reestimate_bn(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._calibrator is not None and self._calibrator.done:
            self._remove_calibrator()
        if self._bn_recorder is not None:
            self._bn_training = [m for m in self._bn_layers if m.training]
            self._bn_steps += 1
        if self.log_every_n_steps and trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reestimate_bn(trainer)
        self._log(trainer, pl_module, on_step=False)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        values: dict[str, Any] = dict(self.learned_values(pl_module))
        values.update(self._applied or self.schedule_values(trainer))
        for key, value in values.items():
            # The values are identical on every rank (DDP keeps them so): per-step logs skip the reduction; per-epoch
            # logs take it (a few scalars) because Lightning expects epoch-level logs to be synced under DDP.
            if on_step:
                pl_module.log(f"{self.log_prefix}/{key}", value, on_step=True, on_epoch=False, rank_zero_only=True)
            else:
                pl_module.log(f"{self.log_prefix}/{key}", value, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.recipe(),
            "schedules": {name: s.to_dict() for name, s in self.schedules.items()},
            "schedule_by": self.schedule_by,
            "quantizer_lr": self.quantizer_lr,
            "quantizer_weight_decay": self.quantizer_weight_decay,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        if saved != self.recipe():
            difference = recipe_difference(saved, self.recipe())
            raise ValueError(
                f"The checkpoint was written with another quantization recipe ({difference})."
                f" Resume with the same {type(self).__name__} arguments, or start a new fit without `ckpt_path`."
            )
        saved_schedules = state_dict.get("schedules", {})
        mine_schedules = {name: s.to_dict() for name, s in self.schedules.items()}
        saved_by = state_dict.get("schedule_by", self.schedule_by)
        if (saved_schedules and saved_schedules != mine_schedules) or saved_by != self.schedule_by:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's schedules {saved_schedules} (by {saved_by}) differ from this"
                f" callback's {mine_schedules} (by {self.schedule_by}); the run continues with this callback's."
            )
