"""PACT modules: the learned-clip activation and the DoReFa weight quantizer of the PACT paper."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.quantizers.base import ActivationQuantizer, WeightQuantizer, check_bits, check_positive

#: The clip is kept away from zero: at ``alpha <= 0`` the quantization step ``alpha / (2**k - 1)`` is meaningless.
MIN_ALPHA = 1e-3


class PACTActivation(ActivationQuantizer):
    """Replaces ``nn.ReLU`` / ``nn.ReLU6``: ``clip(x, 0, alpha)`` quantized to ``bits``, one learned alpha per site.

    Args:
        bits: Bit width of the output, 1..16.
        num_sites: Number of call sites this module serves; each gets its own alpha (per-tensor, as in the paper).
        alpha_init: Initial clip. The paper starts at 10 and lets the L2 penalty on alpha pull it down.
        relu6: The module replaced an ``nn.ReLU6``: a float site computes ReLU6, and a calibrated clip stays <= 6.
        calibrated: Whether ``alpha_init`` is final. False: the clips are still to be set from data (by
            :class:`~lightning_quant.calibrator.ActivationCalibrator`, through :meth:`set_clip`); the ``calibrated``
            buffer records which sites have been, so a resumed run never calibrates again.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self, bits: int, num_sites: int = 1, alpha_init: float = 10.0, relu6: bool = False, calibrated: bool = True
    ) -> None:
        super().__init__(num_sites)
        check_bits(bits, "bits")
        check_positive(alpha_init, "alpha_init")
        self.bits = bits
        self.relu6 = relu6  # what a float site computes (PACT's clip replaces the 6 on quantized sites)
        self.alpha = nn.Parameter(torch.full((num_sites,), float(alpha_init)))
        self.register_buffer("calibrated", torch.full((num_sites,), bool(calibrated)))

    @torch.no_grad()
    def set_clip(self, site: int, value: Tensor | float) -> None:
        """Set the clip of one site (kept in ``[MIN_ALPHA, 6]`` for a ReLU6 site, ``>= MIN_ALPHA`` otherwise)."""
        value = torch.as_tensor(value, dtype=self.alpha.dtype, device=self.alpha.device).clamp(min=MIN_ALPHA)
        self.alpha[site] = value.clamp(max=6.0) if self.relu6 else value

    def quantize(self, x: Tensor, site: int) -> Tensor:
        # One site: the (1,)-shaped Parameter itself, which saves an index op and its backward.
        alpha = self.alpha if self.num_sites == 1 else self.alpha[site]
        # Floored with a straight-through gradient: an alpha pushed below MIN_ALPHA (by weight decay) can come back.
        return pact_quantize(x, alpha, self.bits_at(site), min_alpha=MIN_ALPHA)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {super().extra_repr()}"


class DoReFaWeight(WeightQuantizer):
    """DoReFa ``bits``-bit weight quantizer (no learned values).

    Args:
        bits: Bit width, 1..16.

    Raises:
        ValueError: If ``bits`` is out of range.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        check_bits(bits, "bits")
        self.bits = bits

    def forward(self, weight: Tensor) -> Tensor:
        return dorefa_quantize_weight(weight, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


__all__ = ["MIN_ALPHA", "DoReFaWeight", "PACTActivation"]
