"""Post-training quantization of a trained DemoCNN, without labels, vs torch.ao's eager PTQ and QAT fine-tuning time.

Not a test. Per data set and seed: DemoCNN is trained in FP32 as in ``benchmarks/accuracy.py`` (Adam 1e-3, batch
64, 8 epochs), then each row quantizes a copy of that same trained model and reports its test accuracy:

* FP32: the trained model.
* PTQ PACT WwAa: ``lightning_quant.post_training_quantize`` with ``PACTConfig(act_bits=a, weight_bits=w)`` (LSQ
  weights, clips calibrated then learned; first and last layers float) on 512 training images; the loader yields
  the images alone, so no label can be read.
* torch.ao PTQ WwAa: torch.ao's eager post-training quantization on the same places (the weights of conv2, conv3,
  fc1 and the outputs of relu1-relu3, as ``references.torch_ao_qat``), observers run on the same 512 images in eval
  mode, then frozen; evaluated as fake-quant. Two observer choices: ``MinMaxObserver`` on activations (torch.ao's
  ``default_qconfig``) and ``HistogramObserver`` (torch.ao's x86/fbgemm default); weights per-tensor symmetric
  ``MinMaxObserver`` in both (PACT's LSQ steps are per tensor too).

Cost: one post-training run (W4A4, calibration included) and one epoch of QAT fine-tuning of the same trained model
(``PACTCallback(4, 4)``, a Trainer epoch over the full training set with its validation pass) are timed side by side
in the same process.

Usage::

    python benchmarks/ptq.py --threads 1                                  # 4 seeds, both data sets
    python benchmarks/ptq.py --datasets digits --seeds 0 --threads 1      # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from accuracy import DATASETS, run_one
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import PACTCallback, PACTConfig, post_training_quantize

WIDTHS = ((8, 8), (8, 4), (4, 4))  # (weight bits, activation bits)
CALIBRATION_IMAGES = 512


def label(kind: str, w: int, a: int) -> str:
    return f"{kind} W{w}A{a}"


def calibration_loader(data: L.LightningDataModule, seed: int, batch_size: int = 128) -> DataLoader:
    """512 training images (a seeded draw) in 4 batches (``calibration_batches``' default), images only."""
    x = data.train_set.tensors[0]
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES]
    return DataLoader(TensorDataset(x[pick]), batch_size=batch_size, shuffle=True)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    mode = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(mode)
    return correct / total


def ptq_pact(model: nn.Module, loader: DataLoader, w: int, a: int, steps: int, lr: float) -> nn.Module:
    student = copy.deepcopy(model)
    post_training_quantize(student, PACTConfig(act_bits=a, weight_bits=w), loader, steps=steps, lr=lr)
    return student


def ptq_torch_ao(model: nn.Module, loader: DataLoader, w: int, a: int, histogram: bool) -> nn.Module:
    """torch.ao eager PTQ, fake-quant evaluation, on the places ``references.torch_ao_qat`` quantizes."""
    from torch.ao.quantization import (
        FakeQuantize,
        HistogramObserver,
        MinMaxObserver,
        QConfig,
        disable_observer,
        prepare_qat,
    )

    student = copy.deepcopy(model).eval()
    act_observer = HistogramObserver if histogram else MinMaxObserver
    activation = FakeQuantize.with_args(observer=act_observer, quant_min=0, quant_max=2**a - 1, dtype=torch.quint8)
    weight = FakeQuantize.with_args(
        observer=MinMaxObserver,
        quant_min=-(2 ** (w - 1)),
        quant_max=2 ** (w - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )
    for name in ("conv2", "conv3", "fc1"):
        getattr(student, name).qconfig = QConfig(activation=activation, weight=weight)
    student.train()  # prepare_qat wants training mode; the observers then run in eval mode (BatchNorm untouched)
    prepare_qat(student, inplace=True)
    for name in ("conv2", "conv3", "fc1"):
        getattr(student, name).activation_post_process = nn.Identity()  # BatchNorm follows: not quantized, as PACT
    for name in ("relu1", "relu2", "relu3"):
        setattr(student, name, nn.Sequential(nn.ReLU(), activation()))
    student.eval()
    with torch.no_grad():
        for (x,) in loader:
            student(x)
    student.apply(disable_observer)
    return student


def qat_epoch_seconds(model: nn.Module, data: L.LightningDataModule) -> float:
    """Wall time of one epoch of PACT W4A4 QAT fine-tuning of the trained model (Trainer.fit, validation included)."""
    student = copy.deepcopy(model)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PACTCallback(4, 4, verbose=False)],
    )
    start = time.perf_counter()
    trainer.fit(student, datamodule=data)
    return time.perf_counter() - start


def run_seed(dataset: str, seed: int, epochs: int, steps: int, lr: float) -> dict[str, float]:
    data_cls, _ = DATASETS[dataset]
    fp32_acc, model = run_one(dataset, seed, epochs, [], None)
    model.eval()
    data = data_cls(batch_size=64, seed=seed)
    data.setup("fit")
    test = data.test_dataloader()
    loader = calibration_loader(data, seed)
    out = {"FP32": fp32_acc}
    for w, a in WIDTHS:
        torch.manual_seed(seed)
        start = time.perf_counter()
        student = ptq_pact(model, loader, w, a, steps, lr)
        seconds = time.perf_counter() - start
        out[label("PTQ PACT", w, a)] = accuracy(student, test)
        if (w, a) == (4, 4):
            out["time: PTQ PACT W4A4 run (s)"] = seconds
        for histogram in (False, True):
            kind = "torch.ao PTQ " + ("histogram" if histogram else "min-max")
            out[label(kind, w, a)] = accuracy(ptq_torch_ao(model, loader, w, a, histogram), test)
    L.seed_everything(seed, verbose=False)
    out["time: QAT PACT W4A4 1 epoch (s)"] = qat_epoch_seconds(model, data)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="PTQ steps (default: post_training_quantize's)")
    parser.add_argument("--lr", type=float, default=None, help="PTQ relative lr (default: post_training_quantize's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ptq.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = post_training_quantize.__kwdefaults__
    steps = defaults["steps"] if args.steps is None else args.steps
    lr = defaults["lr"] if args.lr is None else args.lr

    results: dict[str, dict[str, list[float]]] = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            for key, value in run_seed(dataset, seed, args.epochs, steps, lr).items():
                results.setdefault(key, {}).setdefault(dataset, []).append(value)
                print(f"{dataset:8s} seed {seed} {key:36s} {value if 'time' in key else 100 * value:8.2f}", flush=True)
            args.out.with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    command = (
        f"python benchmarks/ptq.py --datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))}"
        f" --epochs {args.epochs} --threads {args.threads}"
    )
    write_table(results, args.datasets, args.seeds, steps, lr, command, args.out)


def _cell(values: list[float], scale: float) -> str:
    shown = [scale * v for v in values]
    per_seed = ", ".join(f"{v:.2f}" if scale == 100 else f"{v:.1f}" for v in shown)
    mean = statistics.mean(shown)
    return f"**{mean:.2f}** ({per_seed})" if scale == 100 else f"**{mean:.1f}** ({per_seed})"


def write_table(
    results: dict[str, dict[str, list[float]]],
    datasets: list[str],
    seeds: list[int],
    steps: int,
    lr: float,
    command: str,
    out: Path,
) -> None:
    """Markdown: mean over seeds in bold, then the per-seed values in seed order."""
    lines = [
        f"Test accuracy (%) of DemoCNN trained in FP32 (Adam 1e-3, batch 64, 8 epochs), then quantized after training"
        f" on {CALIBRATION_IMAGES} training images (labels unused); mean over seeds {seeds} in bold, per-seed values"
        f" in brackets. PTQ PACT: `post_training_quantize(steps={steps}, lr={lr})`. Times in seconds, one thread."
        f" Command: `{command}`",
        "",
        "| row | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for key, per_dataset in results.items():
        scale = 1 if key.startswith("time") else 100
        cells = [_cell(per_dataset[d], scale) if d in per_dataset else "-" for d in datasets]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
