"""Post-training quantization without labels: the FP32 model as its own teacher. Plain torch: no Lightning import.

:func:`post_training_quantize` injects a recipe's quantizers into a trained model, sets every activation clip from
a fixed calibration set (:class:`~lightning_quant.calibrator.ActivationCalibrator`; LSQ weight steps start at the
weight's MSE-optimal clip), re-estimates the BatchNorm running statistics on that set as the quantized model computes
them, and, when ``steps > 0``, trains only the quantizers' own parameters (PACT clips, LSQ weight steps; DSQ ranges)
with Adam on the mean squared error between the quantized model's outputs and those of a frozen FP32 copy (the PACT
paper's post-training use of the learned clip). The weights and biases never change: the model runs in eval mode,
its own parameters are not in the optimizer and take no gradient. Labels are never read.

Why these defaults (``benchmarks/results/ptq.md``, DemoCNN on MNIST-5k, 4 seeds, 512 calibration images):
re-estimating BatchNorm is what closes the gap to FP32 at 4-bit activations (+0.9 to +1.5 points; the trained
statistics lag the final weights, and quantization shifts every later layer's input mean and variance). After it,
fitting the clips to the FP32 outputs (``benchmarks/results/ptq_ablation.md``: 20 steps at relative rate 0.01, 10
at 0.003 and at 0.001) raised the MSE on the calibration set in 20 of 24 runs, so the values before it were put
back; the 4 it kept were W8A4 runs at the two lower rates (+0.3 to +0.5 each, +0.2 on the mean), none at W4A4. With
BatchNorm kept, 20 steps at 0.01 help (+0.5 at W4A4). So the default fits gently, 10 steps at 0.003: the FP32 teacher
is used, as the PACT paper's post-training method asks, a fit that raises the calibration MSE is undone (so the
default is never worse on that loss than calibration alone), and a run stays under one epoch of QAT fine-tuning
(0.62x on the benchmark). ``steps=0`` gives calibration and re-estimation alone. The fitting loss is the final
output's MSE: a per-layer loss (every quantized layer's output matched to the teacher's at once, normalised by its
variance; BRECQ-like, though not one block at a time) scored lower (-0.8 points at W8A4, -0.1 at W4A4, BatchNorm kept).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quant.batchnorm import batchnorms, reestimate_batchnorm
from lightning_quant.calibration import get_clip_estimator
from lightning_quant.calibrator import ActivationCalibrator, check_calibration_batches
from lightning_quant.config import DSQConfig, PACTConfig, QuantConfig
from lightning_quant.layers import QUANTIZED_LAYERS
from lightning_quant.quantizers.base import ActivationQuantizer
from lightning_quant.surgery import (
    QuantizationPlan,
    _caller_trainable,
    _trainability,
    inject_quantizers,
    injected_recipe,
)

__all__ = ["BATCHNORM_MODES", "LABEL_KEYS", "post_training_quantize"]

log = logging.getLogger(__name__)

#: Keys dropped from a dict batch before it is passed to the model as keywords: labels are never read (and a
#: Hugging Face model given ``labels`` would compute a loss it does not need).
LABEL_KEYS = ("label", "labels", "target", "targets", "y")

#: Values of each calibration batch a clip is estimated from (a fixed-seed sample): the MSE search sorts them, and
#: on the benchmark a million per batch made the search most of a run's time for no gain in accuracy.
CALIBRATION_SAMPLES = 2**16

#: What ``post_training_quantize`` does with BatchNorm running statistics: ``"reestimate"`` them on the calibration
#: batches (teacher and student), or ``"keep"`` the trained ones.
BATCHNORM_MODES = ("reestimate", "keep")


def post_training_quantize(
    model: nn.Module,
    config: QuantConfig,
    dataloader: Iterable[Any],
    *,
    steps: int = 10,
    lr: float = 0.003,
    calibration_batches: int = 4,
    calibration: str = "mse",
    batchnorm: str = "reestimate",
    teacher: nn.Module | None = None,
    progress: bool = False,
    log_every: int = 50,
    example_input: Any = None,
) -> QuantizationPlan:
    """Quantize a trained model in place without labels: calibrate the clips, re-estimate BatchNorm, optionally fit.

    Steps: (1) one forward of the FP32 model on the first batch, to refuse a batch it can not take before anything
    changes, and the ``calibration_batches`` batches of the calibration set drawn (a fixed set, as usual in
    post-training quantization); (2) with ``steps > 0``, a frozen private deep copy of the FP32 model (or of
    ``teacher``) becomes the teacher, its BatchNorm statistics re-estimated on the set like the student's; (3)
    :func:`~lightning_quant.inject_quantizers` swaps the quantizers in; (4) every activation clip still to be
    calibrated is set from the set (eval mode); (5) with ``batchnorm="reestimate"``, every BatchNorm layer's running
    statistics are replaced by their average over the set, as the quantized model computes them; (6) ``steps`` Adam
    steps on ``mean((student(x) - teacher(x))**2)`` over the set (the teacher's outputs computed once per batch),
    quantizer parameters only, learning rate on a cosine decay to 0. If the steps leave the MSE over the set higher
    than before them, the values before them are put back (the PACT clip's gradient is a straight-through
    surrogate: descent is not guaranteed); otherwise BatchNorm is re-estimated once more for the fitted values. The
    model's weights and biases stay bit-identical; each module's training flag and each parameter's
    ``requires_grad`` are restored at the end (the quantizer parameters get the flags ``inject_quantizers`` gives).

    Batches: a tensor is the input; of a tuple or list the first element is the input (the rest, labels, is never
    read); a dict is passed as keyword arguments without the keys in :data:`LABEL_KEYS`. The loader is iterated again
    when ``calibration_batches`` exceeds its length.

    Args:
        model: A trained float model (any ``nn.Module`` with ``nn.ReLU``/``nn.ReLU6`` and Conv/Linear layers).
        config: The recipe: a :class:`~lightning_quant.PACTConfig` (learned clips, LSQ weight steps by default)
            or a :class:`~lightning_quant.DSQConfig` (learned ranges).
        dataloader: Unlabelled (or labelled: labels are ignored) batches of training inputs.
        steps: Adam steps on the distillation loss (default 10; 0: calibration and BatchNorm re-estimation only; see
            the module docstring for why). With ``batchnorm="keep"``, 20 steps at lr 0.01 helped on the benchmark.
        lr: Relative learning rate: each quantizer tensor's Adam rate is ``lr`` times its mean magnitude after
            calibration (a clip of ~3 and a weight step of ~0.003 need rates a thousand times apart); a tensor at 0
            takes ``lr`` as is.
        calibration_batches: The calibration set's size in batches: each activation clip's estimate is averaged
            over them, BatchNorm is re-estimated and the clips fitted on them (default 4: 512 images at batch 128).
        calibration: Clip estimator (:data:`lightning_quant.calibration.CLIP_ESTIMATORS`): ``"mse"``,
            ``"percentile"``, ``"max"``.
        batchnorm: ``"reestimate"`` (default): BatchNorm running statistics are re-estimated on the calibration set
            (needs batches of at least 2 samples); ``"keep"``: they stay as trained, bit-identical.
        teacher: The FP32 model to match when ``steps > 0``; default: ``model`` before injection. A private deep
            copy is used (its BatchNorm statistics re-estimated when ``batchnorm="reestimate"``); the object passed
            is left as it was.
        progress: Print the loss every ``log_every`` steps (it is logged at INFO level to ``lightning_quant.ptq``
            either way).
        log_every: Steps between progress lines.
        example_input: Passed to :func:`~lightning_quant.inject_quantizers` for the first/last-layer policy in
            execution order; default: the model's ``example_input_array`` if it has one, else the first batch's
            input.

    Returns:
        The quantization plan (what was quantized where, as ``inject_quantizers`` returns it).

    Raises:
        ValueError: If ``config`` is not a PACT or DSQ recipe, ``model`` already holds quantizers, ``dataloader``
            is empty, runs dry before ``calibration_batches`` batches (a one-shot iterator), yields batches the model
            can not take (or one-sample batches while BatchNorm is re-estimated), or ``steps``, ``lr``,
            ``calibration_batches``, ``calibration``, ``batchnorm`` or ``log_every`` is out of range; the model is
            unchanged then.
    """
    _check_arguments(model, config, steps, lr, calibration_batches, calibration, batchnorm, log_every)
    batches = _Batches(dataloader)
    first = batches.peek()
    device = _device_of(model)
    _check_forward(model, first, device, "model")
    if teacher is not None:
        _check_forward(teacher, first, device, "teacher")
    calibration_set = batches.take(calibration_batches)  # a one-shot loader that runs dry is refused here
    reestimate = batchnorm == "reestimate" and bool(batchnorms(model))
    if reestimate:
        for batch in calibration_set:
            _check_batchnorm_batch(batch)
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        x, kwargs = _model_input(first)
        example_input = _to(kwargs if x is None else x, device)

    # Nothing has changed so far.
    if steps > 0:
        teacher = _teacher(model if teacher is None else teacher, calibration_set, device, reestimate)
    plan, quantizer_params, final_flags = _inject(model, config, example_input)

    modes = {m: m.training for m in model.modules()}
    user_flags = {p: p.requires_grad for p in model.parameters() if p not in final_flags}
    try:
        model.eval()  # BatchNorm uses its running statistics; dropout is off: a deterministic target
        for p in user_flags:
            p.requires_grad_(False)  # no weight gradient is computed, so none can be applied
        _calibrate(model, calibration_set, device, calibration)
        if reestimate:
            _reestimate_batchnorm(model, calibration_set, device)
        done = "BatchNorm statistics re-estimated" if reestimate else "BatchNorm statistics kept"
        _report(f"post-training quantization: clips calibrated on {len(calibration_set)} batches; {done}", progress)
        if steps > 0:
            with torch.no_grad():  # the teacher's outputs, once per batch: the steps only run the student
                cached = [(batch, _call(teacher, batch, device)) for batch in calibration_set]
            changed = _distill(model, cached, device, quantizer_params, steps, lr, progress, log_every)
            if reestimate and changed:
                _reestimate_batchnorm(model, calibration_set, device)  # the fitted clips moved the activations
    finally:
        for module, mode in modes.items():
            module.training = mode
        for p, flag in (*user_flags.items(), *final_flags.items()):
            p.requires_grad_(flag)
    return plan


def _check_arguments(
    model: nn.Module,
    config: QuantConfig,
    steps: object,
    lr: object,
    calibration_batches: object,
    calibration: str,
    batchnorm: object,
    log_every: object,
) -> None:
    """Refuse bad arguments before anything changes (each message names the argument and its value)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if not isinstance(config, (PACTConfig, DSQConfig)):
        raise ValueError(
            f"`config` must be a PACTConfig or DSQConfig (a recipe with learned quantizer values), got {config!r}."
        )
    recipe = injected_recipe(model)
    if recipe is not None:
        raise ValueError(
            f"`model` ({type(model).__name__}) already holds quantizers (recipe {recipe['config']}); post-training"
            " quantization starts from the float model. Build it fresh, or load its FP32 checkpoint."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"`lr` must be a finite number > 0, got {lr!r}.")
    check_calibration_batches(calibration_batches)
    get_clip_estimator(calibration)  # raises a ValueError naming the estimator
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"`batchnorm` must be one of {BATCHNORM_MODES}, got {batchnorm!r}.")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"`log_every` must be an int >= 1, got {log_every!r}.")


class _Batches:
    """Endless batches from a loader, re-iterating it at its end; the first batch is read once up front."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        try:
            self._it: Iterator[Any] = iter(loader)
        except TypeError as err:
            raise ValueError(f"`dataloader` must be iterable, got {type(loader).__name__}: {loader!r:.200}.") from err
        self._first: Any = None
        self._has_first = False

    def peek(self) -> Any:
        """The first batch (kept: the next :meth:`next` returns it)."""
        try:
            self._first = next(self._it)
        except StopIteration:
            raise ValueError(f"`dataloader` yields no batch (it is empty): {self.loader!r:.200}.") from None
        self._has_first = True
        return self._first

    def take(self, count: int) -> list[Any]:
        """The next ``count`` batches (the first one included), re-iterating the loader at its end."""
        return [self.next() for _ in range(count)]

    def next(self) -> Any:
        if self._has_first:
            self._has_first = False
            return self._first
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError(
                f"`dataloader` yielded no batch on a second pass ({self.loader!r:.200}): a one-shot iterator must hold"
                " `calibration_batches` batches; pass a DataLoader or a list."
            ) from None


def _describe(value: Any, depth: int = 0) -> str:
    """A short description of a batch's structure: ``a tuple of (Tensor[64, 1, 28, 28], Tensor[64])``."""
    if isinstance(value, Tensor):
        return f"Tensor[{', '.join(map(str, value.shape))}]"
    if depth > 2:
        return type(value).__name__
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v, depth + 1) for v in value[:6]) + (", ..." if len(value) > 6 else "")
        return f"a {type(value).__name__} of ({inner})" if depth == 0 else f"({inner})"
    if isinstance(value, dict):
        inner = ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in list(value.items())[:6])
        return f"a dict of {{{inner}}}" if depth == 0 else f"{{{inner}}}"
    return f"{type(value).__name__} {value!r:.60}"


def _model_input(batch: Any) -> tuple[Any, dict[str, Any]]:
    """``(positional input or None, keyword inputs)`` of a batch; labels are dropped unread."""
    if isinstance(batch, dict):
        return None, {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        return (batch[0] if batch else None), {}
    return batch, {}


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _call(model: nn.Module, batch: Any, device: torch.device | None) -> Any:
    x, kwargs = _model_input(batch)
    kwargs = _to(kwargs, device)
    return model(**kwargs) if x is None else model(_to(x, device), **kwargs)


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


@torch.no_grad()
def _check_forward(model: nn.Module, batch: Any, device: torch.device | None, name: str) -> None:
    """One eval-mode forward on ``batch``; a failure is a ``ValueError`` naming the batch structure and the error."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        out = _call(model, batch, device)
    except Exception as err:
        raise ValueError(
            f"`dataloader` yields batches the {name} ({type(model).__name__}) can not take: got {_describe(batch)}"
            f" (its input: the tensor itself, a tuple's or list's first element, or a dict as keywords without"
            f" {list(LABEL_KEYS)}); the {name} raised {type(err).__name__}: {err}"
        ) from err
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not _float_tensors(out):
        raise ValueError(
            f"`dataloader` batches give {name} outputs with no floating-point tensor to match ({_describe(out)})."
        )


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher


def _inject(
    model: nn.Module, config: QuantConfig, example_input: Any
) -> tuple[QuantizationPlan, list[nn.Parameter], dict[nn.Parameter, bool]]:
    """Inject ``config`` and return the plan, the parameters PTQ trains and every quantizer parameter's final flag.

    ``inject_quantizers`` gives a quantizer the trainability of its layer, so in a frozen model every clip would be
    frozen too. The user's flags are switched on for the injection, so each quantizer parameter gets the flag its
    quantizer means (DSQ's fixed activation lower bound stays off) and PTQ trains exactly those; the final flags
    are what ``inject_quantizers`` would give with the user's own flags (set at the end of the run).
    """
    user_flags = {p: p.requires_grad for p in model.parameters()}
    trainable = _trainability(model)
    try:
        model.requires_grad_(True)
        plan = inject_quantizers(model, config, example_input=example_input)
    finally:
        for p, flag in user_flags.items():
            p.requires_grad_(flag)
    final: dict[nn.Parameter, bool] = {}
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            owner = _caller_trainable(name, trainable)
        elif isinstance(module, QUANTIZED_LAYERS) and hasattr(module, "weight_quantizer"):
            owner, module = user_flags[module.weight], module.weight_quantizer
        else:
            continue
        for p in module.parameters():
            final[p] = p.requires_grad and owner
    trained = [p for p in final if p.requires_grad]
    return plan, trained, final


@torch.no_grad()
def _calibrate(model: nn.Module, calibration_set: list[Any], device: torch.device | None, estimator: str) -> None:
    """Set every uncalibrated activation clip from the calibration batches (eval mode: BatchNorm untouched)."""
    calibrator = ActivationCalibrator(
        model, estimator, num_batches=len(calibration_set), training_only=False, max_samples=CALIBRATION_SAMPLES
    )
    try:
        for batch in calibration_set:
            _call(model, batch, device)
    finally:
        calibrator.remove()


def _teacher(model: nn.Module, calibration_set: list[Any], device: torch.device | None, reestimate: bool) -> nn.Module:
    """A frozen private copy of the FP32 ``model`` (the caller's teacher is never touched), in eval mode."""
    teacher = _frozen_copy(model)
    if reestimate:
        _reestimate_batchnorm(teacher, calibration_set, device)  # the student's statistics are re-estimated too
    return teacher.eval()


def _check_batchnorm_batch(batch: Any) -> None:
    """Refuse a one-sample batch before anything changes: BatchNorm can not estimate a variance from it."""
    x, _ = _model_input(batch)
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] < 2:
        raise ValueError(
            f"`dataloader` yields batches of one sample ({_describe(batch)}); re-estimating BatchNorm statistics"
            " (`batchnorm='reestimate'`) needs at least 2 per batch. Use a larger batch size or batchnorm='keep'."
        )


def _reestimate_batchnorm(model: nn.Module, batches: list[Any], device: torch.device | None) -> None:
    """Every BatchNorm's running statistics re-estimated over ``batches`` (:func:`batchnorm.reestimate_batchnorm`):
    quantization shifts each layer's input mean and variance away from what the float model was trained with."""
    reestimate_batchnorm(model, [functools.partial(_call, model, batch, device) for batch in batches])


def _float_tensors(output: Any) -> list[Tensor]:
    """Every floating-point tensor of a model output (a tensor, tuple, list, dict or dataclass-like mapping)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _float_tensors(item)]
    return []


def _mse(student: Any, teacher: Any) -> Tensor:
    pairs = list(zip(_float_tensors(student), _float_tensors(teacher)))
    return sum(torch.mean((s.float() - t.float()) ** 2) for s, t in pairs) / len(pairs)


def _optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with one group per tensor, its rate scaled by the tensor's magnitude (see ``lr`` in the docstring)."""
    groups = []
    for p in params:
        scale = float(p.detach().abs().mean()) if p.numel() else 0.0
        groups.append({"params": [p], "lr": lr * scale if scale > 0 and math.isfinite(scale) else lr})
    return torch.optim.Adam(groups)


@torch.no_grad()
def _set_mse(model: nn.Module, cached: list[tuple[Any, Any]], device: torch.device | None) -> float:
    """Mean of the output MSE to the teacher over the cached batches."""
    return sum(float(_mse(_call(model, batch, device), target)) for batch, target in cached) / len(cached)


def _report(message: str, progress: bool) -> None:
    log.info(message)
    if progress:
        print(message, flush=True)


def _distill(
    model: nn.Module,
    cached: list[tuple[Any, Any]],
    device: torch.device | None,
    params: list[nn.Parameter],
    steps: int,
    lr: float,
    progress: bool,
    log_every: int,
) -> bool:
    """``steps`` Adam steps on the output MSE to the teacher over the cached batches, ``params`` only.

    The PACT clip's gradient is a straight-through surrogate (it ignores how the clip widens the rounding steps),
    so descent is not guaranteed: the quantizer values after calibration are kept when the steps leave the MSE over
    the cached batches higher than it was.

    Returns:
        Whether the quantizer values changed (False: no steps, or the calibrated values were put back).
    """
    if steps == 0 or not params:
        return False
    start = _set_mse(model, cached, device)
    _report(f"post-training quantization: MSE to the FP32 outputs after calibration {start:.6g}", progress)
    calibrated = [p.detach().clone() for p in params]
    optimizer = _optimizer(params, lr)
    # A cosine decay to 0 lets the last steps settle instead of jittering at the full rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    running, seen = 0.0, 0
    for step in range(1, steps + 1):
        batch, target = cached[(step - 1) % len(cached)]
        loss = _mse(_call(model, batch, device), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running, seen = running + float(loss.detach()), seen + 1
        if step % log_every == 0 or step == steps:
            _report(f"post-training quantization: step {step}/{steps}, batch MSE {running / seen:.6g}", progress)
            running, seen = 0.0, 0
    end = _set_mse(model, cached, device)
    if end > start:
        with torch.no_grad():
            for p, value in zip(params, calibrated):
                p.copy_(value)
        _report(
            f"post-training quantization: MSE {end:.6g} > {start:.6g} after calibration; calibrated values kept",
            progress,
        )
        return False
    _report(f"post-training quantization: MSE to the FP32 outputs {start:.6g} -> {end:.6g}", progress)
    return True
