"""Post-training quantization without labels: the FP32 model as its own teacher. Plain torch: no Lightning import.

:func:`post_training_quantize` injects a recipe's quantizers into a trained model, sets every activation clip from
the first batches (:class:`~lightning_quant.calibrator.ActivationCalibrator`), then trains only the quantizers'
own parameters (PACT clips, LSQ weight steps; DSQ ranges) with Adam on the mean squared error between the quantized
model's outputs and those of a frozen FP32 copy. The weights, biases and BatchNorm statistics never change: the
model runs in eval mode, its own parameters are not in the optimizer and take no gradient. Labels are never read.

This is the PACT paper's post-training use of the learned clip (the FP32 model as teacher, MSE between outputs, only
the clip values trained), with LSQ's learned weight step trained the same way.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

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

__all__ = ["LABEL_KEYS", "post_training_quantize"]

log = logging.getLogger(__name__)

#: Keys dropped from a dict batch before it is passed to the model as keywords: labels are never read (and a
#: Hugging Face model given ``labels`` would compute a loss it does not need).
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def post_training_quantize(
    model: nn.Module,
    config: QuantConfig,
    dataloader: Iterable[Any],
    *,
    steps: int = 20,
    lr: float = 0.01,
    calibration_batches: int = 4,
    calibration: str = "mse",
    teacher: nn.Module | None = None,
    progress: bool = False,
    log_every: int = 50,
    example_input: Any = None,
) -> QuantizationPlan:
    """Quantize a trained model in place without labels: calibrate the clips, then fit them to the FP32 outputs.

    Steps: (1) one forward of the FP32 model on the first batch, to refuse a batch it can not take before anything
    changes; (2) a frozen deep copy of the model becomes the teacher (unless ``teacher`` is given); (3)
    :func:`~lightning_quant.inject_quantizers` swaps the quantizers in; (4) every activation clip still to be
    calibrated is set from the first ``calibration_batches`` batches (eval mode, so BatchNorm statistics stay), and
    the teacher's outputs on them are kept; (5) ``steps`` Adam steps on ``mean((student(x) - teacher(x))**2)`` over
    those same batches (a fixed calibration set, as usual in post-training quantization; no teacher forward per
    step), quantizer parameters only, learning rate on a cosine decay to 0. If the steps leave the MSE over the set
    higher than after calibration, the calibrated values are put back (the PACT clip's gradient is a
    straight-through surrogate: descent is not guaranteed). The model's weights stay bit-identical; each module's
    training flag and each parameter's ``requires_grad`` are restored at the end (the quantizer parameters get the
    flags ``inject_quantizers`` gives).

    Batches: a tensor is the input; of a tuple or list the first element is the input (the rest, labels, is never
    read); a dict is passed as keyword arguments without the keys in :data:`LABEL_KEYS`. The loader is iterated again
    when ``calibration_batches`` exceeds its length.

    Args:
        model: A trained float model (any ``nn.Module`` with ``nn.ReLU``/``nn.ReLU6`` and Conv/Linear layers).
        config: The recipe: a :class:`~lightning_quant.PACTConfig` (learned clips, LSQ weight steps by default)
            or a :class:`~lightning_quant.DSQConfig` (learned ranges).
        dataloader: Unlabelled (or labelled: labels are ignored) batches of training inputs.
        steps: Adam steps on the distillation loss (0: calibration only). 20 keeps a run (calibration included)
            under one epoch of QAT fine-tuning on the benchmark; more steps rarely lowered the MSE further there
            (``benchmarks/results/ptq.md``).
        lr: Relative learning rate: each quantizer tensor's Adam rate is ``lr`` times its mean magnitude after
            calibration (a clip of ~3 and a weight step of ~0.003 need rates a thousand times apart); a tensor at 0
            takes ``lr`` as is.
        calibration_batches: Batches each activation clip's estimate is averaged over, and the set the clips are
            then fitted on (default 4: 512 images at batch 128).
        calibration: Clip estimator (:data:`lightning_quant.calibration.CLIP_ESTIMATORS`): ``"mse"``,
            ``"percentile"``, ``"max"``.
        teacher: The FP32 model to match; default: a deep copy of ``model`` taken before injection. It is run in
            eval mode under ``no_grad`` and left as it was.
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
            is empty or yields batches the model can not take, or ``steps``, ``lr``, ``calibration_batches``,
            ``calibration`` or ``log_every`` is out of range; the model is unchanged then. Also when a one-shot
            ``dataloader`` runs dry before ``calibration_batches`` batches (after the quantizers are in).
    """
    _check_arguments(model, config, steps, lr, calibration_batches, calibration, log_every)
    batches = _Batches(dataloader)
    first = batches.peek()
    device = _device_of(model)
    _check_forward(model, first, device, "model")
    if teacher is not None:
        _check_forward(teacher, first, device, "teacher")
    teacher = _frozen_copy(model) if teacher is None else teacher

    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        x, kwargs = _model_input(first)
        example_input = _to(kwargs if x is None else x, device)
    plan, quantizer_params, final_flags = _inject(model, config, example_input)

    modes = {m: m.training for m in model.modules()}
    teacher_mode = {m: m.training for m in teacher.modules()}
    user_flags = {p: p.requires_grad for p in model.parameters() if p not in final_flags}
    try:
        model.eval()  # BatchNorm uses (and keeps) its running statistics; dropout is off: a deterministic target
        teacher.eval()
        for p in user_flags:
            p.requires_grad_(False)  # no weight gradient is computed, so none can be applied
        cached = _calibrate(model, teacher, batches, device, calibration, calibration_batches)
        _distill(model, cached, device, quantizer_params, steps, lr, progress, log_every)
    finally:
        for module, mode in modes.items():
            module.training = mode
        for module, mode in teacher_mode.items():
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
def _calibrate(
    model: nn.Module,
    teacher: nn.Module,
    batches: _Batches,
    device: torch.device | None,
    estimator: str,
    count: int,
) -> list[tuple[Any, Any]]:
    """Set every uncalibrated activation clip from the next ``count`` batches (eval mode: BatchNorm untouched).

    Returns:
        The ``count`` batches with the teacher's outputs on them: the fixed set the clips are then fitted on.
    """
    calibrator = ActivationCalibrator(model, estimator, num_batches=count, training_only=False)
    cached = []
    try:
        for _ in range(count):
            batch = batches.next()
            _call(model, batch, device)
            cached.append((batch, _call(teacher, batch, device)))
    finally:
        calibrator.remove()
    return cached


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
) -> None:
    """``steps`` Adam steps on the output MSE to the teacher over the cached batches, ``params`` only.

    The PACT clip's gradient is a straight-through surrogate (it ignores how the clip widens the rounding steps),
    so descent is not guaranteed: the quantizer values after calibration are kept when the steps leave the MSE over
    the cached batches higher than it was.
    """
    if steps == 0 or not params:
        return
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
    else:
        _report(f"post-training quantization: MSE to the FP32 outputs {start:.6g} -> {end:.6g}", progress)
