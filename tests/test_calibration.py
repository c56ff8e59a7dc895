"""Clip estimators (lightning_quant.calibration) on distributions whose optimum is known in closed form or by a
brute-force float64 search written out here."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_quant.calibration import (
    CLIP_ESTIMATORS,
    DEFAULT_PERCENTILE,
    MIN_CLIP,
    get_clip_estimator,
    max_clip,
    mse_clip,
    mse_clip_per_channel,
    percentile_clip,
)

F64 = torch.float64


def quantize_unsigned(x: Tensor, c: Tensor | float, bits: int) -> Tensor:
    levels = 2**bits - 1
    return torch.round(torch.minimum(x.clamp_min(0), torch.as_tensor(c, dtype=x.dtype)) * levels / c) * c / levels


def quantize_signed(x: Tensor, c: Tensor | float, bits: int, narrow: bool = False) -> Tensor:
    qp = 2 ** (bits - 1) - 1
    qn = qp if narrow else qp + 1
    s = c / qp
    return torch.round(torch.clamp(x / s, -qn, qp)) * s


def mse(x: Tensor, c: float, bits: int, signed: bool, narrow: bool = False) -> float:
    q = quantize_signed(x, c, bits, narrow) if signed else quantize_unsigned(x, c, bits)
    return (q - x).square().mean().item()


def brute_force(x: Tensor, bits: int, signed: bool, narrow: bool = False, points: int = 6000) -> tuple[float, float]:
    """The best clip on a fine float64 grid over (0, 1.2 max|x|], and its error."""
    clips = (torch.linspace(1, points, points, dtype=F64) / points * 1.2 * x.abs().max())[:, None]
    q = quantize_signed(x[None], clips, bits, narrow) if signed else quantize_unsigned(x[None], clips, bits)
    errs = (q - x[None]).square().mean(dim=1)
    i = int(errs.argmin())
    return clips[i].item(), errs[i].item()


# 99 values at 1 and one at 10: a small bulk and one outlier.
OUTLIER = torch.tensor([1.0] * 99 + [10.0], dtype=F64)


# ------------------------------------------------------------------------------------------------ closed forms


def test_mse_unsigned_two_point_closed_form() -> None:
    # 2 bits unsigned: levels {0, c/3, 2c/3, c}. For 2 <= c <= 6 the 1s sit on c/3 and the 10 is clipped to c, so
    # the error is 0.99 (1 - c/3)**2 + 0.01 (10 - c)**2, least at c = sum(a x) / sum(a**2) with a = 1/3 (x 99)
    # and 1 (x 1): c = (33 + 10) / (11 + 1) = 43/12, error 0.449167. The other pieces are worse: 1s on 2c/3
    # (1.2 <= c <= 2) best 0.706 at c = 76/45; 1s on c (c <= 1.2) best 0.8019 at 1.09; 1s on 0 (c >= 6) at least 0.99.
    c = mse_clip(OUTLIER, 2)
    assert c.dtype == F64 and c.shape == ()
    assert c.item() == pytest.approx(43 / 12, rel=1e-12)
    assert mse(OUTLIER, c.item(), 2, False) == pytest.approx(0.99 * (1 - 43 / 36) ** 2 + 0.01 * (10 - 43 / 12) ** 2)
    # 1 bit: levels {0, c}; for c <= 2 the error is 0.99 (1 - c)**2 + 0.01 (10 - c)**2, least at c = 1.09
    # (error 0.8019); for c > 2 the 1s go to 0 (error >= 0.99).
    assert mse_clip(OUTLIER, 1).item() == pytest.approx(1.09, rel=1e-12)


def test_mse_signed_two_point_closed_form() -> None:
    x = -OUTLIER  # 99 at -1, one at -10
    # Ternary (2 bits narrow, {-1, 0, 1} c): the -1s on -c for c <= 2, -10 clipped to -c: c = (99 + 10) / 100.
    assert mse_clip(x, 2, signed=True, narrow=True).item() == pytest.approx(1.09, rel=1e-12)
    # Full 2 bits ({-2, -1, 0, 1} c): -1s on -c (c <= 2), -10 on -2c (c <= 5): c = (99 + 2 * 10) / (99 + 4).
    assert mse_clip(x, 2, signed=True).item() == pytest.approx(119 / 103, rel=1e-12)


def test_mse_exact_grid_gives_zero_error() -> None:
    # {0, 1, 2, 3} on 2 bits: c = 3 puts every value on a level; no other c <= 3 does (3 = j c / 3 needs c = 9 / j).
    x = torch.tensor([0.0, 1.0, 2.0, 3.0] * 5, dtype=F64)
    assert mse_clip(x, 2).item() == 3.0
    # Signed 3 bits {-4..3} s: values -4..3 with s = 1 -> c = Qp s = 3.
    assert mse_clip(torch.arange(-4.0, 4.0, dtype=F64), 3, signed=True).item() == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize(
    "bits,signed,narrow", [(2, False, False), (3, False, False), (2, True, False), (3, True, True)]
)
def test_mse_zero_to_ten_against_brute_force(bits: int, signed: bool, narrow: bool) -> None:
    x = torch.arange(11, dtype=F64)  # {0, 1, ..., 10}
    if signed:
        x = torch.cat([x, -x])
    c = mse_clip(x, bits, signed=signed, narrow=narrow).item()
    best_c, best_err = brute_force(x, bits, signed, narrow)
    assert mse(x, c, bits, signed, narrow) <= best_err * (1 + 1e-12)
    if bits == 2 and not signed or bits == 3 and narrow:
        # Levels 0, 3, 6, 9 (on each side for the narrow 3-bit grid, Qp = 3): codes over 3 of 1..10 are
        # a = 0, 1/3 x3, 2/3 x3, 1 x3, so c = sum(a x) / sum(a**2) = 42 / (14/3) = 9, and each of 1, 2, 4, 5, 7, 8, 10
        # is 1 away from its level: error 7 / 11 (7 / 11 again signed, both halves alike).
        assert c == pytest.approx(9.0, rel=1e-12)
        assert mse(x, c, bits, signed, narrow) == pytest.approx(7 / 11, rel=1e-12)


def test_mse_gaussian_against_brute_force() -> None:
    x = torch.randn(2000, dtype=F64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4):
        c = mse_clip(x, bits, signed=True).item()
        best_c, best_err = brute_force(x, bits, True, points=2000)
        assert mse(x, c, bits, True) <= best_err * (1 + 1e-12)
        assert c == pytest.approx(best_c, rel=2e-3)
    # Unsigned after a ReLU: negatives go to 0 whatever the clip.
    relu = x.clamp_min(0)
    c = mse_clip(x, 3).item()
    assert c == pytest.approx(mse_clip(relu, 3).item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ robustness


def test_mse_ignores_non_finite_values() -> None:
    x = torch.cat([OUTLIER, torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=F64)])
    assert mse_clip(x, 2).item() == pytest.approx(43 / 12, rel=1e-12)
    assert max_clip(x).item() == 10.0
    assert percentile_clip(x, 100).item() == 10.0


def test_degenerate_inputs_give_min_clip() -> None:
    for x in (torch.zeros(10), -torch.ones(10), torch.tensor([float("nan")]), torch.zeros(0)):
        assert mse_clip(x, 4).item() == MIN_CLIP
        assert max_clip(x).item() == MIN_CLIP
        assert percentile_clip(x, 99.0).item() == MIN_CLIP
    assert mse_clip(torch.zeros(10), 4, signed=True).item() == MIN_CLIP
    assert mse_clip(-torch.ones(10), 4, signed=True).item() > 0.5  # signed: negatives count
    w = torch.randn(3, 8)
    w[1] = 0
    clips = mse_clip_per_channel(w, 4)
    assert clips[1].item() == MIN_CLIP and bool((clips[[0, 2]] > 0.1).all())


def test_subsampling_is_deterministic_and_close() -> None:
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1))
    a = mse_clip(x, 4, signed=True, max_samples=5000)
    b = mse_clip(x.clone(), 4, signed=True, max_samples=5000)
    full = mse_clip(x, 4, signed=True)
    assert a.item() == b.item()
    assert a.item() != full.item()  # the sample was used
    assert a.item() == pytest.approx(full.item(), rel=0.05)
    assert x.dtype == torch.float32 and a.dtype == F64


def test_per_channel_matches_per_tensor_on_each_channel() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 40, dtype=F64, generator=g) * torch.tensor([0.01, 0.1, 1.0], dtype=F64)[None, :, None]
    for signed in (True, False):
        clips = mse_clip_per_channel(w, 3, axis=1, signed=signed)
        assert clips.shape == (3,) and clips.dtype == F64
        for c in range(3):
            one = mse_clip(w[:, c], 3, signed=signed)
            assert clips[c].item() == pytest.approx(one.item(), rel=1e-9)
    assert torch.equal(mse_clip_per_channel(w, 3, axis=-2), mse_clip_per_channel(w, 3, axis=1))


# ------------------------------------------------------------------------------------------------ percentile, max


def test_percentile_and_max() -> None:
    x = torch.arange(101, dtype=F64)  # 0..100: the q-th percentile is q
    assert percentile_clip(x, 50).item() == 50.0
    assert percentile_clip(x, 99.5).item() == pytest.approx(99.5)
    assert percentile_clip(x, 100).item() == 100.0
    assert max_clip(x).item() == 100.0
    y = torch.tensor([-7.0, 1.0, 3.0], dtype=F64)
    assert max_clip(y).item() == 3.0  # unsigned: the largest value
    assert max_clip(y, signed=True).item() == 7.0  # signed: the largest magnitude
    # unsigned: negatives count as 0, so the median of {0, 1, 3} is 1; signed: median of {7, 1, 3} is 3.
    assert percentile_clip(y, 50).item() == 1.0
    assert percentile_clip(y, 50, signed=True).item() == 3.0


def test_estimators_by_name() -> None:
    assert set(CLIP_ESTIMATORS) == {"mse", "percentile", "max"}
    x = torch.arange(10001, dtype=F64) / 100  # 0..100
    assert get_clip_estimator("mse")(OUTLIER, 2, False).item() == pytest.approx(43 / 12, rel=1e-12)
    assert get_clip_estimator("max")(x, 4, False).item() == 100.0
    assert get_clip_estimator("percentile")(x, 4, False).item() == pytest.approx(DEFAULT_PERCENTILE, rel=1e-12)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument() -> None:
    x = torch.ones(4)
    with pytest.raises(ValueError, match=r"`calibration` must be one of \['max', 'mse', 'percentile'\], got 'minmax'"):
        get_clip_estimator("minmax")
    for q in (0, -1, 100.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"`q` must be a number in \(0, 100\]"):
            percentile_clip(x, q)
    with pytest.raises(ValueError, match="`bits`.*1..16"):
        mse_clip(x, 0)
    with pytest.raises(ValueError, match="`bits`.*2..16"):
        mse_clip(x, 1, signed=True)
    with pytest.raises(ValueError, match="`bits`"):
        mse_clip_per_channel(torch.ones(2, 2), 17)
    with pytest.raises(ValueError, match="`max_samples`"):
        mse_clip(x, 4, max_samples=0)
    with pytest.raises(ValueError, match=r"`axis`.*\[-2, 1\].*got 2"):
        mse_clip_per_channel(torch.ones(2, 2), 4, axis=2)
