"""How each quantizer's ops are registered, and where they find their kernels (see the ``functional`` docstring).

Every op has one Python reference (plain torch ops, any device and dtype): its kernel on every device without one of
its own, and its fake implementation. On CPU float32 the C kernels of :mod:`.native` take over where they apply, on
CUDA the Triton kernels of :mod:`.triton_kernels`; PyTorch's dispatcher picks by the tensors' device.

The ops are defined on a ``torch.library.Library`` fragment, not with ``torch.library.custom_op``: the dispatcher,
``torch.compile``, ``torch.export`` and ``opcheck`` see the same operator, without the Python checks ``custom_op``
wraps around every kernel call (about 100 us per forward and backward, more than ReLU's own on a small layer).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

LIBRARY = torch.library.Library("lightning_quant", "FRAGMENT")


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


def define_op(name: str, reference: Callable[..., Any], cpu: Callable[..., Any] | None = None) -> Any:
    """Define the operator ``lightning_quant::<name>`` and register its kernels.

    Args:
        name: The operator's name in the ``lightning_quant`` namespace.
        reference: The torch reference. Its type hints give the schema; it is the kernel on every device without
            one of its own, and the fake implementation (plain torch ops run on fake tensors too).
        cpu: The CPU kernel, where it is not the reference (it falls back to the reference itself where its C
            kernel does not apply).

    Returns:
        The operator (``torch.ops.lightning_quant.<name>.default``), called like ``reference``.
    """
    LIBRARY.define(name + torch.library.infer_schema(reference, mutates_args=()))
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    if cpu is not None:
        LIBRARY.impl(name, cpu, "CPU")

    def cuda(*args: Any) -> Any:  # the Triton launcher of the same name (the reference where triton is missing)
        module = triton_kernels()
        return reference(*args) if module is None else getattr(module, name)(*args)

    LIBRARY.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"lightning_quant::{name}", reference, lib=LIBRARY)
    return getattr(torch.ops.lightning_quant, name).default


def register_autograd(op: Any, setup_context: Callable[..., None], backward: Callable[..., Any]) -> None:
    """Give ``op`` an autograd formula, as ``torch.library.register_autograd`` does.

    Args:
        op: An operator from :func:`define_op`.
        setup_context: ``setup_context(ctx, inputs, output)``: saves what ``backward`` needs.
        backward: ``backward(ctx, *grads)``: one gradient (or None) per input of ``op``.
    """

    formula = backward

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> Any:
            output = _below_autograd(op, inputs)
            setup_context(ctx, inputs, output)
            return output

        backward = staticmethod(formula)

    Function.__name__ = Function.__qualname__ = f"{op._opname}_autograd"

    def kernel(*inputs: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
            return Function.apply(*inputs)
        return _below_autograd(op, inputs)

    LIBRARY.impl(op._opname, kernel, "Autograd")


def _below_autograd(op: Any, inputs: tuple) -> Any:
    # The op's own kernel (CPU, CUDA, fake, ...), skipping this autograd kernel, as torch.library's does.
    with torch._C._AutoDispatchBelowAutograd():
        return op(*inputs)
