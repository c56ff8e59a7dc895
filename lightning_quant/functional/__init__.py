"""Autograd-level quantization functions. Plain torch: no Lightning import."""

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.functional.ste import round_ste

__all__ = ["dorefa_quantize_weight", "pact_quantize", "round_ste"]
