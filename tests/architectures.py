"""Small models of the architecture families issue 13 names, written here (torchvision and timm do not run on this
machine; transformers' GPT-2 is built from a config, no download): ResNet (ReLU, residual add), MobileNetV2 (ReLU6,
linear bottleneck, residual), MobileNetV3 (Hardswish, squeeze-excite with Hardsigmoid), EfficientNet (SiLU), a
BERT-like encoder (embeddings, LayerNorm, GELU) and GPT-2 (``Conv1D``). Shared by tests/test_coverage.py,
tests/test_export.py and benchmarks/coverage.py.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_quant import inject_quantizers
from lightning_quant.calibrator import ActivationCalibrator
from lightning_quant.layers import QUANTIZED_LAYERS


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.blocks = nn.Sequential(ResBlock(8), ResBlock(8))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.relu(self.stem(x)))).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: expand (1x1), depthwise (3x3), project (1x1, linear bottleneck), residual add."""

    def __init__(self, c: int, act: type[nn.Module], squeeze: bool = False) -> None:
        super().__init__()
        self.expand, self.act1 = nn.Conv2d(c, 2 * c, 1), act()
        self.depthwise, self.act2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), act()
        self.squeeze = squeeze
        if squeeze:  # squeeze-excite: pool, 1x1, ReLU, 1x1, Hardsigmoid gate
            self.se_reduce, self.se_relu = nn.Conv2d(2 * c, c, 1), nn.ReLU()
            self.se_expand, self.se_gate = nn.Conv2d(c, 2 * c, 1), nn.Hardsigmoid()
        self.project = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        y = self.act2(self.depthwise(self.act1(self.expand(x))))
        if self.squeeze:
            s = self.se_gate(self.se_expand(self.se_relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
            y = y * s
        return x + self.project(y)


class MobileNet(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU6, squeeze: bool = False) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), act()
        self.blocks = nn.Sequential(InvertedResidual(8, act, squeeze), InvertedResidual(8, act, squeeze))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.act(self.stem(x))).mean((2, 3)))


class Encoder(nn.Module):
    """BERT-like: embeddings + LayerNorm, self-attention from Linear layers, GELU MLP, a classifier."""

    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.embed, self.norm0 = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.qkv, self.proj, self.norm1 = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)
        self.fc1, self.gelu, self.fc2, self.norm2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.norm0(self.embed(ids))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        x = self.norm1(x + self.proj(attn @ v))
        x = self.norm2(x + self.fc2(self.gelu(self.fc1(x))))
        return self.head(x[:, 0])


def image(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8)


def ids(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 20, (n, 6))


class TorchEncoder(nn.Module):
    """torch's own ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention``, a functional ReLU) on embeddings."""

    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids))[:, 0])


def gpt2(n_layer: int = 2, n_embd: int = 16, vocab: int = 50, positions: int = 16) -> nn.Module:
    """transformers' GPT2LMHeadModel from a config (random weights, no cache: one logits output)."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=2,
        n_embd=n_embd,
        vocab_size=vocab,
        n_positions=positions,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def gpt2_ids(n: int = 4, length: int = 8, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length))


#: name -> (builder, batch of n inputs)
MODELS = {
    "resnet": (ResNet, image),
    "mobilenet_v2": (MobileNet, image),
    "mobilenet_v3": (lambda: MobileNet(nn.Hardswish, squeeze=True), image),
    "efficientnet": (lambda: MobileNet(nn.SiLU, squeeze=True), image),
    "bert": (Encoder, ids),
    "torch_encoder": (TorchEncoder, ids),
    "gpt2": (gpt2, gpt2_ids),
}


def distinct_values_per_layer(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(distinct input values, distinct weight values) reaching each quantized layer in one eval forward."""
    seen: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS):

            def hook(mod, args, name=name):
                x = args[0]
                if "input_quantizer" in mod._modules:
                    x = mod.input_quantizer(x)
                inputs = x.unique().numel() if x.is_floating_point() else 0
                seen[name] = (inputs, mod.weight_quantizer(mod.weight).unique().numel())

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def quantized(name: str, config) -> tuple[nn.Module, object]:
    """Model ``name`` (seed 0) injected with ``config`` (the dry run on a batch of 2), every range calibrated on a
    batch of 16, in eval mode; and the plan."""
    torch.manual_seed(0)
    make, data = MODELS[name]
    model = make()
    plan = inject_quantizers(model, config, warn=False, example_input=data(2))
    ActivationCalibrator(model, training_only=False)
    model.eval()
    with torch.no_grad():
        model(data(16))
    return model, plan
