"""Lightning callbacks: thin layers over :class:`QuantizationCallback`, one per method."""

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.callbacks.dsq import DSQCallback
from lightning_quant.callbacks.pact import PACTCallback
from lightning_quant.callbacks.quant_noise import QuantNoiseCallback

__all__ = ["DSQCallback", "PACTCallback", "QuantNoiseCallback", "QuantizationCallback"]
