"""Autograd-level quantization functions. Plain torch: no Lightning import.

Each quantizer's elementwise forward and backward is a ``torch.library`` custom op (``lightning_quant::pact_forward``,
``pact_backward``, ``dorefa_*``, ``dsq_*``, ``lsq_*``) with a fake implementation and a registered autograd formula,
so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op each. PyTorch's dispatcher picks the
kernel by device: the C kernels (:mod:`.native`) on CPU float32 where they exist, the Triton kernels
(:mod:`.triton_kernels`) on CUDA, and the torch reference next to each op otherwise (any device and dtype; the tests'
reference). QuantNoise stays plain torch ops (:mod:`.quant_noise` says why). There is no mode switch.
"""

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.dsq import dsq_quantize
from lightning_quant.functional.lsq import lsq_quantize, lsq_range
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.functional.quant_noise import block_noise, fake_quantize_affine, scalar_noise

__all__ = [
    "block_noise",
    "dorefa_quantize_weight",
    "dsq_quantize",
    "fake_quantize_affine",
    "lsq_quantize",
    "lsq_range",
    "pact_quantize",
    "scalar_noise",
]
