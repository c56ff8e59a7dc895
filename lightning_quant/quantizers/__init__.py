"""Fake-quantizer modules, one file per method. Plain torch: no Lightning import."""

from lightning_quant.quantizers.base import ActivationQuantizer, ResetCallSites, WeightQuantizer

__all__ = ["ActivationQuantizer", "ResetCallSites", "WeightQuantizer"]
