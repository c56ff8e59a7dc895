"""The fused kernels (lightning_quant/functional/fused.py): compiled and eager give the same bits, and match the
formulas as autograd computed them before the kernels existed.

"The same bits" means: same dtype, shape and NaN positions, and every other element bit-identical, except that
+0.0 and -0.0 count as equal (inductor compiles with -fno-signed-zeros; a quantized 0 may carry either sign) and
NaN payloads are not compared.

The compiled side uses inductor (the real code generation is what is under test); whole-model ``torch.compile``
tests use the ``aot_eager`` backend to stay fast. No timing assertions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same, dorefa_input, grads_of, pact_input, saved_bytes
from torch import Tensor, nn

from lightning_quant.functional import fused, native
from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.dsq import dsq_quantize
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.functional.quant_noise import block_noise, fake_quantize_affine, scalar_noise
from lightning_quant.functional.ste import round_ste
from lightning_quant.quantizers import DoReFaWeight, DSQActivation, DSQWeight, PACTActivation, QuantNoiseWeight


@pytest.fixture(autouse=True)
def _restore_mode():
    # The native CPU kernels would take the float32 cases from inductor: off here (tests/test_native.py has them).
    mode = fused.get_compiled()
    native.set_enabled(False)
    yield
    fused.set_compiled(mode)
    native.set_enabled(True)


def both_modes(fn):
    """``fn()`` with the kernels eager, then compiled."""
    out = []
    for mode in (False, True):
        with fused.use_compiled(mode):
            out.append(fn())
    return out


# ------------------------------------------------------------------------------------------------ references


class _ReferencePACT(torch.autograd.Function):
    """PACT as it was written before the kernels (functional/pact.py at the previous commit)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, levels: int) -> Tensor:
        a = alpha.to(x.dtype)
        y = torch.clamp(x, min=torch.zeros_like(a), max=a)
        q = torch.round(y * (levels / a)) * (a / levels)
        code = torch.where(x >= a, 2, torch.where(x >= 0, 1, 0)).to(torch.int8)
        ctx.save_for_backward(code)
        ctx.alpha_shape, ctx.alpha_dtype = alpha.shape, alpha.dtype
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        (code,) = ctx.saved_tensors
        acc = torch.promote_types(grad.dtype, torch.float32)
        terms = grad.to(acc) * (code == 2).to(acc)
        # Summed in float64 since the native kernels (one accumulation for every path; see functional/native.py).
        grad_alpha = terms.sum(dtype=torch.float64).to(acc).to(ctx.alpha_dtype).reshape(ctx.alpha_shape)
        return grad * (code == 1).to(grad.dtype), grad_alpha, None


def reference_dorefa(w: Tensor, bits: int) -> Tensor:
    """DoReFa as it was written before the kernels: the formula, differentiated by autograd."""
    levels = 2**bits - 1
    t = torch.tanh(w)
    r = t / (2 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
    return 2 * (round_ste(r * levels) / levels) - 1


# ------------------------------------------------------------------------------------------------ PACT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_compiled_equals_eager_and_reference(bits: int, dtype: torch.dtype) -> None:
    alpha = [0.7, 2.5, 6.0, 10.0][bits % 4]
    x = pact_input(4099, alpha, bits, dtype, seed=bits)  # an odd size: the vector loops' tails run too
    a = torch.tensor([alpha], dtype=torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + bits)).to(dtype)
    eager, compiled = both_modes(lambda: grads_of(lambda x, a: pact_quantize(x, a, bits), x, a, grad=grad))
    reference = grads_of(lambda x, a: _ReferencePACT.apply(x, a, 2**bits - 1), x, a, grad=grad)
    for e, c, r in zip(eager, compiled, reference):
        assert_same(e, c)
        assert_same(e, r)


def test_pact_compiled_kernels_were_used() -> None:
    x = torch.randn(64, requires_grad=True)
    a = torch.tensor(1.0, requires_grad=True)
    with fused.use_compiled(True):
        pact_quantize(x, a, 4).sum().backward()
    stats = fused.compile_stats()
    assert stats["pact_forward"]["compiled"] and stats["pact_backward_x_alpha"]["compiled"]
    assert stats["pact_forward"]["failed"] is None


def test_pact_module_and_frozen_alpha_paths() -> None:
    # The module (alpha floor, per-site alpha) and the x-only backward (alpha not trained).
    m = PACTActivation(4, num_sites=2, alpha_init=2.0)
    x = torch.randn(8, 3, 17, 5) * 3
    g = torch.randn(8, 3, 17, 5)

    def run() -> list[Tensor | None]:
        m.zero_grad()
        m.reset_sites()
        xx = x.clone().requires_grad_(True)
        out = m(xx)
        out.backward(g)
        return [out.detach(), xx.grad, m.alpha.grad.clone()]

    for e, c in zip(*both_modes(run)):
        assert_same(e, c)
    m.alpha.requires_grad_(False)

    def frozen(xx: Tensor) -> Tensor:
        m.reset_sites()
        return m(xx)

    eager, compiled = both_modes(lambda: grads_of(frozen, x, grad=g))
    for e, c in zip(eager, compiled):
        assert_same(e, c)


def test_pact_non_contiguous_input_takes_the_eager_path_with_the_same_values() -> None:
    x = torch.randn(33, 20).t()
    a = torch.tensor(1.5)
    eager, compiled = both_modes(lambda: pact_quantize(x, a, 3))
    assert_same(eager, compiled)
    assert_same(eager, pact_quantize(x.contiguous(), a, 3))


# ------------------------------------------------------------------------------------------------ saved bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_pact_saves_at_most_one_byte_per_element(compiled: bool, dtype: torch.dtype) -> None:
    x = torch.randn(4, 16, 32, 32).to(dtype).requires_grad_(True)
    m = PACTActivation(4, alpha_init=1.0)
    with fused.use_compiled(compiled):
        # A few bytes for the 0-d alpha bookkeeping; nothing per element beyond the int8 code.
        assert saved_bytes(lambda: m(x)) <= x.numel() + 64


# ------------------------------------------------------------------------------------------------ DSQ


def dsq_input(shape: tuple[int, ...], bits: int, dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    delta = 3.5 / (2**bits - 1)
    special = [-0.5, 3.0, -0.5 + 0.5 * delta, -0.5 + delta, float("nan"), float("inf"), -float("inf"), -0.6, 3.1]
    x.view(-1)[: len(special)] = torch.tensor(special, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize(
    ("bits", "dtype", "alpha", "learn_alpha"),
    [
        (2, torch.float32, 0.2, False),
        (4, torch.float32, 0.95, True),  # alpha near 1: the series branch of d g / d c
        (4, torch.float32, 0.3, True),
        (8, torch.float32, 0.5, False),
        (4, torch.bfloat16, 0.2, True),
    ],
)
def test_dsq_compiled_equals_eager(bits: int, dtype: torch.dtype, alpha: float, learn_alpha: bool) -> None:
    x = dsq_input((6, 5, 13, 7), bits, dtype, seed=bits)
    lo, up, al = torch.tensor(-0.5), torch.tensor(3.0), torch.tensor(alpha)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)

    def run() -> list[Tensor | None]:
        leaves = [x.clone().requires_grad_(True), lo.clone().requires_grad_(True), up.clone().requires_grad_(True)]
        alpha_leaf = al.clone().requires_grad_(learn_alpha)
        out = dsq_quantize(*leaves, alpha_leaf, bits)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in leaves), alpha_leaf.grad]

    for e, c in zip(*both_modes(run)):
        assert_same(e, c)


def test_dsq_modules_compiled_equal_eager() -> None:
    act = DSQActivation(4, num_sites=2, learn_temperature=True)
    x = torch.randn(4, 8, 9, 9) * 2
    act.calibrate(x, 0)
    act.calibrate(x * 0.5, 1)
    weight = DSQWeight(3)
    w = torch.randn(16, 8, 3, 3) * 0.1
    weight.calibrate(w)

    def run() -> list[Tensor | None]:
        act.zero_grad()
        weight.zero_grad()
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = act(xx).sum() + (act(xx * 0.5) ** 2).sum() + (weight(ww) * 3).sum()
        out.backward()
        params = [p.grad for p in (*act.parameters(), *weight.parameters())]
        return [out.detach(), xx.grad, ww.grad, *params]

    for e, c in zip(*both_modes(run)):
        assert_same(e, c)


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(7,), (32, 16, 3, 3), (40, 24)])
def test_dorefa_compiled_equals_eager_and_reference(bits: int, shape: tuple[int, ...]) -> None:
    w, grad = dorefa_input(shape, seed=bits)
    eager, compiled = both_modes(lambda: grads_of(lambda w: dorefa_quantize_weight(w, bits), w, grad=grad))
    reference = grads_of(lambda w: reference_dorefa(w, bits), w, grad=grad)
    for e, c in zip(eager, compiled):
        assert_same(e, c)
    assert_same(eager[0], reference[0])
    # The max's gradient carries a sum over every element: autograd's is float32, ours float64-accumulated (the
    # same in every path since the native kernels), so there the two agree to float32 rounding; elsewhere, exactly.
    at_max = torch.tanh(w).abs() == torch.tanh(w).abs().max()
    assert_same(eager[1][~at_max], reference[1][~at_max])
    torch.testing.assert_close(eager[1][at_max], reference[1][at_max], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (24, 64), (16, 32, 1, 1)])
def test_quant_noise_compiled_equals_eager(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1
    grad = torch.randn(shape)
    cases = [
        lambda w: fake_quantize_affine(w, 4),
        lambda w: scalar_noise(w, 0.5, 4, generator=torch.Generator().manual_seed(1)),
        lambda w: scalar_noise(w, torch.tensor(0.3), 4, generator=torch.Generator().manual_seed(2)),
        lambda w: block_noise(w, 0.25, 8, generator=torch.Generator().manual_seed(3)),
        lambda w: block_noise(w, torch.tensor(0.1), 8, generator=torch.Generator().manual_seed(4)),
    ]
    for fn in cases:
        eager, compiled = both_modes(lambda fn=fn: grads_of(fn, w, grad=grad))
        for e, c in zip(eager, compiled):
            assert_same(e, c)


def test_weight_modules_in_both_modes_save_nothing_beyond_their_input() -> None:
    w = nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)
    for module in (DoReFaWeight(4), QuantNoiseWeight(4, p=0.5), QuantNoiseWeight(4, p=0.2, mode="block")):
        for compiled in (False, True):
            with fused.use_compiled(compiled):
                # DoReFa keeps tanh(w) (its backward needs it, as autograd kept it before); QuantNoise nothing.
                assert saved_bytes(lambda module=module: module(w)) <= 4 * w.numel() + 64


# ------------------------------------------------------------------------------------------------ whole models


class _Net(nn.Module):
    def __init__(self, act: nn.Module, weight: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = act
        self.weight_q = weight
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn(self.conv(x)))
        w = self.fc.weight if self.weight_q is None else self.weight_q(self.fc.weight)
        return F.linear(x.flatten(1), w, self.fc.bias)


def _nets() -> list[_Net]:
    dsq = DSQActivation(4, temperature=0.3, learn_temperature=True)
    dsq.calibrated.fill_(True)
    dsq_w = DSQWeight(4)
    dsq_w.calibrate(torch.randn(5, 288) * 0.05)
    return [
        _Net(PACTActivation(4, alpha_init=1.0), DoReFaWeight(4)),
        _Net(dsq, dsq_w),
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_fullgraph_compile_of_a_model_matches_eager(index: int) -> None:
    # Traced by an enclosing torch.compile, the kernels' bodies join the model's graph whatever the switch says.
    torch.manual_seed(0)
    net = _nets()[index]
    x = torch.randn(4, 3, 6, 6)

    def run(model: nn.Module) -> list[Tensor]:
        net.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return [out.detach(), *(p.grad.clone() for p in net.parameters() if p.grad is not None)]

    with fused.use_compiled(True):
        eager = run(net)
        torch._dynamo.reset()
        compiled = run(torch.compile(net, fullgraph=True, backend="aot_eager"))
    assert len(eager) == len(compiled)
    for e, c in zip(eager, compiled):
        assert_same(e, c)


def test_fullgraph_compile_with_quant_noise_runs() -> None:
    net = _Net(nn.ReLU(), QuantNoiseWeight(4, p=0.5))
    torch._dynamo.reset()
    out = torch.compile(net, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 6, 6))
    out.sum().backward()
    assert net.fc.weight.grad is not None


@pytest.mark.parametrize("index", [0, 1])
def test_bf16_autocast_compiled_equals_eager(index: int) -> None:
    torch.manual_seed(0)
    net = _nets()[index]
    x = torch.randn(4, 3, 6, 6)

    def run() -> list[Tensor]:
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().square().sum().backward()
        return [out.detach(), *(p.grad.clone() for p in net.parameters() if p.grad is not None)]

    eager, compiled = both_modes(run)
    assert eager[0].dtype == torch.bfloat16
    for e, c in zip(eager, compiled):
        assert_same(e, c)


# ------------------------------------------------------------------------------------------------ the switch


def test_mode_parsing_and_context_manager() -> None:
    fused.set_compiled("off")
    assert fused.get_compiled() == "off"
    for value, expected in [(True, "on"), (False, "off"), ("auto", "auto"), ("1", "on"), ("0", "off"), ("ON", "on")]:
        fused.set_compiled(value)
        assert fused.get_compiled() == expected
    with fused.use_compiled(False):
        assert fused.get_compiled() == "off"
    assert fused.get_compiled() == "on"
    with pytest.raises(ValueError, match="compiled mode"):
        fused.set_compiled("sometimes")
    assert fused.parse_mode(" Auto ") == "auto" and fused.parse_mode(0 == 0) == "on"


def test_env_var_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused.ENV_VAR, "0")
    assert fused._mode_from_env() == "off"
    monkeypatch.setenv(fused.ENV_VAR, "1")
    assert fused._mode_from_env() == "on"
    monkeypatch.setenv(fused.ENV_VAR, "bogus")
    with pytest.warns(UserWarning, match=fused.ENV_VAR):
        assert fused._mode_from_env() == "auto"


def _double(x: Tensor) -> Tensor:
    return x * 2


def test_auto_mode_compiles_after_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = fused.FusedKernel("test_auto_double", _double)
    compiled_calls = []

    def fake_compile(fn, **kwargs):  # the switching logic is under test here, not inductor
        def run(*args):
            compiled_calls.append(args)
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    try:
        fused.set_compiled("auto")
        monkeypatch.setattr(fused, "AUTO_THRESHOLD_S", 1e9)
        kernel(torch.ones(4))
        assert not kernel.stats()["compiled"] and kernel.eager_seconds > 0
        monkeypatch.setattr(fused, "AUTO_THRESHOLD_S", 0.0)
        kernel(torch.ones(4))  # crosses the threshold
        assert kernel.auto_ready
        assert torch.equal(kernel(torch.ones(4)), torch.full((4,), 2.0))
        assert kernel.stats()["compiled"] and len(compiled_calls) == 1
    finally:
        fused._registry.pop("test_auto_double", None)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = fused.FusedKernel("test_failing_double", _double)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    try:
        monkeypatch.setattr(torch, "compile", broken_compile)
        fused.set_compiled(True)
        with pytest.warns(RuntimeWarning, match="no C.. compiler here"):
            out = kernel(torch.ones(3))
        assert torch.equal(out, torch.full((3,), 2.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(kernel(torch.ones(3)), torch.full((3,), 2.0))  # no second warning
        assert kernel.stats()["failed"].startswith("RuntimeError")
    finally:
        fused._registry.pop("test_failing_double", None)


def test_kernel_names_are_unique() -> None:
    with pytest.raises(ValueError, match="exists already"):
        fused.FusedKernel("pact_forward", _double)
