"""Autograd-level quantization functions. Plain torch: no Lightning import."""

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.dsq import dsq_quantize, dsq_soft
from lightning_quant.functional.lsq import lsq_quantize, lsq_range
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.functional.quant_noise import block_noise, fake_quantize_affine, scalar_noise
from lightning_quant.functional.ste import round_ste

__all__ = [
    "block_noise",
    "dorefa_quantize_weight",
    "dsq_quantize",
    "dsq_soft",
    "fake_quantize_affine",
    "lsq_quantize",
    "lsq_range",
    "pact_quantize",
    "round_ste",
    "scalar_noise",
]
