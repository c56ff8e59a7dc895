"""Lightning callbacks: thin layers over :class:`QuantizationCallback`, one per method."""

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.callbacks.pact import PACTCallback

__all__ = ["PACTCallback", "QuantizationCallback"]
