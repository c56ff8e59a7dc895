"""Clips calibrated from the user's own training data, in real Trainer runs: what the first steps' forwards use,
averaging over several batches, no recalibration on resume, bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import ToyNet, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quant import DSQCallback, PACTCallback
from lightning_quant.calibration import mse_clip, percentile_clip


class ClipsInForward(L.Callback):
    """Records, at each training forward of ``relu`` (after the calibrator's hook), its input and clip."""

    def __init__(self, attr: str = "alpha") -> None:
        self.attr = attr
        self.seen: list[tuple[torch.Tensor, float]] = []

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args):
            if module.training:
                self.seen.append((args[0].detach().clone(), float(getattr(module, self.attr).detach()[0])))

        self.handle = pl_module.relu.register_forward_pre_hook(hook)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


@pytest.mark.parametrize(("calibration", "estimate"), [("mse", None), ("percentile", 99.99)])
def test_first_forward_runs_on_the_clip_fitted_to_its_own_batch(tmp_path, toy_net, calibration, estimate):
    record = ClipsInForward()
    cb = PACTCallback(act_bits=3, first_last="quantize", calibration=calibration, verbose=False)
    make_trainer(tmp_path, [cb, record], max_steps=2).fit(toy_net)
    x0, alpha0 = record.seen[0]
    expected = mse_clip(x0, 3) if estimate is None else percentile_clip(x0, estimate)
    assert alpha0 == pytest.approx(float(expected), rel=1e-6)
    assert bool(toy_net.relu.calibrated.all())


def test_several_batches_average_their_estimates_then_training_takes_over(tmp_path, toy_net):
    record = ClipsInForward("upper")
    cb = DSQCallback(act_bits=2, first_last="quantize", calibration_batches=3, verbose=False)
    make_trainer(tmp_path, [cb, record], max_steps=5).fit(toy_net)
    estimates = [float(mse_clip(x, 2)) for x, _ in record.seen[:3]]
    for k in range(3):  # forward k uses the mean of the estimates of batches 0..k
        assert record.seen[k][1] == pytest.approx(sum(estimates[: k + 1]) / (k + 1), rel=1e-6), k
    assert len(record.seen) == 5
    assert bool(toy_net.relu.calibrated.all()) and cb._calibrator is None


def test_resumed_run_does_not_calibrate_again(tmp_path):
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = ToyNet()
    make_trainer(
        tmp_path, [PACTCallback(first_last="quantize", verbose=False), ckpt], max_epochs=1, enable_checkpointing=True
    ).fit(first)
    saved_alpha = float(first.relu.alpha)
    record = ClipsInForward()
    resumed = ToyNet()
    trainer = make_trainer(tmp_path, [PACTCallback(first_last="quantize", verbose=False), record], max_epochs=2)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert record.seen[0][1] == saved_alpha  # the checkpoint's clip, not a new estimate
    assert record.seen[0][1] != pytest.approx(float(mse_clip(record.seen[0][0], 4)), rel=1e-3)


def test_fixed_alpha_init_is_not_calibrated(tmp_path, toy_net):
    record = ClipsInForward()
    make_trainer(
        tmp_path, [PACTCallback(alpha_init=10.0, first_last="quantize", verbose=False), record], max_steps=1
    ).fit(toy_net)
    assert record.seen[0][1] == 10.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(calibration_batches=0), r"`calibration_batches` must be an int >= 1.*got 0"),
        (dict(calibration_batches=1.5), r"`calibration_batches` must be an int >= 1.*got 1.5"),
        (dict(calibration="median"), r"`calibration` must be one of .*got 'median'"),
        (dict(weight_quantizer="lsq2"), r"`weight_quantizer` must be one of \('lsq', 'dorefa'\), got 'lsq2'"),
        (dict(per_channel=True, weight_quantizer="dorefa"), r"`per_channel=True` needs `weight_quantizer='lsq'`"),
        (dict(weight_bits=1), r"`weight_bits` must be at least 2 with `weight_quantizer='lsq'`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PACTCallback(**kwargs)


def test_per_channel_steps_one_per_output_channel(tmp_path, toy_net):
    cb = PACTCallback(per_channel=True, first_last="quantize", verbose=False)
    make_trainer(tmp_path, [cb], max_steps=1).fit(toy_net)
    assert toy_net.head.weight_quantizer.step.shape == (3,)
    assert toy_net.backbone[0].weight_quantizer.step.shape == (16,)
