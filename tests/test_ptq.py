"""post_training_quantize: no labels, only quantizer values change, refusals leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import PACTConfig, export_onnx, load_from_checkpoint, post_training_quantize
from lightning_quant.surgery import injected_recipe


class SmallCNN(nn.Module):
    """conv-BN-ReLU twice, then a linear head: BatchNorm statistics to watch, three weight layers."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(width * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.head(x.flatten(1))


CONFIG = PACTConfig(act_bits=3, weight_bits=3, first_last="quantize")


def trained_model(seed: int = 0) -> SmallCNN:
    """A model with non-trivial BatchNorm statistics (a few training-mode forwards), returned in train mode."""
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 4, 4) * 2 + 0.5)
    return model


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def output_mse(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    return float(torch.mean((student.eval()(x) - teacher.eval()(x)) ** 2))


@pytest.mark.parametrize("batchnorm", ["keep", "reestimate"])
def test_inputs_alone_weights_teacher_and_flags_unchanged(batchnorm):
    model = trained_model()
    teacher = copy.deepcopy(model).eval()
    x = inputs()
    before = state(model)
    teacher_state, teacher_out = state(teacher), teacher(x)
    model.conv1.weight.requires_grad_(False)  # a frozen layer: its quantizer must still be fitted
    plan = post_training_quantize(
        model,
        CONFIG,
        DataLoader(x, batch_size=16),
        steps=10,
        calibration_batches=2,
        teacher=teacher,
        batchnorm=batchnorm,
    )
    assert plan.quantized and injected_recipe(model) is not None
    after = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    statistics = {k for k in before if k.startswith(("bn1.", "bn2.")) and k not in params}
    for key, value in before.items():  # weights and biases bit-identical; BatchNorm statistics unless re-estimated
        assert torch.equal(after[key], value) != (batchnorm == "reestimate" and key in statistics), key
    assert model.training and all(m.training for m in model.modules())  # the training flag is restored
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    assert not teacher.training and same_state(state(teacher), teacher_state)  # the caller's teacher: untouched
    assert torch.equal(teacher(x), teacher_out)
    assert any(k.endswith(("alpha", "step")) for k in after.keys() - before.keys())


class MLP(nn.Module):
    """float Linear, ReLU (quantized: it feeds a quantized layer), quantized Linear, BatchNorm, ReLU, float Linear.

    The one BatchNorm sees only quantized values and has no BatchNorm before it, so its input during re-estimation
    is exactly its input in the final eval-mode model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.bn(self.fc2(self.relu1(self.fc1(x))))))


def test_batchnorm_reestimated_on_the_quantized_model_float64():
    torch.manual_seed(0)
    model = MLP().double()
    batches = [torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    trained_mean, trained_var = model.bn.running_mean.clone(), model.bn.running_var.clone()
    post_training_quantize(model, PACTConfig(act_bits=2, weight_bits=2), batches, steps=0, calibration_batches=3)
    seen = []
    model.bn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for x in batches:
            model.eval()(x)  # the final quantized model: what feeds its BatchNorm now
    # momentum=None: the plain average over the batches of each batch's mean and unbiased variance
    expected_mean = sum(h.mean(0) for h in seen) / 3
    expected_var = sum(h.var(0, unbiased=True) for h in seen) / 3
    assert torch.allclose(model.bn.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(model.bn.running_var, expected_var, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model.bn.running_mean, trained_mean) and not torch.allclose(
        model.bn.running_var, trained_var
    )
    assert model.bn.momentum == 0.1 and int(model.bn.num_batches_tracked) == 3


def test_labels_never_read():
    x = inputs()

    class Poison(torch.utils.data.Dataset):
        """Pairs whose labels would crash anything that reads them."""

        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int):
            return x[i], "not a label"

    for loader in (
        DataLoader(Poison(), batch_size=16),
        [(x[i : i + 16], torch.full((16,), float("nan"))) for i in range(0, 64, 16)],
        [{"x": x[i : i + 16], "labels": object()} for i in range(0, 64, 16)],
    ):
        if isinstance(loader[0] if isinstance(loader, list) else None, dict):
            model = DictModel(trained_model())
        else:
            model = trained_model()
        post_training_quantize(model, CONFIG, loader, steps=2, calibration_batches=2)
        assert injected_recipe(model) is not None


class DictModel(nn.Module):
    """Takes its input as the keyword ``x`` (a dict batch is passed as keywords, ``labels`` dropped)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_fitting_lowers_the_mse_below_calibration():
    x = inputs(128)
    teacher = trained_model().eval()
    loader = DataLoader(TensorDataset(x), batch_size=32)
    calibrated, fitted = trained_model(), trained_model()
    # Clips at the largest value seen ("max") waste levels on outliers at 2 bits: fitting has room to improve.
    config = PACTConfig(act_bits=2, weight_bits=2, first_last="quantize")
    keep = {"calibration": "max", "calibration_batches": 4, "batchnorm": "keep"}  # the fit alone, against `teacher`
    post_training_quantize(calibrated, config, loader, steps=0, **keep)
    post_training_quantize(fitted, config, loader, steps=60, lr=0.02, **keep)
    assert output_mse(fitted, teacher, x) < 0.9 * output_mse(calibrated, teacher, x)


def test_frozen_model_quantizers_still_train():
    x = inputs(128)
    loader = DataLoader(TensorDataset(x), batch_size=32)
    calibrated, fitted = trained_model().requires_grad_(False), trained_model().requires_grad_(False)
    config = PACTConfig(act_bits=2, weight_bits=2, first_last="quantize")
    keep = {"calibration": "max", "calibration_batches": 4, "batchnorm": "keep"}
    post_training_quantize(calibrated, config, loader, steps=0, **keep)
    post_training_quantize(fitted, config, loader, steps=60, lr=0.02, **keep)
    moved = [k for k, v in calibrated.state_dict().items() if not torch.equal(v, fitted.state_dict()[k])]
    assert moved and all(k.endswith(("alpha", "step", "lower", "upper")) for k in moved)  # quantizer values only
    assert not any(p.requires_grad for p in fitted.parameters())  # the flags inject_quantizers gives: frozen


class Refuses2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.relu = nn.ReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.fc(x)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataloader": []}, r"`dataloader` yields no batch"),
        ({"steps": -1}, r"`steps` must be an int >= 0, got -1"),
        ({"steps": 2.5}, r"`steps` must be an int >= 0, got 2.5"),
        ({"lr": 0.0}, r"`lr` must be a finite number > 0, got 0.0"),
        ({"calibration_batches": 0}, r"`calibration_batches` must be an int >= 1.*got 0"),
        ({"config": "pact"}, r"`config` must be a PACTConfig or DSQConfig.*'pact'"),
        ({"batchnorm": "reset"}, r"`batchnorm` must be one of \('reestimate', 'keep'\), got 'reset'"),
        ({"dataloader": [inputs(1)]}, r"batches of one sample \(Tensor\[1, 1, 4, 4\]\).*batchnorm='keep'"),
        ({"dataloader": [inputs(16), inputs(1)]}, r"batches of one sample \(Tensor\[1, 1, 4, 4\]\)"),
        ({"dataloader": iter([inputs(16)])}, r"`dataloader` yielded no batch on a second pass.*one-shot iterator"),
        (
            {"dataloader": [(torch.zeros(8, 3, 4, 4), torch.zeros(8))]},
            r"a tuple of \(Tensor\[8, 3, 4, 4\], Tensor\[8\]\)",
        ),
    ],
)
def test_bad_input_refused_and_model_unchanged(kwargs, match):
    model = trained_model()
    before = state(model)
    args = {"config": CONFIG, "dataloader": DataLoader(inputs(), batch_size=16), **kwargs}
    with pytest.raises(ValueError, match=match):
        post_training_quantize(model, args.pop("config"), args.pop("dataloader"), **args)
    assert injected_recipe(model) is None and same_state(state(model), before)
    assert model.training


def test_bad_batch_names_structure_and_model_error():
    model = Refuses2D()
    batch = (torch.zeros(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a tuple of \(Tensor\[64, 1, 28, 28\], Tensor\[64\]\).*RuntimeError"):
        post_training_quantize(model, CONFIG, [batch])
    assert injected_recipe(model) is None


def test_model_with_quantizers_refused():
    model = trained_model()
    post_training_quantize(model, CONFIG, DataLoader(inputs(), batch_size=16), steps=0, calibration_batches=1)
    before = state(model)
    with pytest.raises(ValueError, match=r"`model` \(SmallCNN\) already holds quantizers"):
        post_training_quantize(model, CONFIG, DataLoader(inputs(), batch_size=16))
    assert same_state(state(model), before)


def test_checkpoint_and_onnx_of_the_result(tmp_path):
    pytest.importorskip("onnx")
    model = trained_model()
    post_training_quantize(model, CONFIG, DataLoader(inputs(), batch_size=16), steps=5, calibration_batches=2)
    path = tmp_path / "ptq.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"width": 8}}, path)
    loaded = load_from_checkpoint(SmallCNN, path)
    x = inputs(8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert export_onnx(loaded, x[:2], tmp_path / "ptq.onnx") == str(tmp_path / "ptq.onnx")


def test_calibrator_sample_bounds_the_search_and_stays_close():
    from lightning_quant.calibrator import ActivationCalibrator
    from lightning_quant.quantizers.pact import PACTActivation

    x = torch.randn(64, 8, 16, 16, generator=torch.Generator().manual_seed(0)).relu()  # 131k ReLU outputs

    def clip(max_samples):
        site = PACTActivation(3, alpha_init=6.0, calibrated=False)
        calibrator = ActivationCalibrator(site, "mse", num_batches=1, training_only=False, max_samples=max_samples)
        site(x)
        assert calibrator.done
        return float(site.alpha.detach())

    full, sampled = clip(None), clip(2**12)
    assert sampled == clip(2**12)  # a fixed-seed sample: the same clip every time
    assert sampled != full and abs(sampled - full) < 0.03 * full
    with pytest.raises(ValueError, match=r"`max_samples` must be None or an int >= 1, got 0"):
        ActivationCalibrator(PACTActivation(3, calibrated=False), max_samples=0)


def test_progress_lines_printed_and_logged(capsys, caplog):
    caplog.set_level("INFO", logger="lightning_quant.ptq")
    loader = DataLoader(inputs(), batch_size=16)
    post_training_quantize(trained_model(), CONFIG, loader, steps=4, log_every=2, calibration_batches=2, progress=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("post-training quantization")]
    assert any("clips calibrated on 2 batches" in line for line in printed)
    assert any("step 2/4" in line for line in printed) and any("step 4/4" in line for line in printed)
    assert [r.getMessage() for r in caplog.records if r.name == "lightning_quant.ptq"] == printed
    post_training_quantize(trained_model(), CONFIG, loader, steps=4, calibration_batches=2)  # progress=False
    assert "post-training quantization" not in capsys.readouterr().out
