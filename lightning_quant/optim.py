"""Give the quantizer parameters one optimizer group of their own, after ``configure_optimizers`` built the rest.

The user's ``configure_optimizers`` usually took ``self.parameters()``, which already includes the quantizers'
parameters (they were injected in ``setup``). :func:`add_quantizer_group` moves them (by identity, never by value)
into a new group with their own learning rate and weight decay, leaving the user's groups, their order and their
hyper-parameters as they were. The LR schedulers built over that optimizer keep one entry per group; their lists
are extended so the new group *follows* the user's schedule, scaled by ``quantizer lr / user peak lr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    CyclicLR,
    LambdaLR,
    LRScheduler,
    MultiplicativeLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

#: The ``name`` key of the group this package adds (``LearningRateMonitor`` shows it).
GROUP_NAME = "lightning_quant"
#: Allowed values of ``lr_schedule``.
LR_SCHEDULE_MODES = ("follow", "constant")


#: The ``name`` of the group of weight-quantizer parameters when they get one of their own (LSQ steps).
WEIGHT_GROUP_NAME = "lightning_quant.weights"


def find_quantizer_group(optimizer: Optimizer, name: str = GROUP_NAME) -> int | None:
    """Index of the group named ``name`` added by :func:`add_quantizer_group`, or None."""
    for i, group in enumerate(optimizer.param_groups):
        if group.get("name") == name:
            return i
    return None


def add_quantizer_group(
    optimizers: Sequence[Optimizer],
    params: Iterable[nn.Parameter],
    lr: float | None,
    weight_decay: float,
    name: str = GROUP_NAME,
    reference: Iterable[nn.Parameter] = (),
    lr_scale: float = 1.0,
) -> tuple[int, int, int]:
    """Move ``params`` out of whatever groups hold them into one new group of the optimizer that held them.

    Args:
        optimizers: The trainer's optimizers.
        params: The quantizer parameters.
        lr: Learning rate of the new group; None: the lr of the group holding ``reference`` (e.g. the weights an LSQ
            step scales), or of the group the parameters came from.
        weight_decay: Weight decay of the new group (the L2 penalty on PACT's alpha).
        name: The new group's ``name``.
        reference: Parameters whose group gives the lr when ``lr`` is None.
        lr_scale: With ``lr=None``, the new group's lr is that group's lr times this.

    Returns:
        ``(optimizer index, new group index, index of the group the parameters came from)``; the last is 0 when
        the parameters were in no group.

    Raises:
        ValueError: If the parameters are spread over several optimizers.
    """
    params = list(params)
    ids = {id(p) for p in params}
    holders = {i for i, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"] if id(p) in ids}
    if len(holders) > 1:
        raise ValueError(
            f"The quantizer parameters are spread over optimizers {sorted(holders)}; lightning_quant puts them in one"
            " group of one optimizer. Leave them out of all but one optimizer in `configure_optimizers`."
        )
    opt_index = holders.pop() if holders else 0
    optimizer = optimizers[opt_index]
    source = 0
    counts = [sum(id(p) in ids for p in g["params"]) for g in optimizer.param_groups]
    if any(counts):
        source = max(range(len(counts)), key=counts.__getitem__)
    ref_ids = {id(p) for p in reference}
    ref_counts = [sum(id(p) in ref_ids for p in g["params"]) for g in optimizer.param_groups]
    if any(ref_counts):
        source = max(range(len(ref_counts)), key=ref_counts.__getitem__)
    if lr is None:
        lr = float(optimizer.param_groups[source].get("initial_lr", optimizer.param_groups[source]["lr"])) * lr_scale
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    # Every other hyper-parameter (betas, momentum, eps...) comes from the optimizer's defaults.
    optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": weight_decay, "name": name})
    return opt_index, len(optimizer.param_groups) - 1, source


def _ratio(reference: float, value: float) -> float:
    return value / reference if reference else 1.0


def _peak_lr(scheduler: LRScheduler, source: int, ref: dict) -> float:
    """The highest lr the scheduler gives group ``source``: its ``max_lr`` for the cyclic schedulers (whose base
    lr is the bottom of the cycle), its base lr for the others (which decay from it, or hold it)."""
    if isinstance(scheduler, OneCycleLR):
        return float(ref["max_lr"])
    if isinstance(scheduler, CyclicLR):
        return float(scheduler.max_lrs[source])
    return float(scheduler.base_lrs[source])


#: Scheduler lists that are not per group, whatever their length.
_NOT_PER_GROUP = ("_schedulers", "_milestones", "milestones", "_schedule_phases")


def extend_scheduler(scheduler: object, source: int, lr: float | None, lr_scale: float = 1.0) -> None:
    """Give ``scheduler`` an entry for the group just appended to its optimizer, following group ``source``.

    Every per-group value is the source group's, scaled by ``lr / source peak lr``: the new group follows the user's
    schedule in proportion and peaks at ``lr`` where the source group peaks (``max_lr`` under OneCycleLR and
    CyclicLR, the base lr under the others; ReduceLROnPlateau starts from it). ``lr=None``: the new group mirrors
    group ``source`` exactly, times ``lr_scale``.

    Raises:
        TypeError: If the scheduler keeps per-group state this function does not know.
    """
    if isinstance(scheduler, (SequentialLR, ChainedScheduler)):
        for inner in scheduler._schedulers:
            extend_scheduler(inner, source, lr, lr_scale)
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return
    optimizer: Optimizer = scheduler.optimizer
    new = optimizer.param_groups[-1]
    ref = optimizer.param_groups[source]
    n_old = len(optimizer.param_groups) - 1
    if isinstance(scheduler, ReduceLROnPlateau):
        r = lr_scale if lr is None else _ratio(float(ref.get("initial_lr", ref["lr"])), lr)
        if len(scheduler.min_lrs) == n_old:
            scheduler.min_lrs.append(scheduler.min_lrs[source] * r)
        new["lr"] = float(ref["lr"]) * r
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        return
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(f"lightning_quant does not know how to extend the LR scheduler {type(scheduler).__name__}.")
    r = lr_scale if lr is None else _ratio(_peak_lr(scheduler, source, ref), lr)
    scheduler.base_lrs.append(scheduler.base_lrs[source] * r)
    new["initial_lr"] = float(ref.get("initial_lr", scheduler.base_lrs[source])) * r
    if isinstance(scheduler, (LambdaLR, MultiplicativeLR)):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[source])
    if isinstance(scheduler, OneCycleLR):
        for key in ("initial_lr", "max_lr", "min_lr"):
            new[key] = float(ref[key]) * r
        for key in ("max_momentum", "base_momentum", "betas", "momentum"):
            if key in ref:
                new[key] = ref[key]
    if isinstance(scheduler, CyclicLR):
        scheduler.max_lrs.append(scheduler.max_lrs[source] * r)
        if getattr(scheduler, "cycle_momentum", False):
            scheduler.base_momentums.append(scheduler.base_momentums[source])
            scheduler.max_momentums.append(scheduler.max_momentums[source])
    new["lr"] = float(ref["lr"]) * r
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    for key, value in vars(scheduler).items():
        if isinstance(value, list) and len(value) == n_old and key not in _NOT_PER_GROUP:
            raise TypeError(
                f"LR scheduler {type(scheduler).__name__} keeps per-group state `{key}` that lightning_quant does not"
                " know how to extend; please report it."
            )


def set_group_lr(optimizer: Optimizer, index: int, lr: float) -> None:
    """Pin the learning rate of one group (``lr_schedule="constant"``)."""
    group = optimizer.param_groups[index]
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr
