"""Numerics of QuantNoise: the affine fake quantizer, scalar and block noise, and the `QuantNoiseWeight` module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_quant.functional.quant_noise import block_noise, block_shape, fake_quantize_affine, scalar_noise
from lightning_quant.layers import swap_layer
from lightning_quant.quantizers.quant_noise import QuantNoiseWeight


def reference_fake_quantize(values: list[float], bits: int) -> list[float]:
    """Hand-written per-tensor affine fake quantization, one Python float at a time (round half to even)."""
    qmax = 2**bits - 1
    lo, hi = min(values), max(values)
    scale = (hi - lo) / qmax
    if scale <= 0:
        return list(values)
    zero_point = round(-lo / scale)
    return [(min(max(round(v / scale + zero_point), 0), qmax) - zero_point) * scale for v in values]


def within_sigmas(count: int, total: int, p: float, sigmas: float = 4.0) -> bool:
    """Whether ``count`` successes out of ``total`` Bernoulli(p) draws lie within ``sigmas`` standard deviations."""
    return abs(count / total - p) <= sigmas * math.sqrt(p * (1 - p) / total)


def off_grid_weight(n: int, bits: int) -> Tensor:
    """A float64 weight none of whose entries already sits on a quantization level (so every noised entry changes)."""
    w = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert (fake_quantize_affine(w, bits) != w).all()
    return w


# --------------------------------------------------------------------------------------------- fake_quantize_affine


@pytest.mark.parametrize("bits", range(1, 9))
def test_fake_quantize_matches_hand_reference(bits: int) -> None:
    w = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(bits))
    out = fake_quantize_affine(w, bits)
    assert out.dtype == torch.float64
    assert out.tolist() == reference_fake_quantize(w.tolist(), bits)
    # The levels count is 2**bits (observed range, not an 8-bit observer as in fairseq's int4 path).
    assert out.unique().numel() <= 2**bits


def test_fake_quantize_hand_computed_case() -> None:
    # min -0.6, max 0.9: scale 1.5 / 3 = 0.5, zero point round(1.2) = 1, levels -0.5, 0, 0.5, 1.
    w = torch.tensor([-0.6, -0.2, 0.1, 0.35, 0.9], dtype=torch.float64)
    assert fake_quantize_affine(w, 2).tolist() == [-0.5, 0.0, 0.0, 0.5, 1.0]


def test_fake_quantize_uses_all_sixteen_levels_at_4_bits() -> None:
    w = torch.linspace(-1.0, 1.0, 10_001, dtype=torch.float64)
    assert fake_quantize_affine(w, 4).unique().numel() == 16


def test_fake_quantize_float32_output_is_exactly_on_the_grid() -> None:
    w = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    out = fake_quantize_affine(w, 3)
    scale = (w.max() - w.min()) / 7
    zero_point = torch.round(-w.min() / scale)
    grid = (torch.arange(8, dtype=torch.float32) - zero_point) * scale
    # Exact membership: no `w + (q - w).detach()` rounding noise between the levels.
    assert torch.isin(out, grid).all()
    assert out.unique().numel() <= 8


@pytest.mark.parametrize("value", [0.7, 0.0, -3.0])
def test_fake_quantize_constant_tensor_is_unchanged(value: float) -> None:
    w = torch.full((3, 4), value, dtype=torch.float64, requires_grad=True)
    out = fake_quantize_affine(w, 4)
    assert torch.equal(out, w.detach())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_fake_quantize_gradient_is_straight_through_and_input_untouched() -> None:
    w = torch.randn(50, 20, dtype=torch.float64, requires_grad=True)
    before, version = w.detach().clone(), w._version
    g = torch.randn(50, 20, dtype=torch.float64)
    (fake_quantize_affine(w, 2) * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert torch.equal(w.detach(), before) and w._version == version


@pytest.mark.parametrize("bits", [0, 17, 4.0, True])
def test_fake_quantize_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="`bits` must be an int in 1..16"):
        fake_quantize_affine(torch.randn(4), bits)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- scalar noise


@pytest.mark.parametrize("p", [0.0, torch.tensor(0.0)])
def test_scalar_noise_p0_is_exactly_float(p: float | Tensor) -> None:
    w = off_grid_weight(10_000, 4)
    assert torch.equal(scalar_noise(w, p, 4), w)


@pytest.mark.parametrize("p", [1.0, torch.tensor(1.0)])
def test_scalar_noise_p1_is_exactly_full_fake_quantization(p: float | Tensor) -> None:
    w = off_grid_weight(10_000, 4)
    assert torch.equal(scalar_noise(w, p, 4), fake_quantize_affine(w, 4))


def test_scalar_noise_fraction_and_values() -> None:
    torch.manual_seed(0)
    w = off_grid_weight(100_000, 4)
    fq = fake_quantize_affine(w, 4)
    out = scalar_noise(w, 0.3, 4)
    changed = out != w
    assert within_sigmas(int(changed.sum()), w.numel(), 0.3)
    # Noised entries take the level computed from the whole tensor; the others are untouched.
    assert torch.equal(out[changed], fq[changed])


def test_scalar_noise_gradient_is_identity_and_input_untouched() -> None:
    w = off_grid_weight(1000, 3).requires_grad_()
    before, version = w.detach().clone(), w._version
    g = torch.randn(1000, dtype=torch.float64)
    (scalar_noise(w, torch.tensor(0.5), 3) * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert torch.equal(w.detach(), before) and w._version == version


def test_scalar_noise_masks_are_fresh_and_reproducible() -> None:
    w = off_grid_weight(1000, 4)
    assert not torch.equal(scalar_noise(w, 0.5, 4), scalar_noise(w, 0.5, 4))
    first = scalar_noise(w, 0.5, 4, generator=torch.Generator().manual_seed(123))
    again = scalar_noise(w, 0.5, 4, generator=torch.Generator().manual_seed(123))
    other = scalar_noise(w, 0.5, 4, generator=torch.Generator().manual_seed(124))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.5"])
def test_scalar_noise_rejects_bad_rate(p: object) -> None:
    with pytest.raises(ValueError, match=r"`p` must be a number in \[0, 1\]"):
        scalar_noise(torch.randn(4), p, 4)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- block noise


def test_block_noise_linear_blocks_fraction_and_scale() -> None:
    torch.manual_seed(0)
    w = torch.rand(512, 1024, dtype=torch.float64) + 0.5  # no zeros: a zero in the output means "dropped"
    out = block_noise(w, 0.25, 8)
    blocks = out.view(512, 128, 8)
    dropped = (blocks == 0).all(-1)
    # The zero pattern is made of whole blocks of 8 consecutive input features.
    assert torch.equal((blocks == 0).any(-1), dropped)
    assert within_sigmas(int(dropped.sum()), dropped.numel(), 0.25)
    kept = ~dropped.repeat_interleave(8, dim=1)
    assert torch.equal(out[kept], w[kept] / (1 - 0.25))


def test_block_noise_mean_over_draws_is_the_weight() -> None:
    torch.manual_seed(1)
    p, n = 0.25, 4000
    w = torch.randn(4, 16, dtype=torch.float64)
    mean = torch.stack([block_noise(w, p, 4) for _ in range(n)]).mean(0)
    tolerance = 5 * w.abs() * math.sqrt(p / ((1 - p) * n))
    assert ((mean - w).abs() <= tolerance).all()


@pytest.mark.parametrize("shape", [(64, 32, 3), (64, 32, 3, 3), (16, 32, 3, 3, 3), (64, 32, 1, 3)])
def test_block_noise_conv_kernel_is_one_block(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    w = torch.rand(shape, dtype=torch.float64) + 0.5
    # block_size 5 divides nothing here: kernels larger than one element are whole blocks, block_size is unused.
    out = block_noise(w, 0.3, 5)
    kernels = out.reshape(shape[0], shape[1], -1)
    dropped = (kernels == 0).all(-1)
    assert torch.equal((kernels == 0).any(-1), dropped)
    assert within_sigmas(int(dropped.sum()), dropped.numel(), 0.3)
    assert torch.equal(kernels[~dropped], w.reshape(shape[0], shape[1], -1)[~dropped] / 0.7)


@pytest.mark.parametrize("shape", [(32, 64, 1, 1), (32, 64, 1), (32, 64, 1, 1, 1)])
def test_block_noise_pointwise_conv_blocks_of_input_channels(shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    w = torch.rand(shape, dtype=torch.float64) + 0.5
    out = block_noise(w, 0.5, 8)
    blocks = out.reshape(32, 8, 8)
    dropped = (blocks == 0).all(-1)
    assert torch.equal((blocks == 0).any(-1), dropped)
    # Blocks are finer than a whole row: some output channel keeps some input-channel blocks and drops others.
    assert (dropped.any(-1) & ~dropped.all(-1)).any()
    assert within_sigmas(int(dropped.sum()), dropped.numel(), 0.5)


def test_block_noise_endpoints() -> None:
    w = torch.randn(8, 16, dtype=torch.float64)
    assert torch.equal(block_noise(w, 0.0, 4), w)
    assert torch.equal(block_noise(w, torch.tensor(0.0), 4), w)
    # p = 1 drops everything: defined as zeros (not 0/0 = NaN).
    for p in (1.0, torch.tensor(1.0)):
        assert torch.equal(block_noise(w, p, 4), torch.zeros_like(w))


def test_block_noise_gradient_is_identity_and_input_untouched() -> None:
    w = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    before, version = w.detach().clone(), w._version
    g = torch.randn(8, 16, dtype=torch.float64)
    (block_noise(w, 0.5, 4) * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert torch.equal(w.detach(), before) and w._version == version


def test_block_noise_masks_are_fresh_and_reproducible() -> None:
    w = torch.randn(32, 64, dtype=torch.float64)
    assert not torch.equal(block_noise(w, 0.5, 8), block_noise(w, 0.5, 8))
    first = block_noise(w, 0.5, 8, generator=torch.Generator().manual_seed(5))
    again = block_noise(w, 0.5, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    ("shape", "features"), [((4, 10), "10 input features"), ((8, 6, 1, 1), r"6 input channels \(per group\)")]
)
def test_block_noise_block_size_must_divide_features(shape: tuple[int, ...], features: str) -> None:
    with pytest.raises(ValueError, match=f"block_size=4 does not divide the {features} of layer 'encoder.fc1'"):
        block_noise(torch.randn(shape), 0.1, 4, name="encoder.fc1")


def test_block_shape_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`block_size` must be an int >= 1"):
        block_shape((4, 8), 0)
    with pytest.raises(ValueError, match="at least 2 dimensions; layer 'bias'"):
        block_shape((8,), 4, name="bias")
    assert block_shape((4, 8), 4) == (4, 2)
    assert block_shape((4, 8, 3, 3), 3) == (4, 8)


# ------------------------------------------------------------------------------------------------ QuantNoiseWeight


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, "`bits` must be an int in 1..16, got 0"),
        ({"bits": 17}, "`bits`"),
        ({"bits": 4.0}, "`bits`"),
        ({"p": -0.1}, r"`p` must be a number in \[0, 1\], got -0.1"),
        ({"p": 1.5}, "`p`"),
        ({"p": True}, "`p`"),
        ({"mode": "vector"}, r"`mode` must be one of \['scalar', 'block'\], got 'vector'"),
        ({"block_size": 0}, "`block_size` must be an int >= 1, got 0"),
        ({"block_size": 2.5}, "`block_size`"),
        ({"block_size": True}, "`block_size`"),
        ({"mode": "block", "p": 1.0}, r"\[0, 1\) for mode='block'"),
    ],
)
def test_module_validates_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantNoiseWeight(**kwargs)


def test_module_rate_is_a_buffer_set_in_place() -> None:
    q = QuantNoiseWeight(bits=4, p=0.1, mode="scalar")
    buffer = q.p
    assert buffer.dim() == 0 and buffer.dtype == torch.float32 and float(buffer) == pytest.approx(0.1)
    q.set_p(1.0)
    assert q.p is buffer and float(q.p) == 1.0
    assert torch.equal(q.state_dict()["p"], torch.tensor(1.0))
    with pytest.raises(ValueError, match="`p`"):
        q.set_p(1.2)
    block = QuantNoiseWeight(mode="block", p=0.1)
    with pytest.raises(ValueError, match="mode='block'"):
        block.set_p(1.0)
    assert float(block.p) == pytest.approx(0.1)
    restored = QuantNoiseWeight(bits=4, p=0.0)
    restored.load_state_dict(q.state_dict())
    assert float(restored.p) == 1.0


def test_module_extra_repr() -> None:
    text = repr(QuantNoiseWeight(bits=3, p=0.25, mode="block", block_size=4))
    assert "bits=3, p=0.25, mode='block', block_size=4" in text


def test_check_layer() -> None:
    block = QuantNoiseWeight(mode="block", p=0.1, block_size=4)
    with pytest.raises(ValueError, match="block_size=4 does not divide the 10 input features of layer 'head'"):
        block.check_layer(nn.Linear(10, 3), "head")
    with pytest.raises(ValueError, match="the 6 input features of layer 'embed'"):
        block.check_layer(nn.Embedding(5, 6), "embed")
    with pytest.raises(ValueError, match="the 6 input channels .* of layer 'proj'"):
        block.check_layer(nn.Conv2d(6, 8, 1), "proj")
    with pytest.raises(ValueError, match="layer 'act' \\(ReLU\\) has none"):
        block.check_layer(nn.ReLU(), "act")
    block.check_layer(nn.Linear(12, 3), "ok")
    block.check_layer(nn.Conv2d(3, 8, 3), "stem")  # whole 3x3 kernels are the blocks
    QuantNoiseWeight(mode="scalar", block_size=4).check_layer(nn.Linear(10, 3), "scalar_ok")


@pytest.mark.parametrize("mode", ["scalar", "block"])
def test_training_forwards_never_change_the_stored_weight(mode: str) -> None:
    torch.manual_seed(4)
    layer = swap_layer(nn.Linear(32, 16).double(), QuantNoiseWeight(bits=2, p=0.5, mode=mode, block_size=8))
    layer.train()
    stored, version = layer.weight.detach().clone(), layer.weight._version
    x = torch.randn(5, 32, dtype=torch.float64)
    for _ in range(50):
        layer(x).square().sum().backward()  # gradients accumulate, no optimizer step
    assert torch.equal(layer.weight.detach(), stored)
    assert layer.weight._version == version


@pytest.mark.parametrize("mode", ["scalar", "block"])
def test_layer_gradient_is_straight_through(mode: str) -> None:
    layer = swap_layer(nn.Linear(32, 16).double(), QuantNoiseWeight(bits=2, p=0.5, mode=mode, block_size=8))
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.manual_seed(11)
    noisy = layer.weight_quantizer(layer.weight).detach()
    torch.manual_seed(11)  # the same draw again, inside the layer's forward
    layer(x).square().sum().backward()
    # Reference: a float layer whose weight is the noisy one; STE hands its weight gradient to the stored weight.
    reference = noisy.clone().requires_grad_()
    F.linear(x, reference, layer.bias.detach()).square().sum().backward()
    assert not torch.equal(noisy, layer.weight.detach())  # the noise did something
    assert torch.equal(layer.weight.grad, reference.grad)


def test_evaluation_scalar_quantizes_the_whole_weight() -> None:
    layer = swap_layer(nn.Linear(64, 32).double(), QuantNoiseWeight(bits=4, p=0.0, mode="scalar"))
    layer.eval()
    x = torch.randn(3, 64, dtype=torch.float64)
    used = layer.weight_quantizer(layer.weight)
    # p = 0 still quantizes everything at evaluation, with 2**4 levels.
    assert torch.equal(used, fake_quantize_affine(layer.weight, 4))
    assert used.unique().numel() <= 16
    assert torch.equal(layer(x), F.linear(x, used, layer.bias))


def test_evaluation_block_leaves_the_weight() -> None:
    layer = swap_layer(nn.Linear(64, 32), QuantNoiseWeight(p=0.5, mode="block", block_size=8))
    layer.eval()
    assert layer.weight_quantizer(layer.weight) is layer.weight
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("mode", ["scalar", "block"])
def test_module_masks_fresh_and_seeded(mode: str) -> None:
    q = QuantNoiseWeight(bits=4, p=0.5, mode=mode, block_size=8)
    w = off_grid_weight(64 * 64, 4).view(64, 64)
    assert not torch.equal(q(w), q(w))
    torch.manual_seed(9)
    first = q(w)
    torch.manual_seed(9)
    assert torch.equal(q(w), first)


@pytest.mark.parametrize(
    ("make_layer", "input_shape"),
    [
        (lambda: nn.Embedding(10, 16), None),
        (lambda: nn.Conv1d(16, 4, 1), (2, 16, 7)),
        (lambda: nn.Conv2d(8, 4, 3), (2, 8, 6, 6)),
        (lambda: nn.Conv3d(2, 4, 3), (2, 2, 5, 5, 5)),
    ],
    ids=["embedding", "conv1d_1x1", "conv2d_3x3", "conv3d_3x3x3"],
)
@pytest.mark.parametrize("mode", ["scalar", "block"])
def test_module_in_every_layer_wrapper(make_layer: object, input_shape: tuple[int, ...] | None, mode: str) -> None:
    layer = make_layer()  # type: ignore[operator]
    q = QuantNoiseWeight(bits=4, p=0.5, mode=mode, block_size=8)
    q.check_layer(layer, "layer")
    x = torch.randint(0, 10, (2, 5)) if input_shape is None else torch.randn(input_shape)
    float_out = layer(x).detach()
    twin = swap_layer(layer, q)
    assert twin is layer  # swapped in place
    stored = layer.weight.detach().clone()
    out = twin(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert not torch.equal(out, float_out)  # the noised weight was used
    assert layer.weight.grad is not None and torch.equal(layer.weight.detach(), stored)


def test_compiled_forward_reads_the_rate_buffer_without_recompiling() -> None:
    compiles = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    q = QuantNoiseWeight(bits=4, p=0.0, mode="scalar")
    compiled = torch.compile(q, backend=counting_backend, fullgraph=True)  # fullgraph: no .item(), no value branch
    w = off_grid_weight(1000, 4)
    assert torch.equal(compiled(w), w)
    q.set_p(1.0)
    assert torch.equal(compiled(w), fake_quantize_affine(w, 4))
    assert len(compiles) == 1
    torch._dynamo.reset()
