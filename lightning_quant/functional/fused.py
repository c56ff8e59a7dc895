"""Fused elementwise kernels for the quantizers: one pass each way, compiled with ``torch.compile`` on demand.

Every quantizer's autograd function does its per-element work through a :class:`FusedKernel`: a plain torch
function (the *body*) that runs either eagerly, op by op, or as one kernel compiled by inductor. The two give
bit-identical results (``tests/test_fused.py``), so the switch below changes speed, never values:

* ``"off"``: always eager.
* ``"on"``: compile each kernel on its first call (a few seconds per kernel and dtype, once per process; inductor
  caches the generated code on disk, so later processes start faster).
* ``"auto"`` (the default): run eagerly, timing each kernel, and compile a kernel once it has spent
  :data:`AUTO_THRESHOLD_S` seconds of eager time -- about what compiling it costs, so a short run never pays for a
  compile it cannot earn back, and a long run pays at most that much extra before it speeds up (the ski-rental
  rule). Only CPU calls are timed (a GPU call returns before its kernel ends); on other devices ``"auto"`` stays
  eager.

On CPU float32, PACT, DoReFa and DSQ skip these kernels for hand-written C ones
(:mod:`lightning_quant.functional.native`: one pass each way; the same values for PACT and DoReFa, DSQ's backward to
float32 rounding) in ``"on"`` and ``"auto"`` modes; ``"off"`` keeps plain torch ops everywhere.

Choose with :func:`set_compiled` (``True``/``False``/``"auto"``) or the environment variable
``LIGHTNING_QUANT_COMPILE`` (``1``/``on``, ``0``/``off``, ``auto``), read at import.

Under ``torch.compile`` of the whole model the body is traced into the model's graph (no graph break, no nested
compile), whatever the switch says. If compiling fails (no C++ compiler, an unsupported device or dtype), the kernel
warns once and stays eager for good.

Why a kernel stays exact: the bodies use only operations that inductor computes exactly as eager does (IEEE
``+ - * /``, comparisons, ``round``, ``floor``, ``min``/``max``, ``where``, casts; inductor compiles with
``-ffp-contract=off``, and low-precision intermediates are rounded as eager rounds them,
``emulate_precision_casts``). Three things do *not* match and stay out of the compiled bodies, as ordinary eager ops
on tensors the kernels write: transcendental functions (eager ``torch.tanh``/``torch.sinh`` and inductor's
vectorized ones are different implementations that disagree in the last bit on a fraction of inputs), sums (another
summation order gives another last bit; the kernels write the per-element terms and ``.sum()`` adds them as before)
and ``tanh_backward`` (eager computes ``1 - t * t`` as one fused multiply-add). "Bit-identical" allows two
exceptions: the sign of a zero (inductor compiles with ``-fno-signed-zeros``) and the payload of a NaN.

Codegen notes (measured on a 2-core AVX-512 CPU, torch 2.13): comparing an ``int8`` tensor directly (``code == 1``)
is not vectorized (about 15x slower), so the backward bodies cast the code to ``float32`` first; ``torch.where``
with int literals blends in int64 before narrowing to ``int8`` (float literals are about 20% faster); 0-d values
computed inside a kernel (``levels / alpha``) are recomputed for every vector, so they are computed before it. Every
input is passed detached: a flat view of a 4-D tensor would make dynamo guard on the base's shape and compile once
per rank. One graph per dtype (shapes are dynamic).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AUTO_THRESHOLD_S",
    "ENV_VAR",
    "FusedKernel",
    "compile_stats",
    "fusable",
    "get_compiled",
    "kernels",
    "parse_mode",
    "set_compiled",
    "use_compiled",
]

ENV_VAR = "LIGHTNING_QUANT_COMPILE"

AUTO_THRESHOLD_S = 10.0
"""Eager seconds a kernel may spend in ``"auto"`` mode before it is compiled (about one kernel's compile time)."""

_MODES = {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off", "auto": "auto"}


def parse_mode(value: object) -> str:
    """Normalise a mode (``True``/``False``, ``"on"``/``"off"``/``"auto"``, ``"1"``/``"0"``) to ``"on"``, ``"off"`` or
    ``"auto"``; for validating a user's option before it is applied.

    Raises:
        ValueError: If ``value`` is not one of those.
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in _MODES:
        return _MODES[value.strip().lower()]
    raise ValueError(f"compiled mode must be True, False, 'on', 'off' or 'auto', got {value!r}.")


def _mode_from_env() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    try:
        return parse_mode(value)
    except ValueError:
        warnings.warn(f"{ENV_VAR}={value!r} is not one of 1/on, 0/off, auto; using 'auto'.", stacklevel=2)
        return "auto"


_mode = _mode_from_env()
_lock = threading.Lock()
_registry: dict[str, FusedKernel] = {}


def set_compiled(mode: bool | str = True) -> None:
    """Choose how the quantizers' kernels run: ``True``/``"on"``, ``False``/``"off"`` or ``"auto"``.

    Values never depend on the choice, only speed. Takes effect on the next call of each kernel.

    Raises:
        ValueError: If ``mode`` is not one of the values above.
    """
    global _mode
    _mode = parse_mode(mode)


def get_compiled() -> str:
    """The current mode: ``"on"``, ``"off"`` or ``"auto"``."""
    return _mode


class use_compiled:
    """Context manager that sets the mode inside a ``with`` block and restores the previous one after it."""

    def __init__(self, mode: bool | str = True) -> None:
        self.mode = parse_mode(mode)
        self._previous = _mode

    def __enter__(self) -> use_compiled:
        self._previous = get_compiled()
        set_compiled(self.mode)
        return self

    def __exit__(self, *exc: object) -> None:
        set_compiled(self._previous)


def kernels() -> dict[str, FusedKernel]:
    """Every fused kernel by name (for tests and the benchmark)."""
    return dict(_registry)


def compile_stats() -> dict[str, dict[str, Any]]:
    """Per kernel: whether it is compiled, the eager seconds counted in auto mode, the first compiled call's
    seconds (compile time included) and the error that disabled it, if any."""
    return {name: k.stats() for name, k in _registry.items()}


def _all_on_cpu(args: tuple) -> bool:
    return all(a.device.type == "cpu" for a in args if isinstance(a, Tensor))


class FusedKernel:
    """A per-element function that runs eagerly or compiled (see the module docstring for when).

    Args:
        name: Unique name (shown in warnings and :func:`compile_stats`).
        body: The function; tensors and Python scalars in, a tensor or a tuple of tensors out. It must be exact
            under inductor (basic arithmetic only; see the module docstring).
        eager: An equivalent function (bit-identical results) that runs faster op by op, used when not compiling.
    """

    def __init__(self, name: str, body: Callable[..., Any], eager: Callable[..., Any] | None = None) -> None:
        if name in _registry:
            raise ValueError(f"A fused kernel named {name!r} exists already.")
        self.name = name
        self.body = body
        self.eager = body if eager is None else eager
        self._compiled: Callable[..., Any] | None = None
        self._warm: set[tuple] = set()
        self.failed: str | None = None
        self.eager_seconds = 0.0
        self.auto_ready = False
        self.first_call_seconds: dict[str, float] = {}
        _registry[name] = self

    def stats(self) -> dict[str, Any]:
        return {
            "compiled": self._compiled is not None and self.failed is None,
            "auto_ready": self.auto_ready,
            "eager_seconds": self.eager_seconds,
            "first_call_seconds": dict(self.first_call_seconds),
            "failed": self.failed,
        }

    def reset(self) -> None:
        """Forget the compiled function, the failure and the auto-mode timing (tests)."""
        self._compiled = None
        self._warm = set()
        self.failed = None
        self.eager_seconds = 0.0
        self.auto_ready = False
        self.first_call_seconds = {}

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced into an enclosing torch.compile graph: the body is what that compiler should see.
            return self.body(*args)
        mode = _mode
        if mode == "off" or self.failed is not None:
            return self.eager(*args)
        if mode == "auto" and not self.auto_ready:
            if not _all_on_cpu(args):
                return self.eager(*args)
            start = time.perf_counter()
            out = self.eager(*args)
            self.eager_seconds += time.perf_counter() - start
            if self.eager_seconds >= AUTO_THRESHOLD_S:
                self.auto_ready = True
            return out
        return self._call_compiled(args)

    def _call_compiled(self, args: tuple) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            # A double backward (create_graph=True) would need a differentiable compiled graph: not worth it.
            return self.eager(*args)
        # Detached, the inputs are plain tensors: no `requires_grad`, and no view base (see the module docstring).
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        try:
            if self._compiled is None:
                with _lock:
                    if self._compiled is None:
                        self._compiled = torch.compile(
                            self.body,
                            dynamic=True,
                            fullgraph=True,
                            # Round low-precision intermediates as eager does (bf16/fp16 bodies stay exact).
                            options={"emulate_precision_casts": True},
                        )
            key = tuple((a.dtype, a.device.type) for a in args if isinstance(a, Tensor))
            if key in self._warm:
                return self._compiled(*args)
            start = time.perf_counter()
            out = self._compiled(*args)
            devices = sorted({device for _, device in key})
            label = f"{'/'.join(devices)}: {', '.join(str(dtype).removeprefix('torch.') for dtype, _ in key)}"
            self.first_call_seconds[label] = time.perf_counter() - start
            self._warm.add(key)
            return out
        except Exception as error:  # noqa: BLE001 - any compiler failure means: stay eager
            self.failed = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            warnings.warn(
                f"lightning_quant: compiling the fused kernel {self.name!r} failed ({self.failed}); "
                "it runs eagerly from now on (same values, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.eager(*args)


def fusable(*tensors: Tensor) -> bool:
    """True when the tensors can go through a fused kernel as flat views: contiguous and not empty."""
    return all(t.is_contiguous() for t in tensors) and tensors[0].numel() > 0
