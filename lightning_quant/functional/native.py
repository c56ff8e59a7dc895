"""Native CPU kernels (``lightning_quant/csrc/quant_kernels.c``), built on first use and called through ``ctypes``.

On CPU float32 the PACT activation, the DoReFa weight quantizer and DSQ (the activation it replaces folded in) run a
small C file with OpenMP: one pass over memory each way, no temporaries, no per-op dispatch. It includes no torch
headers, so the system C compiler builds it in about a second; the library is cached under
``$LIGHTNING_QUANT_CACHE`` (default ``~/.cache/lightning_quant``), keyed by the source, the compiler and this CPU's
flags (``-march=native``). It links ``libgomp.so.1``, the OpenMP runtime torch has loaded, sized per call by
``torch.get_num_threads()``. The values are the torch reference's float32 operations in its order (no fused
multiply-add, no fast-math; sums in float64), bit for bit, except DSQ's backward (its own vectorized tanh: float32
rounding). The kernels run inside the custom ops, so tracers never see the ctypes calls. Without a C compiler
:func:`library` warns once and returns None, and the ops run their torch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SOURCE", "applies", "build_error", "library", "threads", "to_float32"]

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "quant_kernels.c"
# No fused multiply-add and no fast-math: every value stays the eager one. -fno-trapping-math (FP exceptions are never
# observed) and -fno-math-errno let GCC vectorize the selects and rintf; neither changes a result.
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False

_DTYPES = (torch.float32, torch.int8)
_P, _N, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int  # pointer, count, float, int
_SIGNATURES = {
    "lq_pact_forward_f32": (None, [_P, _P, _P, _N, _F, _F, _F, _I]),
    "lq_pact_backward_f32": (ctypes.c_double, [_P, _P, _P, _N, _I]),
    "lq_dorefa_forward_f32": (None, [_P, _P, _P, _P, _N, _F, _F, _I]),
    "lq_dorefa_backward_f32": (None, [_P, _P, _P, _N, _F, _F, _F, _F, _I]),
    "lq_dsq_forward_f32": (None, [_P, _P, _N, _F, _F, _F, _I, _I, _I]),
    "lq_dsq_backward_f32": (None, [_P, _P, _P, _P, _N, _F, _F, _F, _I, _F, _F, _I, _I, _I, _F, _I]),
}


def _cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_QUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_quant")
    return Path(root) / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / key / "quant_kernels.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some CI runners): build under the temporary directory instead
        user = getattr(os, "getuid", lambda: 0)()
        target = Path(tempfile.gettempdir()) / f"lightning_quant-{user}" / key / "quant_kernels.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (DDP ranks) never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None if disabled or the build failed (warns once)."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC)")
            lib = ctypes.CDLL(str(_build(compiler)))
            for name, (restype, argtypes) in _SIGNATURES.items():
                function = getattr(lib, name)
                function.restype = restype
                function.argtypes = argtypes
            _lib = lib
        except Exception as error:  # noqa: BLE001 - any failure means: use the torch kernels
            _error = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"lightning_quant: the native CPU kernels are unavailable ({_error}); the quantizers use torch "
                "kernels instead (same values, slower). Install a C compiler with OpenMP (gcc) to get them.",
                RuntimeWarning,
                stacklevel=2,
            )
        _tried = True
    return _lib


def build_error() -> str | None:
    """Why :func:`library` returned None (None when it loaded or was not tried yet)."""
    return _error


def applies(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library if these tensors can take the native kernels: every one is a non-empty contiguous CPU float32 (or
    int8 code) tensor, and the library loads. Else None."""
    for t in tensors:  # cheap attribute reads first: this runs twice per quantizer call
        if not t.is_cpu or t.dtype not in _DTYPES or not t.is_contiguous() or t.numel() == 0:
            return None
    return library()


def to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as torch rounds a float64 to float32), as a Python float.

    Quotients of two float32 values computed in float64 and rounded this way are the correctly rounded float32
    quotients (float64 has more than twice float32's precision), so scalars prepared in Python match torch's.
    """
    return ctypes.c_float(value).value


def threads() -> int:
    """Threads a native kernel uses: torch's intra-op count (``torch.set_num_threads``)."""
    return torch.get_num_threads()
