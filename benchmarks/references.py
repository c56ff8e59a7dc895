"""torch.ao reference quantization shared by the benchmarks (``accuracy.py`` and ``speed.py``).

Both scripts run from the repository root as ``python benchmarks/<name>.py``; Python puts ``benchmarks/`` on the
path, so they import this module by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def ao_fake_quantize(bits: int, signed: bool) -> Callable[..., nn.Module]:
    """A torch.ao ``FakeQuantize`` factory with a moving-average min/max observer for ``bits`` bits.

    Args:
        bits: Bit width (``quant_min``/``quant_max`` are set for it).
        signed: Symmetric signed range (weights) instead of the unsigned ``[0, 2**bits - 1]`` (activations).
    """
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    if signed:
        return FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=-(2 ** (bits - 1)),
            quant_max=2 ** (bits - 1) - 1,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
    return FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2**bits - 1, dtype=torch.quint8
    )


def torch_ao_qat(model: nn.Module, bits: int) -> None:
    """torch.ao QAT on the places PACT quantizes in ``DemoCNN``: middle-layer weights and the ReLU outputs feeding them.

    ``prepare_qat`` swaps the middle Conv/Linear layers for torch.ao's QAT modules (weight FakeQuantize). Eager-mode
    ``prepare`` does not observe ``nn.ReLU`` outputs (fusion and QuantStubs are expected), so each quantized ReLU is
    followed by a torch.ao ``FakeQuantize`` module directly.
    """
    from torch.ao.quantization import QConfig, prepare_qat

    activation, weight = ao_fake_quantize(bits, signed=False), ao_fake_quantize(bits, signed=True)
    for name in ("conv2", "conv3", "fc1"):
        getattr(model, name).qconfig = QConfig(activation=activation, weight=weight)
    prepare_qat(model, inplace=True)
    for name in ("conv2", "conv3", "fc1"):
        # prepare also fake-quantizes these layers' outputs; PACT does not (BatchNorm follows), so neither do we.
        getattr(model, name).activation_post_process = nn.Identity()
    for name in ("relu1", "relu2", "relu3"):
        setattr(model, name, nn.Sequential(nn.ReLU(), activation()))


def brevitas_qat(model: nn.Module, bits: int) -> None:
    """Brevitas QAT on the places PACT quantizes in ``DemoCNN``: middle-layer weights and the ReLUs feeding them.

    ``conv2``, ``conv3`` and ``fc1`` become Brevitas ``QuantConv2d``/``QuantLinear`` with ``weight_bit_width=bits``
    and ``relu1``-``relu3`` become ``QuantReLU(bit_width=bits)``; the float layers' weights are copied over, so a
    trained model is fine-tuned from where it is. Brevitas' default quantizers are kept:

    * weights: ``Int8WeightPerTensorFloat`` at ``bits`` bits: signed, narrow range (``-(2**(bits-1) - 1)`` to
      ``2**(bits-1) - 1``; ternary at 2 bits), one scale per tensor recomputed every step from the weight's
      largest magnitude (not learned);
    * activations: ``Uint8ActPerTensorFloat`` at ``bits`` bits: unsigned, one scale per tensor that is the running
      mean of the 99.999th percentile over the first 300 training steps and a learned parameter after them.

    Needs ``pip install brevitas`` (the ``bench`` extra).

    Args:
        model: A ``DemoCNN``; edited in place.
        bits: Bit width of the weights and of the activations.
    """
    from brevitas.nn import QuantConv2d, QuantLinear, QuantReLU

    for name in ("conv2", "conv3"):
        old = getattr(model, name)
        new = QuantConv2d(
            old.in_channels,
            old.out_channels,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=old.groups,
            bias=old.bias is not None,
            weight_bit_width=bits,
        )
        new.load_state_dict(old.state_dict())
        setattr(model, name, new)
    old = model.fc1
    new = QuantLinear(old.in_features, old.out_features, bias=old.bias is not None, weight_bit_width=bits)
    new.load_state_dict(old.state_dict())
    model.fc1 = new
    for name in ("relu1", "relu2", "relu3"):
        setattr(model, name, QuantReLU(bit_width=bits))
