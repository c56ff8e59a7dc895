"""QuantNoiseCallback in real Trainer runs: schedule, resume, evaluation quantization, transformer, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import MLPNet, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QuantNoiseCallback, load_from_checkpoint
from lightning_quant.functional.quant_noise import fake_quantize_affine
from lightning_quant.layers import QuantLinear
from lightning_quant.quantizers.quant_noise import QuantNoiseWeight
from lightning_quant.schedules import CosineSchedule, LinearSchedule
from lightning_quant.surgery import RECIPE_KEY


class RecordP(L.Callback):
    def __init__(self):
        self.p = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.p[trainer.current_epoch] = float(pl_module.fc1.weight_quantizer.p)


def test_rate_schedule_moves_each_epoch_and_is_logged(tmp_path):
    torch.manual_seed(0)
    schedule = LinearSchedule(0.1, 0.5)
    record = RecordP()
    logger = CSVLogger(tmp_path, name="logs")
    cb = QuantNoiseCallback(bits=4, p=schedule, schedule_by="epoch")
    make_trainer(tmp_path, [cb, record], max_epochs=5, logger=logger).fit(MLPNet(in_features=16))
    assert record.p == pytest.approx({e: schedule(e, 5) for e in range(5)})
    rows = [r for r in csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")) if r.get("quant_noise/p")]
    assert [float(r["quant_noise/p"]) for r in rows] == pytest.approx([schedule(e, 5) for e in range(5)])


def test_resumed_run_continues_the_schedule_exactly(tmp_path):
    schedule = CosineSchedule(0.9, 0.1)

    def run(max_epochs, root, ckpt_path=None):
        torch.manual_seed(0)
        record = RecordP()
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True)
        cb = QuantNoiseCallback(bits=4, p=schedule, schedule_by="epoch")
        trainer = make_trainer(tmp_path / root, [cb, record, ckpt], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(MLPNet(in_features=16), ckpt_path=ckpt_path)
        return record.p

    full = run(4, "full")
    run(3, "part")  # stops after epoch index 2
    resumed = run(4, "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert list(resumed) == [3]
    assert resumed[3] == full[3] == pytest.approx(schedule(3, 4))
    saved = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if "QuantNoiseCallback" in k)
    assert state["schedules"] == {"p": {"type": "CosineSchedule", "start": 0.9, "end": 0.1}}


def _mlp_with_quantized_weights(model: nn.Module, x: torch.Tensor, bits: int) -> torch.Tensor:
    """MLPNet's forward written out, every weight through the int-``bits`` fake quantizer, activations float."""
    for layer in (model.fc1, model.fc2):
        x = F.relu(F.linear(x, fake_quantize_affine(layer.weight, bits), layer.bias))
    return F.linear(x, fake_quantize_affine(model.fc3.weight, bits), model.fc3.bias)


def test_evaluation_quantizes_every_covered_weight_to_bits(tmp_path):
    torch.manual_seed(0)
    model = MLPNet(in_features=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, [QuantNoiseCallback(bits=3, p=0.5), ckpt], enable_checkpointing=True).fit(model)
    model.eval()
    for layer in (model.fc1, model.fc2, model.fc3):
        assert isinstance(layer, QuantLinear)
        effective = layer.weight_quantizer(layer.weight)
        assert torch.equal(effective, fake_quantize_affine(layer.weight, 3))
        assert effective.unique().numel() <= 2**3
    x = torch.randn(8, 16)
    assert torch.equal(model(x), _mlp_with_quantized_weights(model, x, 3))
    loaded = load_from_checkpoint(MLPNet, tmp_path / "last.ckpt")
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_is_the_float_model_and_p_one_is_full_weight_qat(tmp_path, p):
    torch.manual_seed(0)
    model = MLPNet(in_features=16)
    reference = MLPNet(in_features=16)
    reference.load_state_dict(model.state_dict())
    make_trainer(tmp_path, [QuantNoiseCallback(bits=4, p=p)], max_epochs=1, limit_train_batches=0).fit(model)
    model.train()
    x = torch.randn(8, 16)
    if p == 0.0:
        expected = reference(x)
    else:
        expected = _mlp_with_quantized_weights(reference, x, 4)
    assert torch.equal(model(x), expected)


def test_training_never_changes_weights_without_an_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = MLPNet(in_features=16)
    make_trainer(tmp_path, [QuantNoiseCallback(bits=2, p=0.7, mode="scalar")], max_epochs=1, limit_train_batches=0).fit(
        model
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}  # every value is a tensor, the recipe too
    model.train()
    for _ in range(50):
        model(torch.randn(4, 16)).sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_block_size_not_dividing_names_the_layer_before_any_step(tmp_path):
    model = MLPNet(in_features=16)
    before = model.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match="fc1"):
        make_trainer(tmp_path, [QuantNoiseCallback(mode="block", p=0.1, block_size=5)]).fit(model)
    assert torch.equal(model.fc1.weight, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1.5}, r"`p` must stay inside \[0\.0, 1\.0\]"),
        ({"p": -0.1}, r"`p` must stay inside \[0\.0, 1\.0\]"),
        ({"p": LinearSchedule(0.5, 1.2)}, r"`p` must stay inside \[0\.0, 1\.0\]; LinearSchedule"),
        ({"p": 1.0, "mode": "block"}, r"`p` must stay inside \[0\.0, 1\.0\)"),
        ({"p": "high"}, r"`p` must be a number or a lightning_quant\.schedules\.Schedule"),
        ({"bits": 0}, r"`bits` must be an int in 1\.\.16, got 0"),
        ({"bits": 17}, r"`bits` must be an int in 1\.\.16, got 17"),
        ({"mode": "vector"}, r"`mode` must be one of \['scalar', 'block'\], got 'vector'"),
        ({"block_size": 0}, r"`block_size` must be an int >= 1, got 0"),
        ({"layer_types": ["LSTM"]}, r"`layer_types` must be a non-empty list of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantNoiseCallback(**kwargs)


class TinyTransformer(LightningTransformer):
    """Lightning's demo transformer on synthetic tokens (no download)."""

    def __init__(self, vocab_size: int = 32) -> None:
        super().__init__(vocab_size=vocab_size)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 32, (16, 9), generator=g)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def test_transformer_linear_layers_are_quantized_at_evaluation(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    make_trainer(tmp_path, [QuantNoiseCallback(bits=4, p=0.5)], max_epochs=1).fit(model)
    encoder_layer = model.model.transformer.encoder.layers[0]
    assert isinstance(encoder_layer.linear1, QuantLinear)
    assert isinstance(model.model.embedding.weight_quantizer, QuantNoiseWeight)
    # MultiheadAttention's out_proj is a Linear subclass whose forward never runs: it is left alone.
    assert type(encoder_layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear

    model.eval()
    tokens = torch.randint(0, 32, (2, 8))
    with torch.no_grad():  # eval + no_grad: the condition under which torch may take its fused encoder path
        fast = model(tokens, tokens)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = model(tokens, tokens)  # the module-by-module path, through QuantLinear.forward
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(fast, slow, atol=1e-5)
    effective = encoder_layer.linear1.weight_quantizer(encoder_layer.linear1.weight)
    assert effective.unique().numel() <= 16
    assert not torch.equal(effective, encoder_layer.linear1.weight)


def test_fused_encoder_fast_path_does_not_bypass_quantized_linears():
    from lightning_quant import inject_quantizers
    from lightning_quant.config import QuantNoiseConfig

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
    inject_quantizers(layer, QuantNoiseConfig(weight_bits=4))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        fast = layer(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        float_layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
        state = {k: v for k, v in layer.state_dict().items() if "quantizer" not in k and k != RECIPE_KEY}
        float_layer.load_state_dict(state)
        reference = float_layer(x)
    assert torch.allclose(fast, slow, atol=1e-6), "the fused path read the raw float weights"
    assert not torch.allclose(fast, reference, atol=1e-4), "quantization had no effect: nothing was tested"
