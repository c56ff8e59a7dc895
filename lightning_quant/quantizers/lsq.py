"""LSQ weight quantizer (Esser et al. 2019): a learned step per tensor or per output channel, with a zero level.

Unlike DoReFa (whose output lies in ``[-1, 1]`` whatever the weight's scale and has no zero level) the quantized
weight is ``code * step`` with integer codes in ``[qmin, qmax]``: it keeps the float weight's scale and a zero (a
pruned) weight stays exactly 0. The numerics and every convention are in :mod:`lightning_quant.functional.lsq`.

The step is the Parameter ``step``: shape ``(1,)`` per tensor, ``(C,)`` per channel. Whoever builds the quantizer
calls :meth:`LSQWeight.init_from` with the layer's weight (as ``DSQWeight.calibrate``), which sets the step to the
MSE-optimal clip over ``Qp`` (:func:`~lightning_quant.calibration.mse_clip`); a per-channel step only gets its
``C`` entries there (before, it holds one placeholder entry and the forward refuses to run). A checkpoint's step is
adopted with its shape, so a fresh quantizer loads a per-channel state dict without ``init_from``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.calibration import mse_clip, mse_clip_per_channel
from lightning_quant.functional.lsq import lsq_quantize, lsq_range
from lightning_quant.quantizers.base import WeightQuantizer

__all__ = ["MIN_STEP", "LSQWeight"]

MIN_STEP = 1e-12
"""Floor of the step in the forward (straight-through gradient): keeps ``w / step`` finite and the grid unflipped.
Far below any step a real weight needs (an 8-bit grid over weights of 1e-6 still has steps of 1e-8)."""


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")


class LSQWeight(WeightQuantizer):
    """LSQ ``bits``-bit weight quantizer: ``round(clamp(w / s, qmin, qmax)) * s`` with a learned step ``s``.

    Args:
        bits: Bit width, an int in 2..16 (1 bit has no zero level).
        per_channel: One step per output channel instead of one per tensor.
        channel_axis: The weight's output-channel axis: 0 for ``nn.Linear``/``nn.ConvNd``, 1 for transformers'
            ``Conv1D`` (which stores its weight transposed). Negative counts from the end. Only used per channel.
        narrow: Symmetric codes ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (2 bits: ternary) instead of LSQ's
            ``[-2**(b-1), 2**(b-1) - 1]``.

    Raises:
        ValueError: If an argument is out of range (the message names it).
    """

    has_zero_level = True

    def __init__(self, bits: int, per_channel: bool = False, channel_axis: int = 0, narrow: bool = False) -> None:
        super().__init__()
        self._qn, self._qp = lsq_range(bits, narrow)  # validates `bits`
        _check_flag(per_channel, "per_channel")
        _check_flag(narrow, "narrow")
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise ValueError(f"`channel_axis` must be an int (the output-channel axis), got {channel_axis!r}.")
        self.bits = bits
        self.per_channel = per_channel
        self.channel_axis = channel_axis
        self.narrow = narrow
        self.step = nn.Parameter(torch.ones(1))

    @property
    def qmin(self) -> int:
        """The lowest integer code, ``-Qn``."""
        return -self._qn

    @property
    def qmax(self) -> int:
        """The highest integer code, ``Qp``."""
        return self._qp

    def scale(self) -> Tensor:
        """The step the forward uses (floored at :data:`MIN_STEP`): shape ``(1,)`` per tensor, ``(C,)`` per channel."""
        return self.step.clamp_min(MIN_STEP)

    def _axis(self, weight: Tensor) -> int:
        """The channel axis for this weight, made non-negative; validates ``per_channel`` and ``channel_axis``."""
        if weight.dim() < 2:
            raise ValueError(
                f"`per_channel` must be False for a weight with fewer than 2 dims, got True for shape "
                f"{tuple(weight.shape)}."
            )
        if not -weight.dim() <= self.channel_axis < weight.dim():
            raise ValueError(
                f"`channel_axis` must be in [{-weight.dim()}, {weight.dim() - 1}] for a {weight.dim()}-d weight, "
                f"got {self.channel_axis}."
            )
        return self.channel_axis % weight.dim()

    def _broadcast_step(self, weight: Tensor) -> Tensor:
        if not self.per_channel:
            return self.step
        axis = self._axis(weight)
        if self.step.numel() != weight.shape[axis]:
            raise ValueError(
                f"`step` has {self.step.numel()} entries but the weight has {weight.shape[axis]} channels along "
                f"`channel_axis`={self.channel_axis}: call `init_from(weight)` first."
            )
        shape = [1] * weight.dim()
        shape[axis] = -1
        return self.step.view(shape)

    def forward(self, weight: Tensor) -> Tensor:
        """Return the fake-quantized weight (same shape and dtype), codes times the step."""
        return lsq_quantize(weight, self._broadcast_step(weight), self.bits, narrow=self.narrow, min_step=MIN_STEP)

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """Set the step to the MSE-optimal clip of ``weight`` over ``Qp`` (per channel: one per output channel).

        Args:
            weight: The weight this quantizer serves. Per channel, the step takes its number of channels.

        Raises:
            ValueError: If ``per_channel`` is set and the weight has fewer than 2 dims, or ``channel_axis`` is out of
                range for it.
        """
        if self.per_channel:
            clip = mse_clip_per_channel(weight, self.bits, self._axis(weight), signed=True, narrow=self.narrow)
        else:
            clip = mse_clip(weight, self.bits, signed=True, narrow=self.narrow).reshape(1)
        step = (clip / self._qp).clamp_min(MIN_STEP).to(self.step.dtype).to(self.step.device)
        # `.data` keeps the Parameter object (and any optimizer's reference) while it takes the channel count.
        self.step.data = step

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        # A per-channel checkpoint into a fresh quantizer: take the saved shape instead of failing on (1,) vs (C,).
        saved = state_dict.get(prefix + "step")
        if isinstance(saved, Tensor) and saved.dim() == 1 and saved.shape != self.step.shape:
            self.step.data = self.step.data.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        axis = f", channel_axis={self.channel_axis}" if self.per_channel else ""
        return f"bits={self.bits}, per_channel={self.per_channel}{axis}, narrow={self.narrow}"
