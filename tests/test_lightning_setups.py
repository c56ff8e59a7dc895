"""The setups Lightning users run: step-counted schedules, exact resume, other callbacks, frozen layers, weights-only
checkpoints, argument forms. Real Trainer runs, real checkpoints on disk, Lightning's own callbacks."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from conftest import ToyNet, make_trainer
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EMAWeightAveraging,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
)

from lightning_quant import DSQCallback, PACTCallback, QuantNoiseCallback, load_from_checkpoint
from lightning_quant.schedules import CosineSchedule, LinearSchedule


class ValuesInForward(L.Callback):
    """Records, at every training forward of one quantizer module, the value it reads there, by optimizer step.

    Args:
        module: Dotted name of the quantizer module (it exists once the quantization callback has injected).
        attr: The buffer the forward reads (``p`` for QuantNoise, ``temperature`` for DSQ).
    """

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr
        self.seen: dict[int, list[float]] = {}
        self._handle = None

    def on_fit_start(self, trainer, pl_module):
        target = pl_module.get_submodule(self.module)

        def hook(module, args):
            if module.training:
                value = float(getattr(module, self.attr).detach().flatten()[0])
                self.seen.setdefault(trainer.global_step, []).append(value)

        self._handle = target.register_forward_pre_hook(hook)

    def on_fit_end(self, trainer, pl_module):
        self._handle.remove()

    def per_step(self) -> dict[int, float]:
        for step, values in self.seen.items():
            assert len(set(values)) == 1, f"step {step} saw several values {values}"
        return {step: values[0] for step, values in self.seen.items()}


NOISE = "backbone.0.weight_quantizer"  # QuantNoise covers every Linear by default
DSQ_SITE = "backbone.1"


# ------------------------------------------------------------------------------------------ 1. step-counted runs
@pytest.mark.parametrize(
    ("bounds", "total"),
    [
        (dict(max_steps=20, max_epochs=-1), 20),  # transformer-style: steps only
        (dict(max_epochs=1), 6),  # one epoch of 6 batches moves too
        (dict(max_epochs=3, max_steps=10), 10),  # both: the first to end the run decides
        (dict(max_epochs=2, limit_train_batches=3), 6),
        (dict(max_epochs=2, accumulate_grad_batches=2), 6),  # 3 optimizer steps per epoch, 2 batches each
    ],
    ids=["max_steps", "one_epoch", "epochs_and_steps", "limit_batches", "accumulate"],
)
def test_schedule_moves_over_the_whole_run_however_it_is_bounded(tmp_path, toy_net, bounds, total):
    record = ValuesInForward(NOISE, "p")
    cb = QuantNoiseCallback(bits=4, p=LinearSchedule(0.0, 1.0), verbose=False)
    make_trainer(tmp_path, [cb, record], **bounds).fit(toy_net)
    values = record.per_step()
    assert sorted(values) == list(range(total))
    for step, p in values.items():
        assert p == pytest.approx(step / (total - 1), abs=1e-7), step  # start at step 0, end at the last step


def test_dsq_temperature_follows_the_step_schedule(tmp_path, toy_net):
    schedule = CosineSchedule(0.4, 0.05)
    record = ValuesInForward(DSQ_SITE, "temperature")
    cb = DSQCallback(temperature=schedule, first_last="quantize", verbose=False)
    make_trainer(tmp_path, [cb, record], max_steps=12, max_epochs=-1).fit(toy_net)
    values = record.per_step()
    assert sorted(values) == list(range(12))
    for step, t in values.items():
        expected = 0.05 + (0.4 - 0.05) * 0.5 * (1 + math.cos(math.pi * step / 11))
        assert t == pytest.approx(expected, rel=1e-6), step


def test_epoch_mode_counts_the_epochs_max_steps_allows(tmp_path, toy_net):
    record = ValuesInForward(NOISE, "p")
    cb = QuantNoiseCallback(p=LinearSchedule(0.2, 0.8), schedule_by="epoch", verbose=False)
    make_trainer(tmp_path, [cb, record], max_epochs=-1, max_steps=9).fit(toy_net)  # 6 batches/epoch: 2 epochs
    values = record.per_step()
    assert sorted(values) == list(range(9))
    assert [values[s] for s in range(9)] == pytest.approx([0.2] * 6 + [0.8] * 3)


def test_run_bounded_by_max_time_alone_is_refused_before_any_step(tmp_path, toy_net):
    before = copy.deepcopy(toy_net.state_dict())
    record = ValuesInForward(NOISE, "p")
    cb = QuantNoiseCallback(p=LinearSchedule(0.0, 1.0), verbose=False)
    trainer = make_trainer(tmp_path, [cb, record], max_epochs=None, max_time={"seconds": 30})
    with pytest.raises(ValueError, match=r"max_time.*Set `max_steps` or `max_epochs`"):
        trainer.fit(toy_net)
    assert record.seen == {}
    for key, value in before.items():
        assert torch.equal(toy_net.state_dict()[key], value), key
    # A constant rate needs no length: the same run trains.
    make_trainer(
        tmp_path, [QuantNoiseCallback(p=0.3, verbose=False)], max_epochs=None, max_time={"seconds": 1}, max_steps=3
    ).fit(ToyNet())


# ------------------------------------------------------------------------------------------------ 2. resume
class StopAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _scheduled_run(tmp_path, method: str, ckpt_path=None, stop_at=None, every_n_train_steps=None):
    torch.manual_seed(0)
    if method == "quant_noise":
        cb, record = QuantNoiseCallback(p=LinearSchedule(0.0, 0.9), verbose=False), ValuesInForward(NOISE, "p")
    else:
        cb = DSQCallback(temperature=LinearSchedule(0.4, 0.05), first_last="quantize", verbose=False)
        record = ValuesInForward(DSQ_SITE, "temperature")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_train_steps=every_n_train_steps)
    callbacks = [cb, record, ckpt] + ([StopAtStep(stop_at)] if stop_at else [])
    trainer = make_trainer(tmp_path, callbacks, max_epochs=4, enable_checkpointing=True)
    model = ToyNet()
    trainer.fit(model, ckpt_path=ckpt_path)
    return record.per_step(), model


@pytest.mark.parametrize("method", ["quant_noise", "dsq"])
@pytest.mark.parametrize("where", ["end_of_epoch", "mid_epoch"])
def test_resumed_run_uses_the_uninterrupted_runs_value_at_every_step(tmp_path, method, where):
    full, _ = _scheduled_run(tmp_path / "full", method)
    assert sorted(full) == list(range(24)) and len(set(full.values())) == 24  # 4 epochs x 6 steps, all different
    if where == "end_of_epoch":  # stopped after epoch 1 (step 12): the last checkpoint is at the epoch's end
        first, _ = _scheduled_run(tmp_path / "part", method, stop_at=12)
        path = tmp_path / "part" / "last.ckpt"
        resume_from = 12
    else:  # a checkpoint written at step 8, in the middle of epoch 1
        first, _ = _scheduled_run(tmp_path / "part", method, stop_at=10, every_n_train_steps=8)
        path = next((tmp_path / "part").glob("*step=8*.ckpt"))
        resume_from = 8
    resumed, _ = _scheduled_run(tmp_path / "resumed", method, ckpt_path=str(path))
    assert min(resumed) == resume_from and max(resumed) == 23
    for step, value in resumed.items():
        assert value == full[step], (step, value, full[step])  # exactly the uninterrupted run's value
    assert resumed[resume_from] != full[0]


# ------------------------------------------------------------------------------------------- 3. other callbacks
@pytest.mark.parametrize("first", ["quant", "other"])
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_weight_averaging_works_in_either_order(tmp_path, toy_net, first, kind):
    quant = PACTCallback(alpha_init=3.0, first_last="quantize", verbose=False)
    if kind == "swa":
        other = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    else:
        other = EMAWeightAveraging(decay=0.5)
    callbacks = [quant, other] if first == "quant" else [other, quant]
    make_trainer(tmp_path, callbacks, max_epochs=3).fit(toy_net)  # averaging runs from epoch 1 (SWA) / step 1 (EMA)
    averaged = other._average_model.module if kind == "ema" else other._average_model
    alphas = {n: p for n, p in averaged.named_parameters() if n.endswith("alpha")}
    assert set(alphas) == {"backbone.1.alpha", "relu.alpha"}  # the average holds the quantizers
    # At the end the averaged values were copied into the model, alphas included.
    for name, p in alphas.items():
        assert torch.equal(toy_net.get_parameter(name).detach(), p.detach().to(torch.float32)), name


@pytest.mark.parametrize("first", ["quant", "other"])
def test_pruning_keeps_pruned_weights_exactly_zero_once_quantized(tmp_path, toy_net, first):
    quant = QuantNoiseCallback(bits=4, p=0.5, verbose=False)  # a scalar grid through zero
    pruning = ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False, verbose=0)
    callbacks = [quant, pruning] if first == "quant" else [pruning, quant]
    make_trainer(tmp_path, callbacks, max_epochs=2).fit(toy_net)
    toy_net.eval()
    for name in ("backbone.0", "backbone.2", "head"):
        layer = toy_net.get_submodule(name)
        zeros = layer.weight == 0
        assert zeros.float().mean() >= 0.5, name  # pruned (and made permanent at the end of training)
        quantized = layer.weight_quantizer(layer.weight)
        assert torch.equal(quantized[zeros], torch.zeros_like(quantized[zeros])), name
        assert quantized[~zeros].abs().min() > 0, name


@pytest.mark.parametrize("first", ["quant", "other"])
def test_pruning_with_a_weight_quantizer_without_zero_is_refused_before_any_step(tmp_path, toy_net, first):
    before = copy.deepcopy(toy_net.state_dict())
    quant = PACTCallback(weight_quantizer="dorefa", verbose=False)  # the paper's weights: no zero level
    pruning = ModelPruning("l1_unstructured", amount=0.5)
    callbacks = [quant, pruning] if first == "quant" else [pruning, quant]
    with pytest.raises(ValueError, match=r"ModelPruning with PACTCallback.*DoReFaWeight.*no zero level"):
        make_trainer(tmp_path, callbacks).fit(toy_net)
    for key, value in before.items():
        if key in toy_net.state_dict():
            assert torch.equal(toy_net.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------- 4. frozen layers
def test_backbone_frozen_by_the_user_keeps_frozen_clips(tmp_path):
    torch.manual_seed(0)
    model = ToyNet(freeze_backbone=True)
    snapshot = {}

    class Snapshot(L.Callback):  # after the first batch, which calibrated every range (frozen ones too)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                snapshot["backbone"] = copy.deepcopy(pl_module.backbone)

    cb = PACTCallback(alpha_init=0.25, first_last="quantize", verbose=False)
    make_trainer(tmp_path, [cb, Snapshot()]).fit(model)
    frozen_alpha = model.backbone[1].alpha
    assert not frozen_alpha.requires_grad and torch.equal(frozen_alpha.detach(), torch.tensor([0.25]))
    assert model.relu.alpha.requires_grad and not torch.equal(model.relu.alpha.detach(), torch.tensor([0.25]))
    x = torch.randn(16, 8)
    model.eval()
    snapshot["backbone"].eval()
    assert torch.equal(model.backbone(x), snapshot["backbone"](x))  # the frozen backbone's output did not change


@pytest.mark.parametrize("first", ["quant", "other"])
def test_backbone_finetuning_freezes_and_unfreezes_the_clips_in_either_order(tmp_path, toy_net, first):
    quant = PACTCallback(alpha_init=0.25, first_last="quantize", verbose=False)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2, backbone_initial_lr=1e-2)
    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((float(pl_module.backbone[1].alpha), float(pl_module.relu.alpha)))

    callbacks = [quant, finetuning, Record()] if first == "quant" else [finetuning, quant, Record()]
    make_trainer(tmp_path, callbacks, max_epochs=3).fit(toy_net)
    assert seen[0][0] == seen[1][0] == 0.25  # frozen with its backbone for epochs 0 and 1
    assert seen[2][0] != 0.25  # trains once the backbone is unfrozen
    assert seen[0][1] != 0.25  # the clip outside the backbone trains from the start
    groups = [g for g in make_trainer_optimizer_groups(toy_net)]
    assert sum(id(toy_net.backbone[1].alpha) in ids for ids in groups) == 1  # in one group only


def make_trainer_optimizer_groups(model: ToyNet) -> list[set[int]]:
    return [{id(p) for p in g["params"]} for g in model.trainer.optimizers[0].param_groups]


# --------------------------------------------------------------------------------------------- 5. checkpoints
def test_weights_only_checkpoint_rebuilds_the_quantized_model(tmp_path, toy_net):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=True)
    cb = PACTCallback(act_bits=3, weight_bits=3, first_last="quantize", verbose=False)
    make_trainer(tmp_path, [cb, ckpt], enable_checkpointing=True).fit(toy_net)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "callbacks" not in saved  # weights only: no callback state at all
    loaded = load_from_checkpoint(ToyNet, tmp_path / "last.ckpt")
    x = torch.randn(10, 8)
    toy_net.eval()
    assert torch.equal(loaded(x), toy_net(x))
    # Lightning's own loader builds the un-injected model, which has no place for the quantizer keys.
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*alpha"):
        ToyNet.load_from_checkpoint(tmp_path / "last.ckpt")


def test_float_checkpoint_error_says_what_to_call(tmp_path, toy_net):
    torch.save({"state_dict": toy_net.state_dict()}, tmp_path / "float.ckpt")
    with pytest.raises(KeyError, match=r"no quantization recipe.*YourModule.load_from_checkpoint\(path\)"):
        load_from_checkpoint(ToyNet, tmp_path / "float.ckpt")


# ----------------------------------------------------------------------------------------------- 6. arguments
def test_skip_accepts_one_name_and_none(tmp_path):
    one = PACTCallback(skip="backbone.0", first_last="quantize", verbose=False)
    assert one.config.skip == ("backbone.0",)
    model = ToyNet()
    make_trainer(tmp_path, [one], max_steps=1).fit(model)
    reasons = {e.name: e.reason for e in one.plan.entries}
    assert reasons["backbone.0"] == "skip" and reasons["backbone.2"] == ""
    assert PACTCallback(skip=None).config.skip == ()
    assert DSQCallback(skip="head").config.skip == ("head",)
    assert QuantNoiseCallback(skip=None, layer_types="Linear").config.layer_types == ("Linear",)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PACTCallback(alpha_lr=None), r"`alpha_lr` must be a finite number > 0.*got None"),
        (lambda: DSQCallback(quantizer_lr=None), r"`quantizer_lr` must be a finite number > 0.*got None"),
        (lambda: PACTCallback(skip=3), r"`skip` must be a module name.*got 3"),
        (lambda: PACTCallback(skip=["ok", ""]), r"`skip` must be a module name"),
        (lambda: DSQCallback(schedule_by="batch"), r"`schedule_by` must be one of \('step', 'epoch'\), got 'batch'"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_injection_never_switches_on_what_a_quantizer_keeps_fixed(toy_net):
    from lightning_quant import DSQConfig, inject_quantizers

    inject_quantizers(toy_net, DSQConfig(first_last="quantize"))
    site = toy_net.backbone[1]
    assert site.upper.requires_grad and not site.lower.requires_grad  # DSQ's activation l stays at 0 by default


# ------------------------------------------------------------------------------------------------- BatchNorm
def test_freeze_bn_stats_keeps_running_statistics_from_that_point_on(tmp_path):
    from torch import nn

    class WithBN(ToyNet):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16))

    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bn = pl_module.backbone[1]
            seen.append((trainer.global_step, bn.training, bn.running_mean.clone()))

    torch.manual_seed(0)
    model = WithBN()
    cb = PACTCallback(first_last="quantize", freeze_bn_stats=0.5, verbose=False)
    make_trainer(tmp_path, [cb, Record()], max_steps=11, max_epochs=-1).fit(model)
    for step, training, _ in seen:
        assert training == (step < 5), step  # progress step / 10 reaches 0.5 at step 5
    means = [m for _, _, m in seen]
    assert not torch.equal(means[4], means[5])  # step 4 (train mode) still updated the statistics
    for later in means[6:]:
        assert torch.equal(later, means[5])  # from step 5 on they are frozen
    with pytest.raises(ValueError, match=r"`freeze_bn_stats` must be None or a fraction .* got 1.5"):
        PACTCallback(freeze_bn_stats=1.5)
