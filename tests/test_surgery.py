"""Module surgery: call sites, shared modules, skip patterns, first/last policies, Parameter identity, idempotence.

The models are defined at module level in this file so that ``inspect.getsource`` (the call-site counter) and pickle
can find them.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_quant.config import PACTConfig, QuantConfig
from lightning_quant.layers import QUANTIZED_LAYERS, QuantConv2d, QuantLinear
from lightning_quant.quantizers.base import WeightQuantizer
from lightning_quant.quantizers.pact import DoReFaWeight, PACTActivation
from lightning_quant.surgery import (
    RECIPE_KEY,
    activation_quantizers,
    count_call_sites,
    decode_recipe,
    inject_quantizers,
    injected_recipe,
    weight_quantizers,
)

# ------------------------------------------------------------------------------------------------ models


class BasicBlock(nn.Module):
    """ResNet basic block: one ``self.relu`` called at two places."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = BasicBlock(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


class FunctionalNet(nn.Module):
    """Activations through ``F.relu``: nothing to swap there."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LoopNet(nn.Module):
    """One ``self.act`` call inside a loop body: one call site."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(5, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc_in(x)
        for layer in self.layers:
            x = self.act(layer(x))
        return self.fc_out(x)


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act = nn.ReLU()
        self.fc_mid = nn.Linear(8, 8)
        self.fc_out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.fc_out(self.act(self.fc_mid(h)))


class EncoderNet(nn.Module):
    def __init__(self, stack: bool = False) -> None:
        super().__init__()
        self.fc_in = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stack else layer
        self.fc_out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.enc(self.fc_in(x)))


def mlp(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear, act, Linear, act, Linear: first layer 0, last layer 4, activation 3 feeds the last layer."""
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3))


@dataclass(frozen=True)
class WeightsOnlyConfig(QuantConfig):
    """A recipe that may leave activations float (``act_bits=None``): DoReFa weights only."""

    method: ClassVar[str] = "test-weights-only"
    act_bits: int | None = None

    def make_weight(self, layer: nn.Module, name: str, bits: int) -> WeightQuantizer:
        return DoReFaWeight(bits)


def entry(plan, name: str):
    found = [e for e in plan.entries if e.name == name]
    assert len(found) == 1, f"{name} not exactly once in {[e.name for e in plan.entries]}"
    return found[0]


def image(seed: int = 0, n: int = 3) -> Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ call sites


def test_resnet_block_relu_has_two_sites() -> None:
    torch.manual_seed(0)
    assert count_call_sites(BasicBlock(), "relu") == 2
    model = TinyResNet()
    plan = inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4, first_last="quantize", quantize_inputs=False))
    e = entry(plan, "block.relu")
    assert e.kind == "activation" and e.sites == 2 and e.bits == 4
    assert isinstance(model.block.relu, PACTActivation)
    assert model.block.relu.alpha.shape == (2,)
    assert "2 sites" in plan.format()
    # The counter restarts with every forward of the block: two forwards give the same output.
    x = image()
    model.eval()
    with torch.no_grad():
        model.block.relu.alpha.copy_(torch.tensor([0.5, 2.0]))  # sites differ, so a mixed-up order shows
        expected = model(x)
        assert torch.equal(model(x), expected)
        # A stray call (or a forward that raised half-way) leaves the counter at site 1: the block's forward
        # pre-hook sends the next forward back to site 0.
        assert model.block.relu(torch.full((1,), 5.0)).item() == 0.5  # site 0 (clip 0.5); site 1 is next
        assert torch.equal(model(x), expected)


def test_resnet_block_sites_learn_separately() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    inject_quantizers(model, PACTConfig(act_bits=3, weight_bits=4, first_last="quantize", alpha_init=0.4))
    relu = model.block.relu
    seen: list[tuple[Tensor, Tensor]] = []  # (input, output) of each call, in call order

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        output.retain_grad()
        seen.append((args[0].detach().clone(), output))

    relu.register_forward_hook(hook)
    x = image(1, n=4)
    out = model(x)
    assert len(seen) == 2
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    # Each entry of alpha gets exactly its own site's saturated upstream gradient (paper: dy_q/dalpha = 1, x >= alpha).
    expected = [(grad_out.grad * (inp >= a)).sum() for (inp, grad_out), a in zip(seen, relu.alpha.detach())]
    assert (seen[0][0] >= 0.4).any() and (seen[1][0] >= 0.4).any()  # both sites saturate somewhere
    assert torch.allclose(relu.alpha.grad, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert relu.alpha.grad[0] != relu.alpha.grad[1]
    with torch.no_grad():
        relu.alpha -= 0.1 * relu.alpha.grad
    assert relu.alpha[0] != relu.alpha[1]


def test_loop_body_call_is_one_site() -> None:
    torch.manual_seed(0)
    assert count_call_sites(LoopNet(), "act") == 1
    model = LoopNet()
    plan = inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4, first_last="quantize"))
    assert entry(plan, "act").sites == 1
    assert model.act.alpha.shape == (1,)
    assert model(torch.randn(2, 5)).shape == (2, 2)


def test_shared_relu_in_sequential_gets_one_quantizer_per_slot() -> None:
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu, nn.Linear(4, 4), relu, nn.Linear(4, 2))
    plan = inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4, first_last="quantize", quantize_inputs=False))
    quantizers = [model[1], model[3], model[5]]
    assert all(isinstance(q, PACTActivation) for q in quantizers)
    assert len({id(q) for q in quantizers}) == 3
    assert len({id(q.alpha) for q in quantizers}) == 3
    assert [e.sites for e in plan.entries if e.kind == "activation"] == [1, 1, 1]
    assert [n for n, _ in activation_quantizers(model)] == ["1", "3", "5"]


# ------------------------------------------------------------------------------------------------ warnings, errors


def test_functional_relu_warns_naming_the_class() -> None:
    torch.manual_seed(0)
    model = FunctionalNet()
    with pytest.warns(UserWarning, match="FunctionalNet"):
        plan = inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4))
    assert any("FunctionalNet" in w and "relu" in w for w in plan.warnings)
    assert isinstance(model.fc2, QuantLinear)


def test_nothing_to_quantize_raises() -> None:
    model = nn.Sequential(nn.Tanh(), nn.BatchNorm1d(3), nn.Sigmoid())
    with pytest.raises(ValueError, match="Nothing to quantize"):
        inject_quantizers(model, PACTConfig())
    assert injected_recipe(model) is None


def test_only_first_and_last_layers_under_float_policy_is_nothing_to_quantize() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="Nothing to quantize"):
        inject_quantizers(model, PACTConfig(first_last="float"))


def test_skip_pattern_matching_nothing_lists_module_names() -> None:
    model = TinyResNet()
    with pytest.raises(ValueError, match="no_such_layer") as info:
        inject_quantizers(model, PACTConfig(skip=("no_such_layer",)))
    for name in ("stem", "block", "block.conv1", "block.relu", "fc"):
        assert name in str(info.value)
    # Nothing was changed on the way.
    assert type(model.block.conv1) is nn.Conv2d and type(model.block.relu) is nn.ReLU
    assert injected_recipe(model) is None


def test_skip_glob_leaves_subtree_float() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    conv1, relu = model.block.conv1, model.block.relu
    plan = inject_quantizers(model, PACTConfig(first_last="quantize", skip=("block.*",)))
    assert model.block.conv1 is conv1 and type(conv1) is nn.Conv2d
    assert model.block.relu is relu and type(relu) is nn.ReLU
    assert type(model.block.conv2) is nn.Conv2d
    for name in ("block.conv1", "block.relu", "block.conv2"):
        assert entry(plan, name).bits is None and entry(plan, name).reason == "skip"
    assert isinstance(model.stem, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert not any(name.startswith("block") for name, _ in weight_quantizers(model))


def test_skip_exact_name_leaves_that_module_float() -> None:
    model = mlp()
    layer = model[2]
    plan = inject_quantizers(model, PACTConfig(first_last="quantize", skip=("2",)))
    assert model[2] is layer and type(layer) is nn.Linear
    assert entry(plan, "2").bits is None
    assert isinstance(model[0], QuantLinear) and isinstance(model[4], QuantLinear)


# ------------------------------------------------------------------------------------------------ identity, state


def test_swapped_layers_keep_parameter_objects_and_state_dict_keys() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    params_before = dict(model.named_parameters())
    layers_before = dict(model.named_modules())
    keys_before = set(model.state_dict())
    values_before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_quantizers(
        model,
        PACTConfig(act_bits=4, weight_bits=4, first_last="quantize", weight_quantizer="dorefa", quantize_inputs=False),
    )
    params_after = dict(model.named_parameters())
    for name, p in params_before.items():
        assert params_after[name] is p, name
    assert model.block.conv1.weight is params_before["block.conv1.weight"]
    assert model.fc.bias is params_before["fc.bias"]
    keys_after = set(model.state_dict())
    assert keys_before <= keys_after
    added = keys_after - keys_before
    # The recipe travels in the state dict, as a uint8 tensor.
    assert added == {"block.relu.alpha", "block.relu.calibrated", RECIPE_KEY}
    assert model.state_dict()[RECIPE_KEY].dtype == torch.uint8
    assert decode_recipe(model.state_dict()[RECIPE_KEY])["config"]["act_bits"] == 4
    # The layer objects themselves are kept: their class changes in place.
    assert isinstance(model.block.conv1, QuantConv2d) and model.block.conv1 is layers_before["block.conv1"]
    for k, v in values_before.items():
        assert torch.equal(model.state_dict()[k], v), k
    # A float copy of the original model loads the user's keys (strict) from the injected one, minus alpha.
    fresh = TinyResNet()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys_before})


def test_swapped_layer_forward_uses_the_quantized_weight() -> None:
    torch.manual_seed(0)
    model = mlp()
    config = PACTConfig(
        act_bits=4, weight_bits=2, first_last="quantize", weight_quantizer="dorefa", quantize_inputs=False
    )
    inject_quantizers(model, config)
    layer = model[2]
    x = torch.randn(5, 8)
    expected = F.linear(x, DoReFaWeight(2)(layer.weight), layer.bias)
    assert torch.equal(layer(x), expected)
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


def test_injection_twice_is_a_no_op() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    config = PACTConfig(act_bits=4, weight_bits=4, first_last="quantize", weight_quantizer="dorefa")
    plan1 = inject_quantizers(model, config)
    modules1 = [(name, id(m), type(m)) for name, m in model.named_modules()]
    hooks1 = len(model.block._forward_pre_hooks)
    params1 = [id(p) for p in model.parameters()]
    plan2 = inject_quantizers(model, config)
    assert plan2.to_dict() == plan1.to_dict()
    assert [(name, id(m), type(m)) for name, m in model.named_modules()] == modules1
    assert len(model.block._forward_pre_hooks) == hooks1
    assert [id(p) for p in model.parameters()] == params1
    for _, q in weight_quantizers(model):
        assert type(q) is DoReFaWeight
        assert not any(isinstance(m, QUANTIZED_LAYERS) for m in q.modules())
    for _, q in activation_quantizers(model):
        assert not any(isinstance(m, PACTActivation) for m in q.children())


def test_injecting_another_recipe_raises() -> None:
    model = TinyResNet()
    inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4, first_last="quantize"))
    before = [(name, id(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match="already holds quantizers"):
        inject_quantizers(model, PACTConfig(act_bits=2, weight_bits=4, first_last="quantize"))
    assert [(name, id(m)) for name, m in model.named_modules()] == before
    assert injected_recipe(model)["config"]["act_bits"] == 4


# ------------------------------------------------------------------------------------------------ policies


@pytest.mark.parametrize(
    ("policy", "edge_bits"),
    [("float", None), ("8bit", 8), ("quantize", 3)],
)
def test_first_last_policies(policy: str, edge_bits: int | None) -> None:
    torch.manual_seed(0)
    model = mlp()
    originals = list(model)
    plan = inject_quantizers(model, PACTConfig(act_bits=3, weight_bits=3, first_last=policy))
    # Inner layer and the activation between the first two layers: always the configured bits.
    assert entry(plan, "2").bits == 3 and isinstance(model[2], QuantLinear)
    assert model[2].weight_quantizer.bits == 3
    assert entry(plan, "1").bits == 3 and model[1].bits == 3
    # First layer, last layer, and the activation feeding the last layer follow the policy.
    for name in ("0", "3", "4"):
        assert entry(plan, name).bits == edge_bits, name
        if policy != "quantize":
            assert entry(plan, name).reason != ""
    if edge_bits is None:
        assert model[0] is originals[0] and type(model[0]) is nn.Linear
        assert model[4] is originals[4] and type(model[4]) is nn.Linear
        assert model[3] is originals[3] and type(model[3]) is nn.ReLU
    else:
        assert model[0].weight_quantizer.bits == edge_bits
        assert model[4].weight_quantizer.bits == edge_bits
        assert isinstance(model[3], PACTActivation) and model[3].bits == edge_bits


def test_act_bits_none_leaves_activations_untouched() -> None:
    torch.manual_seed(0)
    model = mlp()
    relus = [model[1], model[3]]
    plan = inject_quantizers(model, WeightsOnlyConfig(weight_bits=4, first_last="quantize"))
    assert model[1] is relus[0] and model[3] is relus[1]
    assert type(model[1]) is nn.ReLU
    assert activation_quantizers(model) == []
    assert entry(plan, "1").bits is None and entry(plan, "3").bits is None
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2, 4))


def test_weight_bits_none_leaves_weights_float() -> None:
    torch.manual_seed(0)
    model = mlp()
    layers = [model[0], model[2], model[4]]
    plan = inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=None, first_last="quantize"))
    assert [model[0], model[2], model[4]] == layers
    assert all(type(m) is nn.Linear for m in layers)
    assert weight_quantizers(model) == []
    assert all(e.bits is None for e in plan.entries if e.kind == "weight")
    assert isinstance(model[1], PACTActivation) and isinstance(model[3], PACTActivation)


@pytest.mark.parametrize(("alpha_init", "relu6_alpha"), [(10.0, 6.0), (3.0, 3.0), (6.0, 6.0)])
def test_relu6_sites_start_at_min_alpha_init_6(alpha_init: float, relu6_alpha: float) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    inject_quantizers(model, PACTConfig(first_last="quantize", alpha_init=alpha_init))
    assert model[1].alpha.tolist() == [relu6_alpha]
    assert model[3].alpha.tolist() == [alpha_init]


def test_high_bit_activations_reproduce_the_float_model() -> None:
    # 16-bit PACT with a clip far above the activations is ReLU up to half a step (alpha / 65535 / 2) per unit.
    torch.manual_seed(0)
    model = mlp()
    reference = copy.deepcopy(model)
    inject_quantizers(model, PACTConfig(act_bits=16, weight_bits=None, first_last="quantize", alpha_init=20.0))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, ref = model(x), reference(x)
        assert reference[1](reference[0](x)).max() < 20.0  # no saturation: only rounding differs
    assert torch.allclose(out, ref, atol=2e-3, rtol=0)
    # Two bits instead: visibly different, so the check above can fail.
    coarse = copy.deepcopy(reference)
    inject_quantizers(coarse, PACTConfig(act_bits=2, weight_bits=None, first_last="quantize", alpha_init=20.0))
    with torch.no_grad():
        assert not torch.allclose(coarse(x), ref, atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ copies


def test_deepcopy_and_pickle_give_identical_outputs() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    inject_quantizers(model, PACTConfig(act_bits=3, weight_bits=3, first_last="quantize", alpha_init=0.8))
    with torch.no_grad():
        model.block.relu.alpha.copy_(torch.tensor([0.5, 1.5]))
    model.eval()
    x = image(4)
    with torch.no_grad():
        expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone is not model and clone.block.relu.alpha is not model.block.relu.alpha
        assert torch.equal(clone.block.relu.alpha, model.block.relu.alpha)
        assert injected_recipe(clone) == injected_recipe(model)
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
            assert torch.equal(clone(x), expected)  # the site counter is reset in the clone too
        # The clone is recognised as injected: same recipe is a no-op, another one is refused.
        modules = [id(m) for m in clone.modules()]
        inject_quantizers(clone, PACTConfig(act_bits=3, weight_bits=3, first_last="quantize", alpha_init=0.8))
        assert [id(m) for m in clone.modules()] == modules
        with pytest.raises(ValueError, match="already holds quantizers"):
            inject_quantizers(clone, PACTConfig(act_bits=2))


# ------------------------------------------------------------------------------------------------ attention


def test_multihead_attention_out_proj_is_not_swapped() -> None:
    torch.manual_seed(0)
    model = AttentionNet()
    out_proj = model.attn.out_proj
    out_proj_type = type(out_proj)
    assert out_proj_type is not nn.Linear and isinstance(out_proj, nn.Linear)  # a Linear subclass
    with pytest.warns(UserWarning, match="MultiheadAttention"):  # its projections stay float: say so
        plan = inject_quantizers(model, PACTConfig(first_last="quantize"))
    assert model.attn.out_proj is out_proj and type(model.attn.out_proj) is out_proj_type
    assert not any(e.name.startswith("attn") for e in plan.quantized)
    assert isinstance(model.fc_mid, QuantLinear)
    assert model(torch.randn(2, 5, 4)).shape == (2, 5, 2)


@pytest.mark.parametrize("stack", [False, True], ids=["layer", "encoder"])
def test_transformer_encoder_quantized_weights_apply_at_inference(stack: bool) -> None:
    # In eval mode under no_grad, nn.TransformerEncoderLayer (and nn.TransformerEncoder) may take a fused fast path
    # that reads linear1/linear2.weight directly and never calls their forward: the quantizer would be skipped.
    torch.manual_seed(0)
    model = EncoderNet(stack)
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        inject_quantizers(model, WeightsOnlyConfig(weight_bits=2, first_last="quantize"))
    layers = list(model.enc.layers) if stack else [model.enc]
    assert all(isinstance(lay.linear1, QuantLinear) and isinstance(lay.linear2, QuantLinear) for lay in layers)
    # Only the feed-forward layers differ from the float model: put its float fc_in/fc_out back.
    model.fc_in, model.fc_out = reference.fc_in, reference.fc_out
    model.eval()
    reference.eval()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    module_path = model(x).detach()  # grad enabled: no fast path, through QuantLinear.forward
    with torch.no_grad():
        inference = model(x)
        float_output = reference(x)
    assert torch.allclose(inference, module_path, atol=1e-5)
    assert not torch.allclose(inference, float_output, atol=1e-2)  # the 2-bit weights are in use


def test_float_policy_keeps_the_input_of_the_last_layer_float_in_a_resnet() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    plan = inject_quantizers(
        model, PACTConfig(act_bits=2, weight_bits=4, first_last="float"), example_input=image(5, n=2)
    )
    assert plan.order == "execution"
    # The block's relu: site 0 feeds block.conv2 (quantized), site 1 feeds fc through the pool (float).
    assert model.block.relu.site_bits == (2, None)
    entry = next(e for e in plan.entries if e.name == "block.relu")
    assert entry.bits_text() == "2,float" and "site 1: feeds the last layer" in entry.reason
    captured: list[Tensor] = []
    model.block.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    model.eval()
    with torch.no_grad():
        model(image(5, n=8))
    # The block's output is what the pool averages into fc. A float ReLU output takes far more than 2**2 values.
    assert captured[0].unique().numel() > 2**2


def test_registration_order_without_example_input_quantizes_the_whole_shared_relu() -> None:
    """Without a dry run the policy is per module (documented): the shared relu is quantized at both sites."""
    torch.manual_seed(0)
    model = TinyResNet()
    plan = inject_quantizers(model, PACTConfig(act_bits=2, weight_bits=4, first_last="float"))
    assert plan.order == "registration" and model.block.relu.site_bits is None
    assert "registration order" in plan.format()


def test_dry_run_leaves_batchnorm_statistics_and_modes_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    model.train()
    before = model[1].running_mean.clone()
    plan = inject_quantizers(model, PACTConfig(act_bits=4, first_last="8bit"), example_input=torch.randn(2, 1, 8, 8))
    assert plan.order == "execution"
    assert torch.equal(model[1].running_mean, before) and model.training and model[1].training
    assert {e.name: e.bits_text() for e in plan.entries} == {"0": "8", "2": "8", "4": "8"}


def test_failing_dry_run_falls_back_with_a_warning() -> None:
    model = TinyResNet()
    with pytest.warns(UserWarning, match="dry run on example_input failed"):
        plan = inject_quantizers(model, PACTConfig(act_bits=4), example_input=torch.randn(2, 7))
    assert plan.order == "registration"


def test_module_activations_give_no_functional_warning() -> None:
    import warnings

    from lightning_quant.config import DSQConfig

    for config in (PACTConfig(act_bits=4), DSQConfig(act_bits=4)):
        model = TinyResNet()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails the test
            plan = inject_quantizers(model, config, example_input=image(5, n=2))
        assert plan.warnings == []
