"""BatchNorm re-estimation: the core pass (``lightning_quant.batchnorm``) and what the callbacks do with it."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import BNNet, make_trainer
from helpers import assert_same
from torch import nn

from lightning_quant import DSQCallback, PACTCallback, QuantNoiseCallback
from lightning_quant.batchnorm import InputRecorder, batchnorms, common_ancestor, reestimate_batchnorm


def test_reestimate_batchnorm_averages_each_batchs_statistics() -> None:
    # Batches [1, 3] and [2, 6]: means 2 and 4, unbiased variances 2 and 8 -> running mean 3, running variance 5,
    # an equal-weight average whatever the layer's momentum. The dropout runs in eval mode (identity) meanwhile.
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(1, momentum=0.3)).double()
    batches = [torch.tensor([[1.0], [3.0]], dtype=torch.float64), torch.tensor([[2.0], [6.0]], dtype=torch.float64)]
    reestimate_batchnorm(model, [lambda b=b: model(b) for b in batches])
    bn = model[1]
    assert bn.running_mean.tolist() == [3.0] and bn.running_var.tolist() == [5.0]
    assert bn.momentum == 0.3 and model.training and bn.training and model[0].training  # all restored


def test_reestimate_batchnorm_leaves_layers_not_listed_alone() -> None:
    model = nn.Sequential(nn.BatchNorm1d(1), nn.BatchNorm1d(1))
    model[1].running_mean.fill_(7.0)
    reestimate_batchnorm(model, [lambda: model(torch.tensor([[1.0], [3.0]]))], layers=[model[0]])
    assert model[0].running_mean.tolist() == [2.0] and model[1].running_mean.tolist() == [7.0]


def test_common_ancestor_is_the_deepest_module_holding_all() -> None:
    net = BNNet()
    assert common_ancestor(net, [net.body[1], net.body[4]]) == ("body", net.body)
    assert common_ancestor(net, [net.body[1], net.head]) == ("", net)
    assert common_ancestor(net, [net.body, net.body[1]]) == ("body", net.body)


def test_input_recorder_keeps_the_last_training_inputs_detached() -> None:
    layer = nn.Linear(2, 2)
    recorder = InputRecorder(layer, size=2)
    xs = [torch.randn(1, 2, requires_grad=True) for _ in range(3)]
    for x in xs:
        layer(x)
    with torch.no_grad():
        layer(torch.zeros(1, 2))  # no gradient: not a training forward
    layer.eval()
    layer(torch.ones(1, 2))  # eval mode: not a training forward
    layer.train()
    assert recorder.fresh == 3
    kept = [args[0] for args, _ in recorder.records]
    assert [torch.equal(k, x) for k, x in zip(kept, xs[1:])] == [True, True]
    assert not any(k.requires_grad for k in kept)
    assert_same(recorder.forwards()[1](), layer(xs[2]))
    recorder.mark_used()
    assert recorder.fresh == 0
    recorder.remove()
    layer(xs[0])
    assert len(recorder.records) == 0


def test_input_recorder_skips_lightnings_forward_redirection() -> None:
    # Under DDP, Lightning sets a function as the LightningModule's `forward` that takes (batch, batch_idx), puts the
    # bound original back and runs training_step, which calls the real forward: only that call is an input.
    net = BNNet()
    recorder = InputRecorder(net, size=4)
    original = net.forward
    x = torch.randn(4, 8)

    def redirected(batch, batch_idx):
        net.forward = original
        return net(batch[0])

    net.forward = redirected
    net((x, None), 0)
    ((args, _),) = recorder.records  # one record: the inner call, with x
    assert torch.equal(args[0], x)


class _StatsAtValidation(L.Callback):
    """Copies the first BatchNorm's running mean at every validation start (listed after the quantization one)."""

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.means.append(pl_module.body[1].running_mean.clone())


def _fit_recording_inputs(tmp_path, callback) -> tuple[BNNet, list[torch.Tensor], _StatsAtValidation]:
    torch.manual_seed(0)
    net = BNNet()
    inputs: list[torch.Tensor] = []

    def record(module, args) -> None:
        if module.training and torch.is_grad_enabled():
            inputs.append(args[0].detach().clone())

    net.body.register_forward_pre_hook(record)
    stats = _StatsAtValidation()
    make_trainer(tmp_path, [callback, stats], max_epochs=2, limit_val_batches=1).fit(net)
    return net, inputs, stats


@pytest.mark.parametrize(
    "make_callback",
    [
        lambda n: PACTCallback(4, 4, reestimate_bn=n, verbose=False),
        lambda n: DSQCallback(4, 4, reestimate_bn=n, verbose=False),
        lambda n: QuantNoiseCallback(bits=4, p=0.5, reestimate_bn=n, verbose=False),
    ],
    ids=["pact", "dsq", "quant_noise"],
)
def test_trained_model_and_validation_use_statistics_of_the_last_inputs(tmp_path, make_callback) -> None:
    net, inputs, stats = _fit_recording_inputs(tmp_path, make_callback(3))
    # What the user gets: the statistics one pass over the last 3 training inputs gives with the final weights,
    # computed here independently on a copy.
    expected = copy.deepcopy(net)
    reestimate_batchnorm(expected.body, [lambda x=x: expected.body(x) for x in inputs[-3:]])
    for ours, reference in zip(batchnorms(net), batchnorms(expected), strict=True):
        assert_same(ours.running_mean, reference.running_mean)
        assert_same(ours.running_var, reference.running_var)
        assert ours.momentum == 0.1 and int(ours.num_batches_tracked) == 3
    assert len(stats.means) == 2 and torch.equal(stats.means[-1], net.body[1].running_mean)  # validation saw them

    plain, inputs, _ = _fit_recording_inputs(tmp_path, make_callback(0))
    reference = copy.deepcopy(plain)
    reestimate_batchnorm(reference.body, [lambda x=x: reference.body(x) for x in inputs[-3:]])
    assert not torch.equal(plain.body[1].running_mean, reference.body[1].running_mean)  # the running average


def test_frozen_batchnorm_is_not_reestimated(tmp_path) -> None:
    # freeze_bn_stats=0.0: BatchNorm normalises with its statistics from the first step on; they must stay put.
    torch.manual_seed(0)
    net = BNNet()
    before = [bn.running_mean.clone() for bn in batchnorms(net)]
    callback = PACTCallback(4, 4, freeze_bn_stats=0.0, reestimate_bn=3, verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=2, limit_val_batches=1).fit(net)
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, batchnorms(net)))


def test_warns_when_the_replayed_module_is_never_called(tmp_path) -> None:
    torch.manual_seed(0)
    net = BNNet(split_calls=True)  # `body` itself never runs: its layers are called one by one
    with pytest.warns(UserWarning, match="`body`, the smallest module holding every BatchNorm.*never called"):
        make_trainer(tmp_path, [PACTCallback(4, 4, verbose=False)], max_epochs=1).fit(net)


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_reestimate_bn_must_be_a_non_negative_int(value) -> None:
    with pytest.raises(ValueError, match=rf"`reestimate_bn` must be an int >= 0 .*got {value!r}"):
        PACTCallback(4, 4, reestimate_bn=value)


def test_mixed_precision_reestimates_under_autocast(tmp_path) -> None:
    # The recorded forwards ran under bf16 autocast; the re-estimation runs as they did.
    torch.manual_seed(0)
    net = BNNet()
    inputs: list[torch.Tensor] = []
    net.body.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().clone()) if m.training and torch.is_grad_enabled() else None
    )
    callback = PACTCallback(4, 4, reestimate_bn=3, verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=1, precision="bf16-mixed").fit(net)
    autocast, plain = copy.deepcopy(net), copy.deepcopy(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reestimate_batchnorm(autocast.body, [lambda x=x: autocast.body(x) for x in inputs[-3:]])
    reestimate_batchnorm(plain.body, [lambda x=x: plain.body(x) for x in inputs[-3:]])
    assert_same(net.body[1].running_var, autocast.body[1].running_var)
    assert not torch.equal(net.body[1].running_var, plain.body[1].running_var)
