"""Fake-quantizer modules, one file per method. Plain torch: no Lightning import."""

from lightning_quant.quantizers.base import ActivationQuantizer, ResetCallSites, WeightQuantizer
from lightning_quant.quantizers.dsq import DSQActivation, DSQWeight
from lightning_quant.quantizers.lsq import LSQWeight
from lightning_quant.quantizers.pact import DoReFaWeight, PACTActivation
from lightning_quant.quantizers.quant_noise import QuantNoiseWeight

__all__ = [
    "ActivationQuantizer",
    "DSQActivation",
    "DSQWeight",
    "DoReFaWeight",
    "LSQWeight",
    "PACTActivation",
    "QuantNoiseWeight",
    "ResetCallSites",
    "WeightQuantizer",
]
