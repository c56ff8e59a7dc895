"""Which weight layers of a model end up reading a 4-bit input and using a 4-bit weight: issue 13's coverage table.

For each architecture of tests/architectures.py (ResNet, MobileNetV2, MobileNetV3, EfficientNet, a BERT-like
encoder, torch's nn.TransformerEncoder with nn.MultiheadAttention, transformers' GPT-2 from a config), measured as
tests/test_coverage.py measures it: the model (random weights, seed 0) is injected with the recipe, every range is
calibrated on one batch, and eval-mode hooks count the distinct values that reach each weight layer (its input, and
the weight its forward uses) on another batch. A layer counts when at most 16 values reach it. Weight layers are the
Linear/ConvNd modules (subclasses included), transformers' Conv1D, and each nn.MultiheadAttention's in-projection
(its out_proj is a Linear); embeddings are not counted. The first and last layers stay float (the default
``first_last="float"``), so "all but 2" is full coverage.

    PYTHONPATH=. python benchmarks/coverage.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from architectures import MODELS, distinct_values_per_layer, quantized  # noqa: E402

from lightning_quant import DSQConfig, PACTConfig, QuantNoiseConfig  # noqa: E402
from lightning_quant.layers import is_hf_conv1d  # noqa: E402

RECIPES = {
    "PACT W4A4": lambda: PACTConfig(act_bits=4, weight_bits=4),
    "DSQ W4A4": lambda: DSQConfig(act_bits=4, weight_bits=4),
    "QuantNoise W4": lambda: QuantNoiseConfig(weight_bits=4),
}
NAMES = {
    "resnet": "ResNet (ReLU, residual)",
    "mobilenet_v2": "MobileNetV2 (ReLU6, linear bottleneck)",
    "mobilenet_v3": "MobileNetV3 (Hardswish, SE)",
    "efficientnet": "EfficientNet (SiLU, SE)",
    "bert": "BERT-like (LayerNorm, GELU)",
    "torch_encoder": "nn.TransformerEncoder (MultiheadAttention)",
    "gpt2": "GPT-2, 2 layers (Conv1D)",
}


def weight_layers(model: nn.Module) -> int:
    """Linear/ConvNd modules (subclasses included), transformers' Conv1D, and MultiheadAttention in-projections."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    layers = sum(isinstance(m, kinds) or is_hf_conv1d(m) for m in model.modules())
    return layers + sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def measure(name: str, recipe: str, bits: int = 4) -> tuple[int, int, int]:
    """(layers reading a ``bits``-bit input, layers with a ``bits``-bit weight, MultiheadAttention warnings)."""
    model, plan = quantized(name, RECIPES[recipe]())
    torch.manual_seed(1)
    seen = distinct_values_per_layer(model, MODELS[name][1](8))
    seen = {n: v for n, v in seen.items() if not isinstance(model.get_submodule(n), nn.Embedding)}  # not counted
    inputs = sum(0 < n_in <= 2**bits for n_in, _ in seen.values())
    weights = sum(n_w <= 2**bits for _, n_w in seen.values())
    warned = sum("MultiheadAttention" in w for w in plan.warnings)
    return inputs, weights, warned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print(
        "| model | weight layers | 4-bit input (PACT W4A4) | 4-bit weight (PACT W4A4) | 4-bit input (DSQ W4A4) |"
        " 4-bit weight (DSQ W4A4) | 4-bit weight (QuantNoise W4) | float, warned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        total = weight_layers(MODELS[name][0]())
        pact_in, pact_w, warned = measure(name, "PACT W4A4")
        dsq_in, dsq_w, _ = measure(name, "DSQ W4A4")
        _, noise_w, _ = measure(name, "QuantNoise W4")
        float_note = f"{2 * warned} (MultiheadAttention projections)" if warned else "0"
        print(f"| {NAMES[name]} | {total} | {pact_in} | {pact_w} | {dsq_in} | {dsq_w} | {noise_w} | {float_note} |")


if __name__ == "__main__":
    main()
