"""The lifecycle shared by every quantization callback.

Where each step happens, and why (Lightning 2.x ``Trainer._run`` order):

* ``setup`` (every stage, before the checkpoint's weights load and before DDP wraps the model): inject the
  quantizers. Injection is idempotent, so ``fit`` twice or ``validate`` after ``fit`` changes nothing.
* ``on_fit_start`` (after ``configure_optimizers``, before the optimizer state is restored): move the quantizer
  parameters into one optimizer group of their own and extend the LR schedulers for it.
* ``on_train_epoch_start``: move the per-epoch schedules (pure functions of the epoch, so every DDP rank and every
  resumed run agrees).
* ``on_train_epoch_end``: log what the quantizers learned.
* ``on_save_checkpoint``: store the recipe and the plan under ``checkpoint["lightning_quant"]``, which is what
  :func:`lightning_quant.load_from_checkpoint` needs to rebuild the quantized model.
* ``state_dict``/``load_state_dict``: plain values only (torch's ``weights_only`` loading accepts them); a
  checkpoint written with another recipe is refused.

Subclasses only say which config they build, what to log and which schedules to move.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.checkpoint import CHECKPOINT_KEY
from lightning_quant.config import QuantConfig
from lightning_quant.functional import fused
from lightning_quant.optim import (
    LR_SCHEDULE_MODES,
    add_quantizer_group,
    extend_scheduler,
    find_quantizer_group,
    set_group_lr,
)
from lightning_quant.quantizers.base import ActivationQuantizer, WeightQuantizer, check_positive
from lightning_quant.schedules import Schedule
from lightning_quant.surgery import QuantizationPlan, inject_quantizers

CHECKPOINT_VERSION = 1


@rank_zero_only
def _print(message: str) -> None:
    print(message, flush=True)


class QuantizationCallback(Callback):
    """Base class of :class:`PACTCallback`, :class:`DSQCallback` and :class:`QuantNoiseCallback`.

    Args:
        config: The recipe (what to quantize, how).
        quantizer_lr: Learning rate of the quantizer parameters' own optimizer group.
        quantizer_weight_decay: Weight decay (L2) of that group.
        lr_schedule: ``"follow"``: the group follows the user's LR scheduler, scaled by ``quantizer_lr`` over the
            base lr of the group its parameters came from. ``"constant"``: its lr stays ``quantizer_lr``.
        log_every_n_steps: Also log the learned values every n optimizer steps (None: once per epoch only).
        verbose: Print the quantization plan at fit start (rank zero).
        compile_quantizers: How the quantizers' elementwise kernels run: ``"auto"`` (default: the native C kernels
            where they apply -- PACT, DoReFa and DSQ on CPU float32, built once per machine in about a second -- and
            elsewhere eager, each kernel compiled with ``torch.compile`` once it has spent about as long eagerly as
            compiling costs, so short runs are never slower), ``True`` (native kernels, and compile the others at
            first use) or ``False`` (plain torch ops only). Values are the same either way
            (:mod:`lightning_quant.functional.fused`, :mod:`lightning_quant.functional.native`); the setting is
            process-wide.

    Raises:
        ValueError: If an argument is out of range.
    """

    #: Prefix of logged keys, e.g. ``"pact"``.
    log_prefix = "quant"

    def __init__(
        self,
        config: QuantConfig,
        quantizer_lr: float | None,
        quantizer_weight_decay: float = 0.0,
        lr_schedule: str = "follow",
        log_every_n_steps: int | None = None,
        verbose: bool = True,
        schedules: dict[str, Schedule] | None = None,
        compile_quantizers: bool | str = "auto",
    ) -> None:
        super().__init__()
        try:
            self.compile_quantizers = fused.parse_mode(compile_quantizers)
        except ValueError:
            raise ValueError(
                f"`compile_quantizers` must be True, False, 'on', 'off' or 'auto', got {compile_quantizers!r}."
            ) from None
        if quantizer_lr is not None:  # None: the method has no learned quantizer parameters
            check_positive(quantizer_lr, self._arg_names.get("quantizer_lr", "quantizer_lr"))
        check_positive(
            quantizer_weight_decay,
            self._arg_names.get("quantizer_weight_decay", "quantizer_weight_decay"),
            allow_zero=True,
        )
        if lr_schedule not in LR_SCHEDULE_MODES:
            raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULE_MODES}, got {lr_schedule!r}.")
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
        self.plan: QuantizationPlan | None = None
        self._group: tuple[int, int] | None = None
        self._warned = False

    #: Public argument names of the quantizer lr/wd in a subclass (PACT calls them ``alpha_lr``...), for messages.
    _arg_names: dict[str, str] = {}

    # ------------------------------------------------------------------ what subclasses provide
    def schedule_values(self, epoch: int, max_epochs: int) -> dict[str, float]:
        """Every schedule's value at ``epoch``."""
        return {name: schedule(epoch, max_epochs) for name, schedule in self.schedules.items()}

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

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        fused.set_compiled(self.compile_quantizers)
        example = getattr(pl_module, "example_input_array", None)
        self.plan = inject_quantizers(pl_module, self.config, warn=False, example_input=example)
        if not self._warned:
            self._warned = True
            for message in self.plan.warnings:
                rank_zero_warn(message)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        self._group = None
        params = [p for _, p in self.quantizer_parameters(pl_module)]
        if params and trainer.optimizers and self.quantizer_lr is not None:
            self._group = self._add_group(trainer, params)
        self.apply_schedule_values(pl_module, self.schedule_values(trainer.current_epoch, self._max_epochs(trainer)))

    def _add_group(self, trainer: pl.Trainer, params: list[nn.Parameter]) -> tuple[int, int]:
        """Add (or find) the quantizer group; returns ``(optimizer index, group index)``."""
        for i, optimizer in enumerate(trainer.optimizers):
            existing = find_quantizer_group(optimizer)
            if existing is not None:  # the user returned an optimizer this callback already extended
                return i, existing
        opt_index, group_index, source = add_quantizer_group(
            trainer.optimizers, params, self.quantizer_lr, self.quantizer_weight_decay
        )
        optimizer = trainer.optimizers[opt_index]
        for config in trainer.lr_scheduler_configs:
            if getattr(config.scheduler, "optimizer", None) is optimizer:
                extend_scheduler(config.scheduler, source, self.quantizer_lr)
        if self.lr_schedule == "constant":
            set_group_lr(optimizer, group_index, self.quantizer_lr)
        return opt_index, group_index

    @staticmethod
    def _max_epochs(trainer: pl.Trainer) -> int:
        return trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply_schedule_values(pl_module, self.schedule_values(trainer.current_epoch, self._max_epochs(trainer)))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.lr_schedule == "constant" and self._group is not None:
            opt_index, group_index = self._group
            set_group_lr(trainer.optimizers[opt_index], group_index, self.quantizer_lr)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_every_n_steps and trainer.global_step % self.log_every_n_steps == 0:
            self._log(pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, on_step=False)

    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        values = dict(self.learned_values(pl_module))
        values.update(self.schedule_values(pl_module.trainer.current_epoch, self._max_epochs(pl_module.trainer)))
        for key, value in values.items():
            # The values are identical on every rank (DDP keeps them so): per-step logs skip the reduction; per-epoch
            # logs take it (a few scalars) because Lightning expects epoch-level logs to be synced under DDP.
            if on_step:
                pl_module.log(f"{self.log_prefix}/{key}", value, on_step=True, on_epoch=False, rank_zero_only=True)
            else:
                pl_module.log(f"{self.log_prefix}/{key}", value, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.plan is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "version": CHECKPOINT_VERSION,
                "config": self.recipe(),
                "plan": self.plan.to_dict(),
            }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.recipe(),
            "schedules": {name: s.to_dict() for name, s in self.schedules.items()},
            "quantizer_lr": self.quantizer_lr,
            "quantizer_weight_decay": self.quantizer_weight_decay,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        mine = self.recipe()
        if saved != mine:
            diff = {
                k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)
            }
            detail = ", ".join(f"{k}: checkpoint {a!r} vs callback {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"The checkpoint was written with another quantization recipe ({detail}). Resume with the same"
                f" {type(self).__name__} arguments, or start a new fit without `ckpt_path`."
            )
        saved_schedules = state_dict.get("schedules", {})
        mine_schedules = {name: s.to_dict() for name, s in self.schedules.items()}
        if saved_schedules and saved_schedules != mine_schedules:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's schedules {saved_schedules} differ from this callback's"
                f" {mine_schedules}; the run continues with this callback's."
            )
