"""PACTCallback in real Trainer runs on CPU: optimizer group, schedulers, checkpoints, logging, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import MLPNet, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_quant
from lightning_quant import PACTCallback, load_from_checkpoint
from lightning_quant.demos import DemoCNN, DigitsDataModule
from lightning_quant.optim import GROUP_NAME, WEIGHT_GROUP_NAME
from lightning_quant.quantizers.lsq import LSQWeight
from lightning_quant.quantizers.pact import PACTActivation
from lightning_quant.surgery import RECIPE_KEY, decode_recipe


def _alphas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.alpha.detach().clone() for n, m in model.named_modules() if isinstance(m, PACTActivation)}


def test_alphas_get_one_group_of_their_own_and_user_groups_are_untouched(tmp_path):
    torch.manual_seed(0)
    model = MLPNet(optimizer="sgd")
    cb = PACTCallback(
        act_bits=4, weight_bits=4, first_last="quantize", alpha_init=0.5, alpha_lr=0.02, quantize_inputs=False
    )
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model)
    user_params = [p for n, p in model.named_parameters() if not n.endswith("alpha")]

    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3
    user, alpha, steps = groups
    step_params = [m.weight_quantizer.step for m in (model.fc1, model.fc2, model.fc3)]
    assert [id(p) for p in user["params"]] == [id(p) for p in user_params if all(p is not s for s in step_params)]
    # LSQ steps: their own group, at the lr of the weights they scale, no weight decay (it would shrink them).
    assert [id(p) for p in steps["params"]] == [id(p) for p in step_params]
    assert (steps["lr"], steps["weight_decay"], steps["name"]) == (0.05, 0.0, WEIGHT_GROUP_NAME)
    assert (user["lr"], user["momentum"], user["weight_decay"]) == (0.05, 0.9, 1e-4)
    alphas = [m.alpha for m in model.modules() if isinstance(m, PACTActivation)]
    assert [id(p) for p in alpha["params"]] == [id(p) for p in alphas]
    assert (alpha["lr"], alpha["weight_decay"], alpha["name"]) == (0.02, 0.0, GROUP_NAME)
    assert alpha["momentum"] == 0.9  # other hyper-parameters come from the optimizer's defaults
    for a in alphas:
        assert not torch.allclose(a, torch.full_like(a, 0.5)), "alpha never moved: it is not being trained"


def test_user_reference_to_weight_stays_valid(tmp_path):
    torch.manual_seed(0)
    model = MLPNet()
    w = model.fc2.weight
    before = w.detach().clone()
    keys = set(model.state_dict())
    make_trainer(tmp_path, [PACTCallback(first_last="quantize", quantize_inputs=False)]).fit(model)
    assert model.fc2.weight is w
    assert not torch.equal(w.detach(), before)  # the optimizer trained the user's own Parameter
    assert keys <= set(model.state_dict())
    steps = {f"fc{i}.weight_quantizer.step" for i in (1, 2, 3)}
    quantizer_keys = {"relu1.alpha", "relu2.alpha", "relu1.calibrated", "relu2.calibrated", *steps}
    assert set(model.state_dict()) - keys == {RECIPE_KEY, *quantizer_keys}


SCHEDULERS = ["step", "cosine", "lambda", "onecycle", "cyclic", "plateau"]


class RecordLRs(L.Callback):
    """Records (user lr, quantizer group lr) at every optimizer step: the values that were really used."""

    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        by_name = {g.get("name"): g["lr"] for g in optimizer.param_groups}
        self.seen.append((optimizer.param_groups[0]["lr"], by_name[GROUP_NAME], by_name[WEIGHT_GROUP_NAME]))


@pytest.mark.parametrize("mode", ["follow", "constant"])
@pytest.mark.parametrize("kind", SCHEDULERS)
def test_alpha_group_under_user_scheduler(tmp_path, kind, mode):
    torch.manual_seed(0)
    model = MLPNet(optimizer="sgd", scheduler=kind)
    alpha_lr = 0.2
    record = RecordLRs()
    cb = PACTCallback(first_last="quantize", alpha_lr=alpha_lr, lr_schedule=mode)
    trainer = make_trainer(tmp_path, [cb, record], max_epochs=4)
    trainer.fit(model)
    assert len(trainer.optimizers[0].param_groups) == 3
    user_peak = 0.05  # every scheduler here peaks at 0.05: the base lr, or OneCycleLR's and CyclicLR's max_lr
    assert len(record.seen) == 4 * 6
    assert len({user for user, _, _ in record.seen}) > 1, "the scheduler never changed the user's lr: nothing tested"
    for user_lr, group_lr, steps_lr in record.seen:
        expected = alpha_lr * user_lr / user_peak if mode == "follow" else alpha_lr
        assert group_lr == pytest.approx(expected, rel=1e-6)
        assert steps_lr == pytest.approx(user_lr, rel=1e-6)  # the LSQ steps move with the weights they scale
    assert max(group for _, group, _ in record.seen) <= alpha_lr * (1 + 1e-9)  # alpha_lr is the group's highest lr
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    if hasattr(scheduler, "base_lrs"):
        assert len(scheduler.base_lrs) == 3


def test_manual_optimization_and_two_optimizers(tmp_path):
    class TwoOptimizers(MLPNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            loss = F.cross_entropy(self(x), y)
            opt_a.zero_grad()
            opt_b.zero_grad()
            self.manual_backward(loss)
            opt_a.step()
            opt_b.step()

        def configure_optimizers(self):
            head = [self.fc3.weight, self.fc3.bias]
            body = [p for p in self.parameters() if all(p is not q for q in head)]
            return torch.optim.Adam(body, lr=1e-2), torch.optim.SGD(head, lr=0.1)

    torch.manual_seed(0)
    model = TwoOptimizers()
    before = _alphas(model) if _alphas(model) else None
    assert before is None  # not injected before fit
    trainer = make_trainer(tmp_path, [PACTCallback(first_last="quantize", alpha_init=0.5)])
    trainer.fit(model)
    body_opt, head_opt = trainer.optimizers
    assert [g.get("name") for g in body_opt.param_groups] == [None, GROUP_NAME, WEIGHT_GROUP_NAME]
    assert len(head_opt.param_groups) == 1
    for alpha in _alphas(model).values():
        assert not torch.equal(alpha, torch.full_like(alpha, 0.5))


def test_alphas_spread_over_two_optimizers_is_an_error(tmp_path):
    class Spread(MLPNet):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2), torch.optim.SGD([self.relu1.alpha], lr=0.1)

        def training_step(self, batch, batch_idx, *args):
            return super().training_step(batch, batch_idx)

    model = Spread()
    model.automatic_optimization = False
    with pytest.raises(ValueError, match="spread over optimizers"):
        make_trainer(tmp_path, [PACTCallback(first_last="quantize")]).fit(model)


def test_resume_restores_alphas_optimizer_and_callback_state_exactly(tmp_path):
    def run(max_epochs, ckpt_path=None, root="a"):
        torch.manual_seed(0)
        model = MLPNet(scheduler="step")
        cb = PACTCallback(act_bits=3, weight_bits=3, first_last="quantize", alpha_init=2.0)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(tmp_path / root, [cb, ckpt], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    full, full_trainer = run(3, root="full")
    _, first = run(2, root="part")
    ckpt_path = tmp_path / "part" / "last.ckpt"
    saved = torch.load(ckpt_path, weights_only=True)  # plain values only: torch's safe loader accepts it
    assert decode_recipe(saved["state_dict"][RECIPE_KEY])["config"]["act_bits"] == 3
    resumed, resumed_trainer = run(3, ckpt_path=str(ckpt_path), root="part")

    for name, alpha in _alphas(full).items():
        assert torch.equal(alpha, _alphas(resumed)[name]), name
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    full_state = full_trainer.optimizers[0].state_dict()
    resumed_state = resumed_trainer.optimizers[0].state_dict()
    assert full_state["param_groups"][1]["name"] == GROUP_NAME
    for key, state in full_state["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_state["state"][key][field])), field


def test_resume_with_other_bits_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, [PACTCallback(act_bits=4), ckpt], max_epochs=1, enable_checkpointing=True).fit(MLPNet())
    model = MLPNet()
    # The model's weights load first (Lightning restores them before callback states): its recipe check speaks.
    with pytest.raises(RuntimeError, match=r"another quantization recipe .*\(act_bits: checkpoint 4 vs now 2\)"):
        make_trainer(tmp_path, [PACTCallback(act_bits=2)], max_epochs=2).fit(
            model, ckpt_path=str(tmp_path / "last.ckpt")
        )


def test_load_from_checkpoint_rebuilds_the_trained_model(tmp_path):
    torch.manual_seed(0)
    model = MLPNet(hidden=12)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(
        tmp_path, [PACTCallback(act_bits=2, weight_bits=3, alpha_init=1.5), ckpt], enable_checkpointing=True
    ).fit(model)
    loaded = load_from_checkpoint(MLPNet, tmp_path / "last.ckpt")
    assert loaded.hparams.hidden == 12 and not loaded.training
    x = torch.randn(20, 8)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert _alphas(loaded).keys() == _alphas(model).keys()

    with pytest.raises(KeyError, match="no quantization recipe.*YourModule.load_from_checkpoint"):
        plain = tmp_path / "plain.ckpt"
        torch.save({"state_dict": MLPNet().state_dict()}, plain)
        load_from_checkpoint(MLPNet, plain)


def test_alphas_logged_every_epoch_and_plot_written(tmp_path):
    torch.manual_seed(0)
    model = MLPNet()
    logger = CSVLogger(tmp_path, name="logs")
    cb = PACTCallback(first_last="quantize", plot=True, log_every_n_steps=2)
    make_trainer(tmp_path, [cb], logger=logger, max_epochs=3, log_every_n_steps=1).fit(model)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    epoch_rows = [r for r in rows if r.get("pact/alpha/relu1") and r.get("epoch") and r.get("step")]
    assert len(epoch_rows) >= 3
    last = [r for r in rows if r.get("pact/alpha/relu2")][-1]
    assert float(last["pact/alpha/relu2"]) == pytest.approx(float(model.relu2.alpha.detach()), rel=1e-6)
    assert (Path(logger.log_dir) / "pact_alpha.png").stat().st_size > 1000
    assert set(cb._max_seen) == {"relu1", "relu2"} and all(v > 0 for v in cb._max_seen.values())


def test_fit_twice_then_validate_does_not_double_wrap(tmp_path):
    torch.manual_seed(0)
    model = MLPNet()
    cb = PACTCallback(first_last="quantize")
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model)
    modules = [type(m).__name__ for m in model.modules()]
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model)
    trainer.validate(model, verbose=False)
    assert [type(m).__name__ for m in model.modules()] == modules
    assert len(trainer.optimizers[0].param_groups) == 3


def test_functional_relu_warns_naming_the_model(tmp_path):
    class Functional(MLPNet):
        def forward(self, x):
            return self.fc3(F.relu(self.fc2(self.relu1(self.fc1(x)))))

    with pytest.warns(UserWarning, match=r"Functional\.forward calls `F\.relu\(\.\.\.\)`"):
        make_trainer(tmp_path, [PACTCallback(first_last="quantize")], max_epochs=1).fit(Functional())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"act_bits": 0}, r"`act_bits` must be an int in 1\.\.16, got 0"),
        ({"act_bits": 17}, r"`act_bits` must be an int in 1\.\.16, got 17"),
        ({"act_bits": 2.5}, r"`act_bits` must be an int in 1\.\.16, got 2\.5"),
        ({"act_bits": None}, r"`act_bits` must be an int in 1\.\.16, got None"),
        ({"weight_bits": 0}, r"`weight_bits` must be an int in 1\.\.16 or None \(keep float\), got 0"),
        ({"alpha_init": 0.0}, r"`alpha_init` must be a finite number > 0, got 0\.0"),
        ({"alpha_init": -1}, r"`alpha_init` must be a finite number > 0, got -1"),
        ({"alpha_lr": 0}, r"`alpha_lr` must be a finite number > 0, got 0"),
        ({"alpha_lr": -0.1}, r"`alpha_lr` must be a finite number > 0, got -0\.1"),
        ({"alpha_weight_decay": -1e-4}, r"`alpha_weight_decay` must be a finite number >= 0"),
        ({"first_last": "fp32"}, r"`first_last` must be one of \('float', '8bit', 'quantize'\), got 'fp32'"),
        ({"lr_schedule": "cosine"}, r"`lr_schedule` must be one of \('follow', 'constant'\), got 'cosine'"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps` must be None or an int >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PACTCallback(**kwargs)


def test_unknown_skip_fails_before_any_step_and_leaves_the_model_alone(tmp_path):
    torch.manual_seed(0)
    model = MLPNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`skip` pattern 'fc9' matches no module of MLPNet; modules: fc1, relu1, fc2"):
        make_trainer(tmp_path, [PACTCallback(skip=["fc9"])]).fit(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert isinstance(model.relu1, nn.ReLU)


def test_nothing_to_quantize_is_an_error(tmp_path):
    class Tanh(MLPNet):
        def __init__(self):
            super().__init__()
            self.fc1 = self.fc2 = self.fc3 = nn.Identity()
            self.relu1 = self.relu2 = nn.Tanh()

        def forward(self, x):
            return x[:, :3]

    with pytest.raises(ValueError, match="Nothing to quantize in Tanh"):
        make_trainer(tmp_path, [PACTCallback()]).fit(Tanh())


def test_unsupported_strategy_is_an_error(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = make_trainer(tmp_path, [PACTCallback()])
    trainer.strategy.__class__  # noqa: B018 - the real strategy exists; swap in a sharded one below
    with pytest.raises(ValueError, match="supports single-device training and DDP .* got FSDPStrategy"):
        lightning_quant.PACTCallback()._check_strategy(type("T", (), {"strategy": FSDPStrategy()})())


def test_first_last_float_is_the_papers_layout(tmp_path):
    model = MLPNet()
    cb = PACTCallback(act_bits=4, weight_bits=4)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model)
    bits = {e.name: e.bits for e in cb.plan.entries}
    assert bits == {"fc1": None, "relu1": 4, "fc2": 4, "relu2": None, "fc3": None}
    assert isinstance(model.relu2, nn.ReLU) and isinstance(model.relu1, PACTActivation)


class ResidualNet(MLPNet):
    """A shared `self.relu` called twice, the second call feeding the last layer; sets example_input_array."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.example_input_array = torch.zeros(2, 8)

    def forward(self, x):
        h = self.relu(self.fc1(x))
        return self.fc3(self.relu(self.fc2(h) + h))


def test_execution_order_keeps_the_last_layers_input_float_and_survives_reload(tmp_path):
    torch.manual_seed(0)
    model = ResidualNet()
    cb = PACTCallback(act_bits=2, weight_bits=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, [cb, ckpt], enable_checkpointing=True).fit(model)
    assert cb.plan.order == "execution"
    assert model.relu.site_bits == (2, None)  # site 0 feeds fc2, site 1 feeds fc3 (the last layer)
    loaded = load_from_checkpoint(ResidualNet, tmp_path / "last.ckpt")
    assert loaded.relu.site_bits == (2, None)
    model.eval()
    x = torch.randn(16, 8)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("callback", ["pact", "dsq", "quant_noise"])
def test_bf16_mixed_precision_trains_the_quantizers(tmp_path, callback):
    from lightning_quant import DSQCallback, QuantNoiseCallback

    torch.manual_seed(0)
    model = MLPNet()
    # The real plan (relu1 feeds fc2 directly): without it fc2's input gets its own quantizer, whose range can end
    # below relu1's clip and then, rightly, leaves the clip no gradient.
    model.example_input_array = torch.zeros(2, 8)
    cb = {
        "pact": lambda: PACTCallback(first_last="quantize", alpha_init=2.0, alpha_lr=0.05),
        "dsq": lambda: DSQCallback(first_last="quantize", quantizer_lr=0.05),
        "quant_noise": lambda: QuantNoiseCallback(bits=4, p=0.5),
    }[callback]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainer(tmp_path, [cb], precision="bf16-mixed", max_epochs=1).fit(model)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name in before:
            assert not torch.equal(p.detach(), before[name]), f"{name} did not train under bf16"
    if callback == "pact":
        assert not torch.equal(model.relu1.alpha.detach(), torch.tensor([2.0]))


def test_compile_quantizers_is_deprecated_and_ignored():
    # Kept for one release so that existing scripts run; it no longer changes anything.
    with pytest.warns(DeprecationWarning, match=r"`compile_quantizers` is deprecated and ignored"):
        cb = PACTCallback(compile_quantizers=False)
    assert not hasattr(cb, "compile_quantizers")


def _lsq_steps(model: nn.Module) -> dict[str, float]:
    return {n: float(m.step.min()) for n, m in model.named_modules() if isinstance(m, LSQWeight)}


def _digits_cnn_steps(tmp_path, callback: PACTCallback) -> tuple[dict[str, float], L.Trainer, nn.Module]:
    """DemoCNN trained from scratch on digits for 8 epochs at Adam lr 1e-3 (the accuracy benchmark's scratch row)."""
    L.seed_everything(0, verbose=False)
    model = DemoCNN(in_channels=1, num_classes=10, input_size=8, lr=1e-3)
    trainer = make_trainer(tmp_path, [callback], max_epochs=8)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, seed=0))
    return _lsq_steps(model), trainer, model


def test_eight_bit_steps_get_a_scaled_group_and_stay_positive_under_adam(tmp_path):
    # An 8-bit step is about max|w| / 127 ~ 0.003; Adam moves it by about its lr per update, so at the weights' lr
    # of 1e-3 it is driven through zero and every weight quantizes to nothing (the run ends at chance).
    at_weights_lr, _, _ = _digits_cnn_steps(tmp_path, PACTCallback(8, 8, weight_quantizer_lr=1e-3, verbose=False))
    assert min(at_weights_lr.values()) <= 0, "the failure the scale prevents did not show at the weights' lr"
    steps, trainer, model = _digits_cnn_steps(tmp_path, PACTCallback(8, 8, verbose=False))
    assert min(steps.values()) > 0
    groups = {g.get("name"): g for g in trainer.optimizers[0].param_groups}
    scaled = groups[f"{WEIGHT_GROUP_NAME}.x{7 / 127:.4g}"]
    assert scaled["lr"] == pytest.approx(1e-3 * 7 / 127)
    expected = {id(layer.weight_quantizer.step) for layer in (model.conv2, model.conv3, model.fc1)}
    assert {id(p) for p in scaled["params"]} == expected
    assert WEIGHT_GROUP_NAME not in groups  # no step is at 4 bits or below: that group is not created


def test_mixed_widths_put_each_step_in_its_own_scaled_group(tmp_path):
    model = MLPNet()
    trainer = make_trainer(tmp_path, [PACTCallback(4, 4, first_last="8bit")], max_epochs=1)
    trainer.fit(model)
    groups = {g.get("name"): g for g in trainer.optimizers[0].param_groups}
    assert [id(p) for p in groups[WEIGHT_GROUP_NAME]["params"]] == [id(model.fc2.weight_quantizer.step)]
    assert groups[WEIGHT_GROUP_NAME]["lr"] == pytest.approx(1e-2)  # 4 bits: the weights' lr, as in LSQ
    eight = groups[f"{WEIGHT_GROUP_NAME}.x{7 / 127:.4g}"]
    assert {id(p) for p in eight["params"]} == {
        id(model.fc1.weight_quantizer.step),
        id(model.fc3.weight_quantizer.step),
    }
