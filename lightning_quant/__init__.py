"""lightning_quant: quantization-aware training for any LightningModule, as one callback.

The core (``functional``, ``quantizers``, ``layers``, ``surgery``, ``schedules``, ``config``) is plain torch; the
callbacks are thin Lightning layers over it.
"""

from lightning_quant import schedules
from lightning_quant.callbacks import DSQCallback, PACTCallback, QuantizationCallback, QuantNoiseCallback
from lightning_quant.checkpoint import inject_from_checkpoint, load_from_checkpoint
from lightning_quant.config import DSQConfig, PACTConfig, QuantConfig, QuantNoiseConfig
from lightning_quant.export import export_onnx
from lightning_quant.ptq import post_training_quantize
from lightning_quant.surgery import QuantizationPlan, inject_quantizers

__all__ = [
    "DSQCallback",
    "DSQConfig",
    "PACTCallback",
    "PACTConfig",
    "QuantConfig",
    "QuantNoiseCallback",
    "QuantNoiseConfig",
    "QuantizationCallback",
    "QuantizationPlan",
    "export_onnx",
    "inject_from_checkpoint",
    "inject_quantizers",
    "load_from_checkpoint",
    "post_training_quantize",
    "schedules",
]
__version__ = "0.1.0"
