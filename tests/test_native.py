"""The native CPU kernels (lightning_quant/csrc/quant_kernels.c via functional/native.py): PACT and DoReFa give the
same bits as the eager torch code, on every thread count, at the boundaries, with NaN and inf; DSQ's forward too, and
its gradients agree to float32 rounding (its backward has its own tanh); used where they apply, never where they do
not; and a clean fallback when they cannot be built. No timing assertions (benchmarks/speed.py measures speed).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same, dorefa_input, grads_of, pact_input, saved_bytes
from torch import Tensor

from lightning_quant.functional import fused, native
from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.dsq import dsq_quantize
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.quantizers import DoReFaWeight, DSQActivation, PACTActivation

HAVE_COMPILER = native._compiler() is not None


@pytest.fixture(autouse=True)
def _restore() -> None:
    mode, threads = fused.get_compiled(), torch.get_num_threads()
    yield
    fused.set_compiled(mode)
    native.set_enabled(True)
    torch.set_num_threads(threads)


@pytest.fixture
def lib():
    if not HAVE_COMPILER:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    library = native.library()
    # With a compiler present, a failed build is a bug, not a reason to skip.
    assert library is not None, native.build_error()
    return library


class CountingLibrary:
    """Wraps the loaded library and counts the calls of each kernel."""

    def __init__(self, library) -> None:
        self._library = library
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):
        function = getattr(self._library, name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return function(*args)

        return call


def eager_and_native(fn):
    """``fn()`` with torch's eager kernels only, then with the native ones (mode "auto")."""
    with fused.use_compiled(False):
        eager = fn()
    with fused.use_compiled("auto"):
        fast = fn()
    return eager, fast


# ------------------------------------------------------------------------------------------------ PACT


@pytest.mark.parametrize("n", [4099, 300_007])  # under and over the size where the kernels go parallel
@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_native_equals_eager(lib, bits: int, n: int) -> None:
    alpha = [0.7, 2.5, 6.0, 10.0][bits % 4]
    x = pact_input(n, alpha, bits, torch.float32, seed=bits)
    a = torch.tensor([alpha])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + bits))
    grad[-3:] = torch.tensor([float("inf"), float("nan"), -float("inf")])  # an infinite grad times a 0 mask is NaN
    eager, fast = eager_and_native(lambda: grads_of(lambda x, a: pact_quantize(x, a, bits), x, a, grad=grad))
    for e, f in zip(eager, fast):
        assert_same(e, f)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pact_native_gives_the_same_bits_on_any_thread_count(lib, threads: int) -> None:
    x = pact_input(300_007, 2.0, 3, torch.float32, seed=7)
    a = torch.tensor([2.0])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    torch.set_num_threads(1)
    eager = grads_of(lambda x, a: pact_quantize(x, a, 3), x, a, grad=grad)
    torch.set_num_threads(threads)
    with fused.use_compiled("auto"):
        fast = grads_of(lambda x, a: pact_quantize(x, a, 3), x, a, grad=grad)
    for e, f in zip(eager, fast):
        assert_same(e, f)


def test_pact_native_kernels_run_only_where_they_apply(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingLibrary(lib)
    monkeypatch.setattr(native, "_lib", counting)
    m = PACTActivation(4, alpha_init=1.5)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with fused.use_compiled("auto"):
        m(x).sum().backward()
    assert counting.calls == {"lq_pact_forward_f32": 1, "lq_pact_backward_f32": 1}
    # Not float32, not contiguous, mode "off", switched off: the torch kernels, never the native ones.
    with fused.use_compiled("auto"):
        m(x.double()).sum().backward()
        m(x.transpose(1, 2)).sum().backward()
        native.set_enabled(False)
        m(x).sum().backward()
        native.set_enabled(True)
    with fused.use_compiled(False):
        m(x).sum().backward()
    assert counting.calls == {"lq_pact_forward_f32": 1, "lq_pact_backward_f32": 1}


def test_pact_native_frozen_alpha_and_frozen_input(lib) -> None:
    # Only one of the two gradients wanted: the kernel skips the other, the values stay the eager ones.
    x = torch.randn(5, 7, 11) * 3
    g = torch.randn(5, 7, 11)
    a = torch.tensor([1.25])
    for needs in ((True, False), (False, True)):

        def run(needs: tuple[bool, bool] = needs) -> list[Tensor | None]:
            xx = x.clone().requires_grad_(needs[0])
            aa = a.clone().requires_grad_(needs[1])
            out = pact_quantize(xx, aa, 3)
            out.backward(g)
            return [out.detach(), xx.grad, aa.grad]

        eager, fast = eager_and_native(run)
        for e, f in zip(eager, fast):
            assert_same(e, f)


def test_pact_native_saves_one_byte_per_element(lib) -> None:
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    m = PACTActivation(4, alpha_init=1.0)
    with fused.use_compiled("auto"):
        assert saved_bytes(lambda: m(x)) <= x.numel() + 64


def test_empty_input_takes_the_torch_path(lib) -> None:
    x = torch.empty(0, 3, requires_grad=True)
    with fused.use_compiled("auto"):
        out = pact_quantize(x, torch.tensor([1.0]), 4)
        out.sum().backward()
    assert out.shape == (0, 3) and x.grad.shape == (0, 3)


# ------------------------------------------------------------------------------------------------ DoReFa


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(7,), (32, 16, 3, 3), (256, 256, 3, 3)])
def test_dorefa_native_equals_eager(lib, bits: int, shape: tuple[int, ...]) -> None:
    w, grad = dorefa_input(shape, seed=bits)
    eager, fast = eager_and_native(lambda: grads_of(lambda w: dorefa_quantize_weight(w, bits), w, grad=grad))
    for e, f in zip(eager, fast):
        assert_same(e, f)


def test_dorefa_native_zero_and_nan_weights(lib) -> None:
    # All zero: the max is clamped to tiny, every weight maps to the middle level. A NaN: the max is NaN, as in torch.
    for w in (torch.zeros(40, 3), torch.randn(40, 3).index_put_((torch.tensor([5]),), torch.tensor(float("nan")))):
        grad = torch.randn(w.shape)
        eager, fast = eager_and_native(
            lambda w=w, grad=grad: grads_of(lambda w: dorefa_quantize_weight(w, 2), w, grad=grad)
        )
        for e, f in zip(eager, fast):
            assert_same(e, f)


def test_dorefa_native_kernels_were_used(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingLibrary(lib)
    monkeypatch.setattr(native, "_lib", counting)
    w = torch.randn(16, 8, requires_grad=True)
    with fused.use_compiled("auto"):
        dorefa_quantize_weight(w, 4).sum().backward()
    assert counting.calls == {"lq_dorefa_forward_f32": 1, "lq_dorefa_backward_f32": 1}


# ------------------------------------------------------------------------------------------------ build and fallback


def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_tried", False)


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")
def test_build_is_cached_on_disk(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path))
    _fresh_state(monkeypatch)
    assert native.library() is not None
    (built,) = list(tmp_path.rglob("quant_kernels.so"))
    stamp = built.stat().st_mtime_ns
    # A new process (state reset) loads the cached library instead of compiling again.
    _fresh_state(monkeypatch)
    monkeypatch.setattr(native.subprocess, "run", _refuse_compile(native.subprocess.run))
    assert native.library() is not None
    assert built.stat().st_mtime_ns == stamp


def _refuse_compile(run):
    def wrapped(args, *rest, **kwargs):
        assert "--version" in args, f"compiled again: {args}"
        return run(args, *rest, **kwargs)

    return wrapped


def test_missing_compiler_warns_once_and_falls_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    _fresh_state(monkeypatch)
    x = pact_input(5000, 2.0, 4, torch.float32, seed=1)
    a = torch.tensor([2.0])
    grad = torch.randn(x.shape)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
        with fused.use_compiled("auto"):
            fast = grads_of(lambda x, a: pact_quantize(x, a, 4), x, a, grad=grad)
    assert native.library() is None and "no-such-cc" in native.build_error()
    with fused.use_compiled(False):
        eager = grads_of(lambda x, a: pact_quantize(x, a, 4), x, a, grad=grad)
    for e, f in zip(eager, fast):
        assert_same(e, f)


def test_disabled_by_environment_without_a_warning(monkeypatch: pytest.MonkeyPatch, recwarn) -> None:
    monkeypatch.setenv("LIGHTNING_QUANT_NATIVE", "0")
    _fresh_state(monkeypatch)
    assert native.library() is None
    assert "LIGHTNING_QUANT_NATIVE" in native.build_error()
    assert not [w for w in recwarn if "native" in str(w.message)]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the Linux process map")
def test_library_shares_torchs_openmp_runtime(lib) -> None:
    # The library asks for libgomp.so.1 by soname, which torch has loaded: no second GNU OpenMP runtime (and thread
    # pool) comes with it. Other wheels' renamed copies (scikit-learn's libgomp-<hash>.so) are theirs, not ours.
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len({p for p in paths if os.path.basename(p).startswith("libgomp.so")}) == 1, paths


# ------------------------------------------------------------------------------------------------ DSQ


def dsq_case(activation: str | None, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Input with values below, inside and above the range [0.25, 3], bin edges and centres, NaN and inf."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(50_021, generator=g) * 2 + 0.5
    lo, up = 0.25, 3.0
    delta = (up - lo) / (2**bits - 1)
    special = [lo, up, lo + delta, lo + 0.5 * delta, -1.0, 6.0, 7.0, float("nan"), float("inf"), -float("inf")]
    x[: len(special)] = torch.tensor(special)
    grad = torch.randn(x.shape, generator=g)
    return x, torch.tensor(lo), torch.tensor(up), grad


def dsq_run(
    x: Tensor,
    lo: Tensor,
    up: Tensor,
    grad: Tensor,
    bits: int,
    activation: str | None,
    use_native: bool,
    alpha: float = 0.3,
    learned: tuple[bool, bool, bool, bool] = (True, True, True, False),
) -> tuple[Tensor, ...]:
    """``(output, grad of x, lower, upper, alpha)``; a gradient is None for an input ``learned`` leaves fixed."""
    native.set_enabled(use_native)
    try:
        inputs = [t.clone().requires_grad_(r) for t, r in zip((x, lo, up, torch.tensor(alpha)), learned)]
        out = dsq_quantize(*inputs, bits, activation=activation)
        out.backward(grad)
        return (out.detach(), *(t.grad for t in inputs))
    finally:
        native.set_enabled(True)


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dsq_native_forward_is_exact_and_gradients_agree(lib, bits: int, activation: str | None) -> None:
    x, lo, up, grad = dsq_case(activation, bits)
    torch_out, torch_gx, torch_gl, torch_gu, _ = dsq_run(x, lo, up, grad, bits, activation, use_native=False)
    out, gx, gl, gu, _ = dsq_run(x, lo, up, grad, bits, activation, use_native=True)
    assert_same(torch_out, out)  # the forward: bit for bit
    # The backward's own tanh: within float32 rounding of the torch path, zero exactly where it is zero (outside the
    # range, NaN inputs, where the activation blocks the gradient).
    assert torch.equal(torch_gx == 0, gx == 0)
    torch.testing.assert_close(gx, torch_gx, rtol=1e-5, atol=1e-5 * float(torch_gx.abs().max()))
    scale = float(grad.abs().sum())  # the sums' magnitude, for their absolute tolerance
    torch.testing.assert_close(gl, torch_gl, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(gu, torch_gu, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize(("lo", "up"), [(1.0, 1.0), (1.0, 0.5), (-3.0, 1e-9 - 3.0), (0.1, 0.7), (-2.5, 2.5)])
def test_dsq_native_scalars_are_the_torch_paths(lib, lo: float, up: float) -> None:
    """The kernel's range and bin width come from Python floats; collapsed, inverted and odd ranges included."""
    x = torch.linspace(-4, 4, 4099)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for bits in (1, 3, 8):
        torch_out, torch_gx, _, torch_gu, _ = dsq_run(x, torch.tensor(lo), torch.tensor(up), grad, bits, None, False)
        out, gx, _, gu, _ = dsq_run(x, torch.tensor(lo), torch.tensor(up), grad, bits, None, True)
        assert_same(torch_out, out)
        torch.testing.assert_close(gx, torch_gx, rtol=1e-5, atol=1e-5 * float(torch_gx.abs().max()))
        torch.testing.assert_close(gu, torch_gu, rtol=1e-5, atol=1e-6 * float(grad.abs().sum()))


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_dsq_native_fixed_lower_bound_skips_only_its_sum(lib, activation: str | None) -> None:
    """With ``lower`` fixed (DSQActivation's default) the kernel takes its loop without that sum: same x, u grads."""
    x, lo, up, grad = dsq_case(activation, 4)
    _, gx_all, _, gu_all, _ = dsq_run(x, lo, up, grad, 4, activation, use_native=True)
    fixed_lower = (True, False, True, False)
    _, gx, gl, gu, _ = dsq_run(x, lo, up, grad, 4, activation, use_native=True, learned=fixed_lower)
    assert gl is None
    assert_same(gx, gx_all)
    assert_same(gu, gu_all)
    _, _, _, torch_gu, _ = dsq_run(x, lo, up, grad, 4, activation, use_native=False, learned=fixed_lower)
    torch.testing.assert_close(gu, torch_gu, rtol=1e-5, atol=1e-6 * float(grad.abs().sum()))


def test_dsq_native_reads_learned_bounds_without_warnings(lib) -> None:
    x = torch.randn(64, requires_grad=True)
    upper = torch.tensor(2.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
        dsq_quantize(x, torch.tensor(0.0), upper, torch.tensor(0.3), 4, activation="relu").sum().backward()
    assert upper.grad is not None and x.grad is not None


def test_dsq_native_gradient_is_the_same_on_any_thread_count(lib) -> None:
    x, lo, up, grad = dsq_case("relu", 4)
    x = x.repeat(8)
    grad = grad.repeat(8)
    torch.set_num_threads(1)
    one = dsq_run(x, lo, up, grad, 4, "relu", use_native=True)
    torch.set_num_threads(3)
    three = dsq_run(x, lo, up, grad, 4, "relu", use_native=True)
    for a, b in zip(one[:2], three[:2]):
        assert_same(a, b)  # per element: no reduction involved
    for a, b in zip(one[2:4], three[2:4]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)  # float64 sums in another order


def test_dsq_native_only_for_one_finite_range(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingLibrary(lib)
    monkeypatch.setattr(native, "_lib", counting)
    x = torch.randn(4, 8, requires_grad=True)
    lo, up = torch.tensor(0.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    with fused.use_compiled("auto"):
        dsq_quantize(x, lo, up, torch.tensor(0.3), 4, activation="relu").sum().backward()
        dsq_quantize(x, lo, up, torch.tensor(0.3, requires_grad=True), 4).sum().backward()  # learned alpha too
        assert counting.calls == {"lq_dsq_forward_f32": 2, "lq_dsq_backward_f32": 2}
        # A NaN bound, per-channel bounds: the torch path.
        dsq_quantize(x, lo, torch.tensor(float("nan")), torch.tensor(0.3), 4).sum().backward()
        dsq_quantize(x, torch.zeros(4, 1), torch.full((4, 1), 2.0), torch.tensor(0.3), 4).sum().backward()
    assert counting.calls == {"lq_dsq_forward_f32": 2, "lq_dsq_backward_f32": 2}


# alpha -> c = log(2 / alpha - 1): 0.9 -> 0.20 (below the series threshold 0.25), 0.3 -> 1.5, 0.02 -> 4.6,
# 1e-5 -> 12.2; 1e-7 and 1 - 1e-7 lie outside the clamp [1e-6, 1 - 1e-6] (alpha's gradient is 0 there).
@pytest.mark.parametrize("alpha", [0.9, 0.3, 0.02, 1e-5, 1e-7, 1 - 1e-7])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dsq_native_learned_alpha_gradient_agrees(lib, bits: int, activation: str | None, alpha: float) -> None:
    x, lo, up, grad = dsq_case(activation, bits)
    # dQ/dalpha is odd in the offset inside the bin, so a random upstream gradient sums it to almost nothing; the
    # gradient of the quantization error 0.5 * (Q - x)^2 has the offset's sign, so the terms add up.
    error = (dsq_quantize(x, lo, up, torch.tensor(alpha), bits, activation=activation) - x).nan_to_num(0.0, 0.0, 0.0)
    for upstream in (grad, error):
        t_out, t_gx, t_gl, t_gu, t_ga = dsq_run(x, lo, up, upstream, bits, activation, False, alpha, (True,) * 4)
        out, gx, gl, gu, ga = dsq_run(x, lo, up, upstream, bits, activation, True, alpha, (True,) * 4)
        assert_same(t_out, out)
        torch.testing.assert_close(gx, t_gx, rtol=1e-5, atol=1e-5 * float(t_gx.abs().max()))
        scale = float(upstream.abs().sum())
        torch.testing.assert_close(gl, t_gl, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(gu, t_gu, rtol=1e-5, atol=1e-6 * scale)
        if upstream is error:
            torch.testing.assert_close(ga, t_ga, rtol=1e-5, atol=0.0)
    if 1e-6 <= alpha <= 1 - 1e-6:
        assert float(t_ga) != 0.0
    else:
        assert float(ga) == 0.0 and float(t_ga) == 0.0


def test_dsq_module_folds_its_activation(lib) -> None:
    for relu6 in (False, True):
        m = DSQActivation(3, relu6=relu6)
        m.set_range(0, 0.0, 5.0)
        x = torch.randn(2, 4, 9, 9) * 4
        native.set_enabled(False)
        reference = dsq_quantize(F.relu6(x) if relu6 else F.relu(x), m.lower[0], m.upper[0], m.temperature[0], 3)
        native.set_enabled(True)
        with fused.use_compiled("auto"):
            assert_same(m(x), reference)


def test_dsq_activation_argument_is_checked() -> None:
    with pytest.raises(ValueError, match=r"`activation` must be None, 'relu' or 'relu6', got 'gelu'"):
        dsq_quantize(torch.randn(3), 0.0, 1.0, 0.2, 4, activation="gelu")


@pytest.mark.parametrize("alpha", [1e-9, -2.0, 0.75])
def test_pact_native_alpha_floor_is_exact_and_straight_through(lib, alpha: float) -> None:
    # An alpha under the floor: the forward clips at the floor, and alpha still gets the saturated points' gradient.
    x = pact_input(5001, 1.0, 4, torch.float32, seed=11)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    a = torch.tensor([alpha])

    def run(x: Tensor, a: Tensor) -> Tensor:
        return pact_quantize(x, a, 4, min_alpha=1e-3)

    eager, fast = eager_and_native(lambda: grads_of(run, x, a, grad=grad))
    for e, f in zip(eager, fast):
        assert_same(e, f)
    assert float(fast[2]) != 0.0


# ------------------------------------------------------------------------------------------------ torch.compile


class _QuantNet(torch.nn.Module):
    """Conv with a DoReFa weight, a PACT activation, a DSQ activation: every native kernel in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.quantizer = DoReFaWeight(4)
        self.pact = PACTActivation(4, alpha_init=1.5)
        self.dsq = DSQActivation(4)
        self.dsq.set_range(0, 0.0, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pact(F.conv2d(x, self.quantizer(self.conv.weight), self.conv.bias, padding=1))
        return self.dsq(y - 0.5)


def test_whole_model_compile_traces_torch_ops_without_graph_breaks(lib) -> None:
    # Eager, the model runs the native kernels; under torch.compile(fullgraph=True) the quantizers must trace as
    # torch ops (a ctypes call would break the graph, and fullgraph makes that an error) with the same values.
    torch.manual_seed(0)
    net = _QuantNet()
    x = torch.randn(2, 3, 9, 9)

    def run(model: torch.nn.Module) -> list[Tensor]:
        net.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return [out.detach(), net.conv.weight.grad.clone(), net.pact.alpha.grad.clone(), net.dsq.upper.grad.clone()]

    counting = CountingLibrary(lib)
    with fused.use_compiled("auto"):
        native_run = run(net)
        torch._dynamo.reset()
        native._lib, saved = counting, native._lib
        try:
            compiled_run = run(torch.compile(net, fullgraph=True, backend="aot_eager"))
        finally:
            native._lib = saved
    assert counting.calls == {}  # nothing native inside the compiled graph
    assert_same(native_run[0], compiled_run[0])
    # Gradients: through DSQ's backward (its own tanh), so to float32 rounding of the largest entry.
    for a, b in zip(native_run[1:], compiled_run[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")
def test_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(blocker / "cache"))  # mkdir under a file fails
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    _fresh_state(monkeypatch)
    assert native.library() is not None
    assert list((tmp_path / "tmp").rglob("quant_kernels.so"))
