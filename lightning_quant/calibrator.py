"""Start activation clips from the data each call site sees. Plain torch: no Lightning import.

:class:`ActivationCalibrator` puts a forward pre-hook on every activation quantizer whose sites are not calibrated
yet. On each of the next ``num_batches`` forwards of a site it estimates a clip from the site's input (an estimator
of :mod:`lightning_quant.calibration`, e.g. the MSE-optimal clip at the site's bit width), averages the estimates so
far, and writes the mean into the quantizer *before* that forward quantizes: the very first forward already runs on a
clip fitted to its data. After ``num_batches`` forwards the site is marked calibrated (a buffer, so a resumed run or a
reloaded model never calibrates again) and its clip is left to training.

Under ``torch.distributed`` each estimate is averaged across ranks before it is used, so every rank starts from the
same clips (every rank runs the same forwards in the same order, so the collectives line up).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_quant.calibration import check_max_samples, get_clip_estimator, sample_indices
from lightning_quant.quantizers.base import ActivationQuantizer


def check_calibration_batches(value: object, name: str = "calibration_batches") -> int:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= 1.

    Raises:
        ValueError: If ``value`` is not an int >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1 (training batches the clips are estimated on), got {value!r}.")
    return value


def _mean_across_ranks(value: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


class ActivationCalibrator:
    """Calibrates every not-yet-calibrated activation site of ``model`` on its next ``num_batches`` forwards.

    Args:
        model: A model holding activation quantizers with a ``calibrated`` buffer and ``set_clip(site, value)``.
        estimator: Name of the clip estimator (:data:`lightning_quant.calibration.CLIP_ESTIMATORS`).
        num_batches: Forwards per site whose estimates are averaged.
        training_only: Only forwards in training mode count (validation batches never calibrate).
        max_samples: Estimate each forward's clip from a fixed-seed uniform sample of at most this many of its input's
            values (None: every value, up to the estimator's own budget of about a million). The estimators sort
            what they get, so this bounds calibration's cost on large activations.

    Raises:
        ValueError: If ``estimator`` is unknown, ``num_batches`` is not an int >= 1 or ``max_samples`` is neither
            None nor an int >= 1.
    """

    def __init__(
        self,
        model: nn.Module,
        estimator: str = "mse",
        num_batches: int = 1,
        training_only: bool = True,
        max_samples: int | None = None,
    ):
        self.estimate = get_clip_estimator(estimator)
        self.estimator = estimator
        self.num_batches = check_calibration_batches(num_batches)
        self.training_only = training_only
        check_max_samples(max_samples, allow_none=True)
        self.max_samples = max_samples
        self._sums: dict[tuple[int, int], tuple[Tensor, int]] = {}
        self._pending: set[tuple[int, int]] = set()
        self._handles: list[RemovableHandle] = []
        for module in model.modules():
            calibrates = hasattr(module, "set_clip") or hasattr(module, "set_calibration")
            if not isinstance(module, ActivationQuantizer) or not calibrates:
                continue
            sites = {(id(module), s) for s in range(module.num_sites) if not bool(module.calibrated[s])}
            sites = {(i, s) for i, s in sites if module.bits_at(s) is not None}  # float sites have no clip
            if sites:
                self._pending |= sites
                self._handles.append(module.register_forward_pre_hook(self._hook))

    @property
    def done(self) -> bool:
        """Every site has seen its ``num_batches`` forwards."""
        return not self._pending

    def remove(self) -> None:
        """Take the hooks off (sites not calibrated yet keep their current clip and are calibrated next time)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _hook(self, module: ActivationQuantizer, args: tuple[Any, ...]) -> None:
        if self.training_only and not module.training:
            return
        site = module.upcoming_site()
        key = (id(module), site)
        if key not in self._pending:
            return
        x = args[0].detach()
        idx = None if self.max_samples is None else sample_indices(x.numel(), self.max_samples, x.device)
        x = x if idx is None else x.reshape(-1)[idx]
        estimate = self._estimate(module, x, site).to(device=x.device, dtype=torch.float64)
        estimate = _mean_across_ranks(estimate)
        total, count = self._sums.get(key, (torch.zeros_like(estimate), 0))
        total, count = total + estimate, count + 1
        self._sums[key] = (total, count)
        if hasattr(module, "set_calibration"):
            module.set_calibration(site, total / count)
        else:
            module.set_clip(site, (total / count)[0])
        if count >= self.num_batches:
            module.calibrated[site] = True
            self._pending.discard(key)
            if self.done:
                self.remove()

    def _estimate(self, module: ActivationQuantizer, x: Tensor, site: int) -> Tensor:
        """A 1-D tensor: the clip of an unsigned site, or whatever the module's own ``calibration_estimate`` gives
        (``[lo, hi]`` for a signed input range)."""
        if hasattr(module, "calibration_estimate"):
            return module.calibration_estimate(x, site, self.estimator).reshape(-1)
        if getattr(module, "relu6", False):
            x = x.clamp(max=6.0)  # a ReLU6 site never passes more than 6 (below 0 the unsigned grid clamps anyway)
        return self.estimate(x, module.bits_at(site), False).reshape(1)
