"""Any architecture: every quantized weight layer reads a k-bit input and a k-bit weight, whatever produced the input.

Measured as a user would: eval-mode hooks count the distinct values that reach each weight layer (its input, and the
weight its forward uses) on a batch of random inputs, after the ranges were calibrated on another batch. The models
(tests/architectures.py) are of the families the issue names: ResNet, MobileNetV2, MobileNetV3, EfficientNet, a
BERT-like encoder and transformers' GPT-2 (``Conv1D``); benchmarks/coverage.py prints the same measure as a table.
"""

from __future__ import annotations

import pytest
import torch
from architectures import MODELS, distinct_values_per_layer, gpt2, image, quantized
from torch import nn

from lightning_quant import DSQConfig, PACTConfig, inject_quantizers
from lightning_quant.calibrator import ActivationCalibrator
from lightning_quant.layers import QUANTIZED_LAYERS


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"torch_encoder"}))  # its own test below
@pytest.mark.parametrize("method", ["pact", "dsq"])
def test_every_middle_weight_layer_reads_k_bit_inputs_and_weights(name, method):
    if name == "gpt2":
        pytest.importorskip("transformers")
    bits = 3
    config_cls = PACTConfig if method == "pact" else DSQConfig
    make, data = MODELS[name]
    model, _ = quantized(name, config_cls(act_bits=bits, weight_bits=bits))
    seen = distinct_values_per_layer(model, data(8))
    middle = {n: v for n, v in seen.items() if n not in (_first(model), _last(model))}
    assert middle, "no middle layer was called"
    for layer, (inputs, weights) in middle.items():
        assert weights <= 2**bits, (layer, weights)
        assert inputs <= 2**bits, (layer, inputs)  # 0 for an embedding (indices)


def _first(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS))


def _last(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)][-1]


@pytest.mark.parametrize("policy", ["float", "8bit", "quantize"])
def test_first_last_policy_on_the_inputs(policy):
    bits = 3
    model, _ = quantized("efficientnet", PACTConfig(act_bits=bits, weight_bits=bits, first_last=policy))
    seen = distinct_values_per_layer(model, image(8))
    if policy == "float":  # the first and last layers stay float: not quantized at all, their inputs included
        assert "stem" not in seen and "fc" not in seen
        assert "input_quantizer" not in model.stem._modules and "input_quantizer" not in model.fc._modules
        return
    first_inputs, last_inputs = seen["stem"][0], seen["fc"][0]
    if policy == "8bit":  # both on an 8-bit grid, the model's own input included
        assert first_inputs <= 2**8 and last_inputs <= 2**8 and first_inputs > 2**bits
    else:
        assert first_inputs <= 2**bits and last_inputs <= 2**bits


def test_no_second_quantizer_where_a_quantized_activation_already_feeds_the_layer():
    model, _ = quantized("resnet", PACTConfig(act_bits=4, weight_bits=4))
    # conv1 of each block reads the ReLU output (quantized by PACT): no input quantizer; conv2 reads BN-ReLU too.
    assert "input_quantizer" not in model.blocks[0].conv1._modules
    assert "input_quantizer" not in model.blocks[1].conv2._modules
    # fc reads an average pool of ReLU outputs: not on a grid, but it is the last layer (float policy).
    assert "input_quantizer" not in model.fc._modules
    model, _ = quantized("mobilenet_v2", PACTConfig(act_bits=4, weight_bits=4))
    # The second block's expand conv reads a residual sum: it gets one.
    assert "input_quantizer" in model.blocks[1].expand._modules
    assert "input_quantizer" not in model.blocks[1].project._modules  # ReLU6 output (PACT site) feeds it


def test_nothing_after_the_last_weight_layer_is_quantized():
    class SqueezeTail(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(3, 8, 3), nn.ReLU()
            self.conv2, self.relu2 = nn.Conv2d(8, 8, 3), nn.ReLU()
            self.conv3, self.relu3 = nn.Conv2d(8, 5, 1), nn.ReLU()  # SqueezeNet's classifier ends in a ReLU

        def forward(self, x):
            return self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x)))))).mean((2, 3))

    model = SqueezeTail()
    plan = inject_quantizers(model, PACTConfig(first_last="quantize"), example_input=image(2))
    reasons = {e.name: (e.bits, e.reason) for e in plan.entries}
    assert reasons["relu3"] == (None, "after the last layer")
    assert reasons["relu2"][0] == 4


def test_linear_subclasses_are_quantized_with_their_own_forward():
    class ScaledLinear(nn.Linear):  # like timm's Linear: a subclass with its own forward
        def forward(self, x):
            return super().forward(x) * 0.5

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), ScaledLinear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    reference = ScaledLinear(8, 8)
    reference.load_state_dict(model[2].state_dict())
    plan = inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4), example_input=torch.randn(2, 4))
    assert {e.name: e.bits for e in plan.entries if e.kind == "weight"}["2"] == 4
    x = torch.rand(3, 8)
    wq = model[2].weight_quantizer(model[2].weight)
    assert torch.equal(model[2](x), torch.nn.functional.linear(x, wq, model[2].bias) * 0.5)  # its forward, on w_q
    assert isinstance(model[2].weight, nn.Parameter) and model[2].weight is not wq


def test_gpt2_conv1d_layers_read_k_bit_inputs_and_weights():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = gpt2().eval()
    ids = torch.randint(0, 50, (2, 8))
    config = PACTConfig(act_bits=4, weight_bits=4, first_last="quantize")
    plan = inject_quantizers(model, config, warn=False, example_input=ids)
    conv1d = [e for e in plan.entries if e.kind == "weight" and e.name.split(".")[-1] in ("c_attn", "c_proj", "c_fc")]
    assert len(conv1d) == 8 and all(e.bits == 4 for e in conv1d)  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    ActivationCalibrator(model, training_only=False)
    with torch.no_grad():
        model(torch.randint(0, 50, (4, 8)))
    seen = distinct_values_per_layer(model, torch.randint(0, 50, (4, 8)))
    for entry in conv1d:
        inputs, weights = seen[entry.name]
        assert inputs <= 16 and weights <= 16, (entry.name, inputs, weights)
    # The LSQ step of a Conv1D weight (stored transposed) is per tensor here; per channel it runs along axis 1.
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.weight_quantizer.channel_axis == 1


def test_multihead_attention_projections_stay_float_with_a_warning():
    """nn.MultiheadAttention passes its raw weights to F.multi_head_attention_forward: its projections stay float,
    the plan names it; the encoder layer's feed-forward (after a functional ReLU) is on the grid."""
    model, plan = quantized("torch_encoder", PACTConfig(act_bits=3, weight_bits=3))
    assert [w for w in plan.warnings if "encoder.layers.0.self_attn (nn.MultiheadAttention)" in w]
    layer = model.encoder.layers[0]
    assert not isinstance(layer.self_attn.out_proj, QUANTIZED_LAYERS)
    seen = distinct_values_per_layer(model, MODELS["torch_encoder"][1](8))
    inputs, weights = seen["encoder.layers.0.linear2"]
    assert 0 < inputs <= 8 and weights <= 8
