"""DoReFa weight quantization, as used for the weights in the PACT paper (Zhou et al. 2016, eq. 9)::

    w_q = 2 * quantize_k( tanh(w) / (2 * max|tanh(w)|) + 0.5 ) - 1,    quantize_k(r) = round((2**k - 1) r) / (2**k - 1)

The gradient is straight-through on ``round`` only; it flows through ``tanh`` and the normalisation by the max (to
the arg-max element too), as in the reference TensorFlow code. The output lies in ``[-1, 1]`` whatever the scale of
``w``: the layers that follow (batch norm) absorb the scale, as in the paper's networks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant.functional.ste import round_ste


def dorefa_quantize_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa ``k``-bit weight quantization with the straight-through estimator on the rounding.

    Args:
        w: The float weight.
        bits: Bit width ``k``, 1..16.

    Returns:
        The quantized weight, values in ``{2 j / (2**k - 1) - 1 : j = 0 .. 2**k - 1}``.
    """
    levels = 2**bits - 1
    t = torch.tanh(w)
    # An all-zero weight would divide by zero; its quantized value is then 0.5 -> the middle level.
    r = t / (2 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
    return 2 * (round_ste(r * levels) / levels) - 1
