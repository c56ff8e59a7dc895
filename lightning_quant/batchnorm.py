"""Re-estimating BatchNorm running statistics for the weights and clips a model has now. Plain torch.

During quantization-aware training the running statistics are an exponential average over the last steps, each
step computed with other weights: at low bit widths a weight flips between two levels from one step to the next, so
those statistics fit none of the weights they averaged (Nagel et al. 2022, "Overcoming Oscillations in
Quantization-Aware Training", re-estimate them after training). :func:`reestimate_batchnorm` recomputes them in one
pass with the weights as they are; :class:`InputRecorder` keeps the inputs of a model's last training forwards to
replay for that pass (what ``QuantizationCallback(reestimate_bn=n)`` does), and ``post_training_quantize`` uses its
calibration batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["InputRecorder", "batchnorms", "common_ancestor", "reestimate_batchnorm"]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (the only ones whose eval output depends on them)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, forwards: Iterable[Callable[[], Any]], layers: list[nn.Module] | None = None
) -> None:
    """Replace the running statistics of ``layers`` by their average over ``forwards``, as ``model`` computes now.

    Each layer's statistics are reset and re-accumulated as an equal-weight average (``momentum=None``) over one
    pass, the layers in training mode (each batch normalised by its own statistics, so a layer sees its inputs as
    they are with the layers before it re-estimated), every other module of ``model`` in eval mode (dropout off,
    quantizers as at evaluation); every module's training flag and each layer's momentum are restored after.

    Args:
        model: The module whose modes are set for the pass (it contains ``layers``).
        forwards: Calls that each run one forward through ``model`` (their results are discarded).
        layers: The BatchNorm layers to re-estimate; None: :func:`batchnorms` of ``model``.
    """
    layers = batchnorms(model) if layers is None else layers
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        for forward in forwards:
            forward()
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode


def common_ancestor(model: nn.Module, modules: Iterable[nn.Module]) -> tuple[str, nn.Module]:
    """The deepest submodule of ``model`` (name and module) that contains every one of ``modules``."""
    names = {id(m): n for n, m in model.named_modules()}
    paths = [names[id(m)].split(".") if names[id(m)] else [] for m in modules]
    prefix: list[str] = []
    for parts in zip(*paths) if paths else ():
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    name = ".".join(prefix)
    return name, model.get_submodule(name)


class InputRecorder:
    """Keeps the inputs of a module's last ``size`` training forwards (grad mode on, module in training mode, its
    class's own ``forward``).

    The inputs are kept as the forward got them, tensors detached (no copy, no autograd graph kept alive), and can
    be replayed with :meth:`forwards`. ``fresh`` counts the forwards recorded since :meth:`mark_used`.

    Args:
        module: The module whose forward inputs are recorded (a forward pre-hook; :meth:`remove` takes it off).
        size: How many forwards are kept (the last ones).
    """

    def __init__(self, module: nn.Module, size: int) -> None:
        self.module = module
        self.records: deque[tuple[tuple[Any, ...], dict[str, Any]]] = deque(maxlen=size)
        self.fresh = 0
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled() and not _forward_patched(module):
            self.records.append(tree_map(_detached, (args, kwargs)))
            self.fresh += 1

    def forwards(self) -> list[Callable[[], Any]]:
        """One call per record, each running the module on that record's inputs."""
        return [lambda a=args, k=kwargs: self.module(*a, **k) for args, kwargs in self.records]

    def mark_used(self) -> None:
        self.fresh = 0

    def remove(self) -> None:
        self._handle.remove()
        self.records.clear()


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _forward_patched(module: nn.Module) -> bool:
    """Whether ``module.forward`` is not its class's own right now: under DDP, Lightning routes ``training_step(batch,
    batch_idx)`` through a function set as the LightningModule's ``forward``, which puts the bound original back (an
    instance attribute too) and runs the step, whose own ``self(x)`` is then the call to record."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not type(module).forward
