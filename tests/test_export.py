"""``lightning_quant.export_onnx``: real onnxruntime sessions against the torch eval model, code by code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from architectures import gpt2, gpt2_ids  # noqa: E402

from lightning_quant import DSQConfig, PACTConfig, QuantNoiseConfig, export_onnx, inject_quantizers  # noqa: E402
from lightning_quant.calibrator import ActivationCalibrator  # noqa: E402
from lightning_quant.export import onnxruntime_session, quantized_tensors  # noqa: E402
from lightning_quant.quantizers import DoReFaWeight  # noqa: E402
from lightning_quant.surgery import activation_quantizers, weight_quantizers  # noqa: E402

# --------------------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """ResNet basic block: ``self.relu`` is called twice (two call sites, two clips)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(width)
        self.layer2 = BasicBlock(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand (1x1, ReLU6), depthwise 3x3 (ReLU6), linear 1x1 projection, residual."""

    def __init__(self, channels: int, expand: int = 3) -> None:
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class TinyMobileNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width), InvertedResidual(width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """One pre-norm encoder block (hand-written attention, nn.GELU MLP), batch-first, and a classifier."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


MODELS = {
    "resnet": (TinyResNet, (3, 8, 8)),
    "mobilenet": (TinyMobileNet, (3, 8, 8)),
    "transformer": (TinyTransformer, (6, 8)),
}
CONFIGS = {
    "pact": lambda bits: PACTConfig(act_bits=bits, weight_bits=bits, alpha_init=4.0),  # LSQ weights
    "pact_dorefa": lambda bits: PACTConfig(act_bits=bits, weight_bits=bits, alpha_init=4.0, weight_quantizer="dorefa"),
    "dsq": lambda bits: DSQConfig(act_bits=bits, weight_bits=bits),
    "quant_noise": lambda bits: QuantNoiseConfig(weight_bits=bits),
}
#: Flip fractions measured by the parametrized test (printed with ``pytest -s``).
FLIPS: dict[str, float] = {}


def _trained(model_name: str, method: str, bits: int, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A small model, injected and trained a few steps (clips and ranges off their init), in eval mode."""
    torch.manual_seed(seed)
    cls, shape = MODELS[model_name]
    model = cls()
    inject_quantizers(model, CONFIGS[method](bits), warn=False, example_input=torch.randn(2, *shape))
    # The callbacks calibrate every uncalibrated range on the first batch; do the same here.
    ActivationCalibrator(model, training_only=False)
    with torch.no_grad():
        model(torch.randn(16, *shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        loss = F.cross_entropy(model(torch.randn(16, *shape)), torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), shape


def _torch_activations(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[tuple[str, int], list]]:
    """The torch eval output and, per (quantizer name, site), the (input, output) of every call, in call order."""
    seen: dict[tuple[str, int], list] = {}
    handles = []
    for name, module in activation_quantizers(model):

        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            mod._export_test_site = mod.upcoming_site()
            mod._export_test_input = args[0].detach().clone()

        def post(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            if mod.bits_at(mod._export_test_site) is not None:  # float sites (e.g. feeding a float last layer)
                seen.setdefault((name, mod._export_test_site), []).append((mod._export_test_input, out.detach()))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    for _, module in activation_quantizers(model):
        for attr in ("_export_test_site", "_export_test_input"):
            module.__dict__.pop(attr, None)
    out = out if isinstance(out, torch.Tensor) else out[0]  # a ModelOutput (transformers): its first tensor
    return out.numpy(), seen


def _run_with_codes(path: str, x: torch.Tensor, integer_kernels: bool = False) -> tuple[np.ndarray, dict]:
    """Run the file in onnxruntime with every activation code tensor added as a graph output."""
    model = onnx.load(path)
    records = quantized_tensors(model)
    codes = [r for r in records if r["kind"] == "activation"]
    names = ["output"]
    for i, r in enumerate(codes):  # cast to int32: onnxruntime's Python API can not return 4-bit tensors
        names.append(f"code{i}")
        model.graph.node.append(onnx.helper.make_node("Cast", [r["code"]], [names[-1]], to=onnx.TensorProto.INT32))
        model.graph.output.append(onnx.helper.make_tensor_value_info(names[-1], onnx.TensorProto.INT32, None))
    session = onnxruntime_session(model.SerializeToString(), integer_kernels=integer_kernels)
    results = session.run(names, {"input": x.numpy()})
    return results[0], {r["label"]: (r, results[i + 1].astype(np.int64)) for i, r in enumerate(codes)}


def _torch_codes(record: dict, values: torch.Tensor) -> np.ndarray:
    y = values.double().numpy()
    if record["top"] is not None:  # torch's top level is u itself
        y = np.where(y == np.float32(record["top"][1]), np.float32(record["top"][0]), y)
    return np.rint((y - (record["offset"] or 0.0)) / record["scale"]).astype(np.int64) + record["zero_point"]


def _boundary_ulps(record: dict, inputs: torch.Tensor) -> np.ndarray:
    """Distance of each torch quantizer input from the nearest level boundary, in ulps of the input."""
    x = inputs.double().numpy()
    if record["clip"] is not None:
        x = np.clip(x, *record["clip"])
    t = (x - (record["offset"] or 0.0)) / record["scale"]
    distance = np.abs(t - (np.floor(t) + 0.5)) * record["scale"]
    return distance / np.spacing(np.maximum(np.abs(x), 1e-30).astype(np.float32))


def _compare_codes(model: nn.Module, path: str, x: torch.Tensor, integer_kernels: bool = False) -> dict:
    """Codes of every activation call, torch vs onnxruntime: totals, flips, the flips' size and boundary distance."""
    ref, seen = _torch_activations(model, x)
    out, codes = _run_with_codes(path, x, integer_kernels)
    calls: dict[tuple[str, int], int] = {}
    total = flips = 0
    worst_step, worst_ulps = 0, 0.0
    for label, (record, ort_codes) in sorted(codes.items()):
        key = (record["name"], record["site"])
        index = calls.get(key, 0)
        calls[key] = index + 1
        inputs, outputs = seen[key][index]
        torch_codes = _torch_codes(record, outputs)
        assert torch_codes.shape == ort_codes.shape, label
        differ = torch_codes != ort_codes
        total += differ.size
        flips += int(differ.sum())
        if differ.any():
            worst_step = max(worst_step, int(np.abs(torch_codes - ort_codes).max()))
            worst_ulps = max(worst_ulps, float(_boundary_ulps(record, inputs)[differ].max()))
    # Every call site the torch model ran is in the graph, and the other way round.
    assert sum(len(v) for v in seen.values()) == len(codes)
    return {"ref": ref, "out": out, "total": total, "flips": flips, "step": worst_step, "ulps": worst_ulps}


def _initializers(path: str) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(path).graph.initializer}


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("method", ["pact", "dsq", "quant_noise"])
@pytest.mark.parametrize("model_name", ["resnet", "mobilenet", "transformer"])
def test_codes_match_torch(tmp_path, model_name: str, method: str, bits: int) -> None:
    model, shape = _trained(model_name, method, bits)
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "model.onnx")
    x = torch.randn(5, *shape)  # another batch size than the export's: the batch dimension is dynamic
    result = _compare_codes(model, path, x)
    fraction = result["flips"] / max(result["total"], 1)
    FLIPS[f"{model_name}/{method}/{bits}"] = fraction
    print(f"{model_name} {method} {bits}: {result['flips']}/{result['total']} codes differ ({fraction:.2e})")
    assert fraction < 1e-3
    assert result["step"] <= 1
    assert result["ulps"] <= 64, "a flip away from any level boundary is a bug, not rounding"
    # The final output: equal to float rounding, plus the effect of the rare flips.
    scale = np.abs(result["ref"]).max()
    if result["flips"] == 0:
        np.testing.assert_allclose(result["out"], result["ref"], atol=1e-4 * scale)
    else:
        assert np.abs(result["out"] - result["ref"]).max() <= 0.1 * scale


def test_weights_are_integer_initializers(tmp_path) -> None:
    """Every quantized weight is stored as integer codes of the right type, equal to the torch model's codes."""
    expected = {  # method, bits -> (ONNX type of the weight codes)
        ("pact", 2): "INT4",  # LSQ codes -2..1
        ("pact", 4): "INT4",  # LSQ codes -8..7
        ("pact", 8): "INT8",  # LSQ codes -128..127
        ("pact_dorefa", 2): "INT4",  # DoReFa codes -3..3
        ("pact_dorefa", 4): "INT8",  # DoReFa codes -15..15: never INT4
        ("pact_dorefa", 8): "INT16",  # DoReFa codes -255..255
        ("dsq", 4): "UINT4",
        ("dsq", 8): "UINT8",
        ("quant_noise", 2): "UINT4",
        ("quant_noise", 8): "UINT8",
    }
    for (method, bits), dtype in expected.items():
        model, shape = _trained("resnet", method, bits)
        path = export_onnx(model, torch.randn(2, *shape), tmp_path / f"{method}{bits}.onnx")
        inits = _initializers(path)
        weights = [r for r in quantized_tensors(path) if r["kind"] == "weight"]
        layers = dict(weight_quantizers(model))
        assert {r["name"] for r in weights} == set(layers)
        for record in weights:
            tensor = inits[record["code"]]
            assert tensor.data_type == getattr(onnx.TensorProto, dtype), (method, bits, record["name"])
            width = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16}[dtype]
            assert len(tensor.raw_data) == -(-int(np.prod(tensor.dims)) * width // 8)  # packed, not varints
            layer = model.get_submodule(record["name"])
            with torch.no_grad():
                values = layer.weight_quantizer(layer.weight)
            codes = onnx.numpy_helper.to_array(tensor).astype(np.int64)
            np.testing.assert_array_equal(codes, _torch_codes(record, values))
        # No float copy of a quantized weight is left in the file.
        floats = {name for name, t in inits.items() if t.data_type == onnx.TensorProto.FLOAT}
        assert not {f"{r['name']}.weight" for r in weights} & floats


def test_graph_shape_and_ops(tmp_path) -> None:
    model, shape = _trained("resnet", "pact", 4)
    path = export_onnx(model, torch.randn(3, *shape), tmp_path / "m.onnx")
    graph = onnx.load(path)
    assert [i.name for i in graph.graph.input] == ["input"]
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.HasField("dim_value")
    assert {o.domain for o in graph.opset_import} == {""} and graph.opset_import[0].version == 21
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not any(n.domain for n in graph.graph.node)
    # One activation grid per call site: the blocks' `self.relu` has two sites, each its own scale.
    records = [r for r in quantized_tensors(path) if r["kind"] == "activation" and r["name"] == "layer1.relu"]
    assert sorted(r["site"] for r in records) == [0, 1]
    alphas = model.layer1.relu.alpha.detach()
    for r in records:
        assert r["dtype"] == "UINT4"
        assert r["scale"] == pytest.approx(float(alphas[r["site"]] / 15), rel=1e-6)


def test_user_model_unchanged(tmp_path) -> None:
    model, shape = _trained("resnet", "pact", 4)
    model.train()
    model.layer1.eval()  # a mixed state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    attrs = {name: set(m.__dict__) for name, m in model.named_modules()}
    structure = [(name, type(m)) for name, m in model.named_modules()]
    export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == attrs
    assert [(name, type(m)) for name, m in model.named_modules()] == structure


def test_dsq_learned_lower_bound_exports_exactly(tmp_path) -> None:
    """A learned l != 0 exports as Sub(l) / Add(l) around the Q/DQ pair, with the same codes."""
    model, shape = _trained("resnet", "dsq", 4)
    with torch.no_grad():
        for _, module in activation_quantizers(model):
            module.lower.fill_(0.05)
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx")
    assert all(r["offset"] == pytest.approx(0.05) for r in quantized_tensors(path) if r["kind"] == "activation")
    result = _compare_codes(model, path, torch.randn(4, *shape))
    assert result["flips"] / result["total"] < 1e-3 and result["step"] <= 1


def test_quant_noise_block_mode_stays_float(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    inject_quantizers(model, QuantNoiseConfig(weight_bits=4, mode="block", block_size=4), warn=False)
    model.eval()
    path = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert quantized_tensors(path) == []
    x = torch.randn(3, 3, 8, 8)
    out = onnxruntime_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_integer_kernels(tmp_path) -> None:
    """integer_kernels=True: onnxruntime's optimized graph runs QLinearConv; codes move at level boundaries only."""
    model, shape = _trained("resnet", "pact", 4)
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "int.onnx", integer_kernels=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearConv" in optimized, optimized
    inits = _initializers(path)
    assert any(t.data_type == onnx.TensorProto.INT32 for t in inits.values())  # int32 biases
    result = _compare_codes(model, path, torch.randn(8, *shape), integer_kernels=True)
    fraction = result["flips"] / result["total"]
    print(f"integer kernels, resnet pact 4: {result['flips']}/{result['total']} codes differ ({fraction:.2e})")
    assert fraction < 0.05 and result["step"] <= 2
    scale = np.abs(result["ref"]).max()
    assert np.abs(result["out"] - result["ref"]).max() <= 0.2 * scale


def test_lsq_plus_inputs_have_an_integer_zero_point(tmp_path) -> None:
    """LSQ+ input grids (LayerNorm, GELU, attention outputs) export as Q/DQ with the integer zero point they train on
    (no float offset), so the transformer also runs with integer kernels."""
    model, shape = _trained("transformer", "pact", 4)
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "int.onnx", integer_kernels=True)
    records = [r for r in quantized_tensors(path) if r["quantizer"] == "LSQPlusInput"]
    assert {r["name"] for r in records} == {
        "qkv.input_quantizer",
        "proj.input_quantizer",
        "fc1.input_quantizer",
        "fc2.input_quantizer",
    }
    for r in records:
        lower = model.get_submodule(r["name"]).lower.item()
        assert r["offset"] is None and r["zero_point"] == round(-min(lower, 0.0) / r["scale"])
        assert r["clip"][0] == pytest.approx(-r["zero_point"] * r["scale"], rel=1e-6)
    assert any(0 < r["zero_point"] < 15 for r in records)  # signed inputs: a zero point inside the range
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # No Q/DQ follows these MatMuls (attention, GELU, residual), so onnxruntime fuses the integer product with a
    # float output: one integer MatMul per quantized layer.
    assert optimized.count("MatMulIntegerToFloat") + optimized.count("QLinearMatMul") == 4, optimized
    result = _compare_codes(model, path, torch.randn(8, *shape), integer_kernels=True)
    fraction = result["flips"] / result["total"]
    print(f"integer kernels, transformer pact 4: {result['flips']}/{result['total']} codes differ ({fraction:.2e})")
    assert fraction < 0.05 and result["step"] <= 2


def _trained_gpt2(method: str, bits: int) -> nn.Module:
    """transformers' GPT-2 from a config, injected, calibrated and trained a few language-model steps, in eval mode."""
    torch.manual_seed(0)
    model = gpt2()
    inject_quantizers(model, CONFIGS[method](bits), warn=False, example_input=gpt2_ids(2))
    ActivationCalibrator(model, training_only=False)
    with torch.no_grad():
        model(gpt2_ids(16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        ids = gpt2_ids(8)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(("method", "bits"), [("pact", 8), ("pact", 4), ("pact", 2), ("dsq", 4), ("quant_noise", 4)])
def test_gpt2_from_config_round_trips(tmp_path, method: str, bits: int) -> None:
    """GPT-2 (Conv1D layers, LSQ+/DSQ inputs on LayerNorm, GELU and attention outputs, transformers' mask code)."""
    pytest.importorskip("transformers")
    model = _trained_gpt2(method, bits)
    path = export_onnx(model, gpt2_ids(2), tmp_path / "gpt2.onnx")
    assert [i.name for i in onnx.load(path).graph.input] == ["input"]  # the ids only (no logits_to_keep)
    result = _compare_codes(model, path, gpt2_ids(3))
    fraction = result["flips"] / max(result["total"], 1)
    FLIPS[f"gpt2/{method}/{bits}"] = fraction
    print(f"gpt2 {method} {bits}: {result['flips']}/{result['total']} codes differ ({fraction:.2e})")
    assert (result["total"] > 0) == (method != "quant_noise")  # QuantNoise quantizes weights only
    assert fraction < 1e-3 and result["step"] <= 1 and result["ulps"] <= 64
    scale = np.abs(result["ref"]).max()
    if result["flips"] == 0:
        np.testing.assert_allclose(result["out"], result["ref"], atol=1e-4 * scale)
    # Every quantized Conv1D weight is an integer initializer holding the torch model's codes.
    inits = _initializers(path)
    weights = [r for r in quantized_tensors(path) if r["kind"] == "weight"]
    assert {r["name"] for r in weights} == set(dict(weight_quantizers(model)))
    for record in weights:
        layer = model.get_submodule(record["name"])
        with torch.no_grad():
            expected = _torch_codes(record, layer.weight_quantizer(layer.weight))
        codes = onnx.numpy_helper.to_array(inits[record["code"]]).astype(np.int64)
        np.testing.assert_array_equal(codes if codes.shape == expected.shape else codes.T, expected)


class DiffCumsum(nn.Module):
    """What transformers' mask code does with the position ids: ``torch.diff`` with a prepend, ``cumsum`` of a bool."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.diff(x, prepend=x[:, :1] - 1, dim=-1)
        runs = (steps > 0).cumsum(-1)
        return self.out(self.relu(self.fc(x))) + runs[:, :3]


def test_diff_and_bool_cumsum_export_only_inside_export_onnx(tmp_path) -> None:
    torch.manual_seed(0)
    model = DiffCumsum()
    config = PACTConfig(act_bits=4, weight_bits=4, first_last="quantize")
    inject_quantizers(model, config, warn=False, example_input=torch.randn(2, 6))
    model.eval()
    path = export_onnx(model, torch.randn(2, 6), tmp_path / "m.onnx")
    x = torch.randn(5, 6)
    out = onnxruntime_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-5)
    # The rules are registered for that export only: torch's own exporter still has none for aten::diff.
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="aten::diff"):
        torch.onnx.export(DiffCumsum(), (x,), str(tmp_path / "plain.onnx"), dynamo=False, opset_version=20)


def _shape_of(model_name: str) -> tuple[int, ...]:
    return MODELS[model_name][1]


def test_refusals_before_writing(tmp_path) -> None:
    shape = _shape_of("resnet")
    example = torch.randn(2, *shape)
    target = tmp_path / "never.onnx"
    with pytest.raises(ValueError, match="holds no lightning_quant recipe"):
        export_onnx(TinyResNet(), example, target)
    pact4, _ = _trained("resnet", "pact_dorefa", 4)
    with pytest.raises(ValueError, match=r"DoReFaWeight weights of .* at 4 bits.*-15\.\.15.*4-bit storage"):
        export_onnx(pact4, example, target, weight_storage_bits=4)
    pact8, _ = _trained("resnet", "pact_dorefa", 8)
    with pytest.raises(ValueError, match=r"DoReFaWeight .* at 8 bits.*-255\.\.255.*8-bit storage"):
        export_onnx(pact8, example, target, integer_kernels=True)
    dsq, _ = _trained("resnet", "dsq", 4)
    with pytest.raises(ValueError, match=r"DSQWeight .*integer_kernels=True.*no integer zero point"):
        export_onnx(dsq, example, target, integer_kernels=True)
    with pytest.raises(ValueError, match="weight_storage_bits"):
        export_onnx(pact4, example, target, weight_storage_bits=3)
    with pytest.raises(ValueError, match="8-bit weights only"):
        export_onnx(pact4, example, target, integer_kernels=True, weight_storage_bits=4)
    with pytest.raises(FileNotFoundError, match="folder of `path` does not exist"):
        export_onnx(pact4, example, tmp_path / "missing" / "m.onnx")
    odd = copy.deepcopy(pact4)
    odd.layer1.conv1.weight_quantizer = type("MyWeight", (DoReFaWeight,), {})(4)
    with pytest.raises(ValueError, match="no export rule for the weight quantizer of 'layer1.conv1' \\(MyWeight\\)"):
        export_onnx(odd, example, target)
    with pytest.raises(ValueError, match="example_input"):
        export_onnx(pact4, [1, 2], target)
    assert not target.exists()


def test_sixteen_bit_activations_refused_for_integer_kernels(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    inject_quantizers(model, PACTConfig(act_bits=12, weight_bits=None), warn=False)
    model.eval()
    with pytest.raises(ValueError, match=r"PACTActivation 'relu' \(site 0, 12 bits\).*no 8-bit type"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", integer_kernels=True)
    path = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")  # UINT16 Q/DQ without them
    assert {r["dtype"] for r in quantized_tensors(path)} == {"UINT16"}
    result = _compare_codes(model, path, torch.randn(3, 3, 8, 8))
    assert result["flips"] / result["total"] < 1e-3
