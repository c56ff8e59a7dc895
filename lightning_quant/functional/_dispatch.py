"""Where each quantizer's custom op finds its kernels (see the ``functional`` package docstring).

Every op has one Python reference (plain torch ops, any device and floating dtype, float64 included), which is its
default kernel; on CPU float32 the C kernels of :mod:`.native` take over where they apply, and on CUDA the Triton
kernels of :mod:`.triton_kernels`. PyTorch's dispatcher picks by the device of the tensors: there is no switch.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any


@functools.cache
def triton_kernels() -> ModuleType | None:
    """:mod:`.triton_kernels`, imported on the first CUDA call; None (with a warning) where it can not be: no triton,
    or a torch older than 2.6 (no ``torch.library.triton_op``). The ops then run their torch reference on CUDA."""
    if importlib.util.find_spec("triton") is None:
        warnings.warn("lightning_quant: triton is not installed; the quantizers run torch ops on CUDA.", stacklevel=2)
        return None
    try:
        from lightning_quant.functional import triton_kernels as module
    except ImportError as error:
        message = f"lightning_quant: the Triton kernels are unavailable ({error}); the quantizers run torch ops."
        warnings.warn(message, stacklevel=2)
        return None
    return module


def register_kernels(op: Any, name: str, reference: Callable[..., Any]) -> None:
    """Register ``op``'s fake implementation, its reference itself (plain torch ops run on fake tensors as well), and
    its CUDA kernel, the Triton launcher ``triton_kernels.<name>`` (the reference where triton is missing)."""
    op.register_fake(reference)

    def kernel(*args: Any) -> Any:
        module = triton_kernels()
        return reference(*args) if module is None else getattr(module, name)(*args)

    op.register_kernel("cuda")(kernel)
