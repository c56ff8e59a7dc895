"""Post-training quantization of a trained DemoCNN, without labels, vs torch.ao's eager PTQ and QAT fine-tuning time.

Not a test. Per data set and seed, the trained FP32 model is the fine-tune protocol's starting point of
``benchmarks/accuracy.py`` (DemoCNN, Adam 1e-3, batch 64, 8 epochs; saved under ``--weights-dir`` and reused), and
each row quantizes a copy of that same model and reports its test accuracy:

* FP32: the trained model. FP32 + BN re-estimation (control): the same with its BatchNorm statistics re-estimated
  on the calibration images, nothing quantized (what re-estimation alone does to the float model).
* PTQ PACT WwAa: ``lightning_quant.post_training_quantize`` with ``PACTConfig(act_bits=a, weight_bits=w)`` and its
  defaults (LSQ weights, clips calibrated then fitted, BatchNorm statistics re-estimated; first and last layers
  float) on 512 training images (a seeded draw, 4 batches of 128); the loader yields the images alone, so no label
  can be read. "BN kept, 20 steps" rows: the previous defaults, ``batchnorm="keep", steps=20`` (BatchNorm
  statistics as trained, 20 Adam steps fitting the clips and weight steps to the FP32 outputs).
* torch.ao PTQ WwAa: torch.ao's eager post-training quantization on the same places as PTQ PACT (the weights of
  conv2, conv3, fc1, the outputs of relu1-relu3, and fc1's input: the average pool of relu3's output, which PACT
  quantizes with an input quantizer), observers run on the same 512 images in eval mode, then frozen; evaluated as
  fake-quant. Both observer choices: ``MinMaxObserver`` on activations (torch.ao's
  ``default_qconfig``) and ``HistogramObserver`` (torch.ao's x86/fbgemm default); weights per-tensor symmetric
  ``MinMaxObserver`` in both (PACT's LSQ steps are per tensor too). "+ BN re-estimation" rows: then the same
  BatchNorm re-estimation as PTQ PACT's (the same function, the same images), so the comparison is like for like.
* QAT rows (MNIST-5k): PACT W8A8 and W4A4 of the accuracy benchmark's fine-tune protocol (4 epochs at lr 2e-4 from
  the same FP32 weights, same seeds), read from ``benchmarks/results/accuracy_finetune_<dataset>_s<seed>.json``.

Cost, side by side in the same process: one post-training run (PTQ PACT W4A4 with the defaults, calibration and
re-estimation included) and one epoch of PACT W4A4 QAT fine-tuning of the same trained model over the full training
set (``PACTCallback(4, 4)``, ``Trainer.fit`` for one epoch, no validation pass).

Usage::

    python benchmarks/ptq.py --threads 1                                  # 4 seeds, both data sets
    python benchmarks/ptq.py --datasets digits --seeds 0 --threads 1      # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from accuracy import DATASETS, fp32_base
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import PACTCallback, PACTConfig, post_training_quantize
from lightning_quant.demos import DemoCNN
from lightning_quant.ptq import _reestimate_batchnorm

WIDTHS = ((8, 8), (8, 4), (4, 4))  # (weight bits, activation bits)
KEPT = ", BN kept, 20 steps (previous default)"
CALIBRATION_IMAGES = 512
QAT_ROWS = {"pact_w8a8": "QAT PACT W8A8 (fine-tune, 4 epochs)", "pact_w4a4": "QAT PACT W4A4 (fine-tune, 4 epochs)"}
PTQ_TIME, QAT_TIME, RATIO = (
    "time: PTQ PACT W4A4 run (s)",
    "time: QAT PACT W4A4 1 epoch (s)",
    "time ratio: PTQ run / QAT epoch",
)


def label(kind: str, w: int, a: int, suffix: str = "") -> str:
    return f"{kind} W{w}A{a}{suffix}"


def calibration_loader(data: L.LightningDataModule, seed: int, batch_size: int = 128) -> DataLoader:
    """512 training images (a seeded draw) in 4 batches (``calibration_batches``' default), images only."""
    x = data.train_set.tensors[0]
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES]
    return DataLoader(TensorDataset(x[pick]), batch_size=batch_size, shuffle=True)


def images(loader: DataLoader) -> list[torch.Tensor]:
    """The calibration batches as a list (what ``post_training_quantize`` re-estimates BatchNorm on)."""
    return [x for (x,) in loader]


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


def ptq_pact(model: nn.Module, loader: DataLoader, w: int, a: int, **kwargs) -> tuple[nn.Module, float]:
    """A quantized copy of ``model`` and the seconds ``post_training_quantize`` took on it."""
    student = copy.deepcopy(model)
    torch.manual_seed(0)  # the loader's shuffle
    start = time.perf_counter()
    post_training_quantize(student, PACTConfig(act_bits=a, weight_bits=w), loader, **kwargs)
    return student, time.perf_counter() - start


def with_bn_reestimated(model: nn.Module, loader: DataLoader) -> nn.Module:
    """``model`` (a copy when it is the FP32 one) with post_training_quantize's BatchNorm re-estimation applied."""
    model.eval()
    _reestimate_batchnorm(model, images(loader), None)
    return model


def ptq_torch_ao(model: nn.Module, loader: DataLoader, w: int, a: int, histogram: bool) -> nn.Module:
    """torch.ao eager PTQ, fake-quant evaluation, on the places PTQ PACT quantizes (module docstring)."""
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
    # fc1's input, the average pool of relu3's quantized output, is off the grid: PACT puts an input quantizer there
    # (LSQ+, an affine range at `a` bits), so torch.ao's rows quantize it too, with the same observer.
    student.pool = nn.Sequential(student.pool, activation())
    student.eval()
    with torch.no_grad():
        for (x,) in loader:
            student(x)
    student.apply(disable_observer)
    return student


def qat_epoch_seconds(model: nn.Module, data: L.LightningDataModule) -> float:
    """Wall time of one epoch of PACT W4A4 QAT fine-tuning of the trained model (Trainer.fit, no validation)."""
    student = copy.deepcopy(model)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[PACTCallback(4, 4, verbose=False)],
    )
    start = time.perf_counter()
    trainer.fit(student, datamodule=data)
    return time.perf_counter() - start


def qat_rows(dataset: str, seed: int, results_dir: Path) -> dict[str, float]:
    """The accuracy benchmark's fine-tune QAT rows for this (data set, seed), where its JSON file holds them."""
    path = results_dir / f"accuracy_finetune_{dataset}_s{seed}.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {name: rows[key]["acc"] for key, name in QAT_ROWS.items() if key in rows}


def trained(dataset: str, seed: int, weights_dir: Path) -> tuple[nn.Module, float, L.LightningDataModule]:
    """The trained FP32 model (eval mode), its test accuracy and its data (set up for fitting)."""
    data_cls, size = DATASETS[dataset]
    state, fp32_acc, _ = fp32_base(dataset, seed, weights_dir)
    model = DemoCNN(in_channels=1, num_classes=10, input_size=size)
    model.load_state_dict(state)
    data = data_cls(batch_size=64, seed=seed)
    data.setup("fit")
    return model.eval(), fp32_acc, data


def run_seed(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    model, fp32_acc, data = trained(dataset, seed, args.weights_dir)
    test = data.test_dataloader()
    loader = calibration_loader(data, seed)
    ptq_kwargs = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    out = {
        "FP32": fp32_acc,
        "FP32 + BN re-estimation (control)": accuracy(with_bn_reestimated(copy.deepcopy(model), loader), test),
    }
    for w, a in WIDTHS:
        student, seconds = ptq_pact(model, loader, w, a, **ptq_kwargs)
        out[label("PTQ PACT", w, a)] = accuracy(student, test)
        if (w, a) == (4, 4):
            out[PTQ_TIME] = seconds
            L.seed_everything(seed, verbose=False)
            out[QAT_TIME] = qat_epoch_seconds(model, data)  # right after, in the same process
            out[RATIO] = out[PTQ_TIME] / out[QAT_TIME]
        student, _ = ptq_pact(model, loader, w, a, batchnorm="keep", steps=20, lr=0.01)
        out[label("PTQ PACT", w, a, KEPT)] = accuracy(student, test)
        for histogram in (False, True):
            kind = "torch.ao PTQ " + ("histogram" if histogram else "min-max")
            student = ptq_torch_ao(model, loader, w, a, histogram)
            out[label(kind, w, a)] = accuracy(student, test)
            out[label(kind, w, a, " + BN re-estimation")] = accuracy(with_bn_reestimated(student, loader), test)
    out.update(qat_rows(dataset, seed, args.out.parent))
    return out


ROW_ORDER = [
    "FP32",
    "FP32 + BN re-estimation (control)",
    *[
        label(kind, w, a, suffix)
        for w, a in WIDTHS
        for kind, suffix in (
            ("PTQ PACT", ""),
            ("PTQ PACT", KEPT),
            ("torch.ao PTQ min-max", ""),
            ("torch.ao PTQ histogram", ""),
            ("torch.ao PTQ min-max", " + BN re-estimation"),
            ("torch.ao PTQ histogram", " + BN re-estimation"),
        )
    ],
    *QAT_ROWS.values(),
    PTQ_TIME,
    QAT_TIME,
    RATIO,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="PTQ steps (default: post_training_quantize's)")
    parser.add_argument("--lr", type=float, default=None, help="PTQ relative lr (default: post_training_quantize's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--weights-dir", type=Path, default=Path("/tmp/lightning_quant_fp32"), help="saved FP32 starting points"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ptq.md"))
    parser.add_argument(
        "--ablation", action="store_true", help="the fitting-step ablation instead (benchmarks/results/ptq_ablation.md)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ablation:
        ablation(args)
        return
    defaults = post_training_quantize.__kwdefaults__
    steps = defaults["steps"] if args.steps is None else args.steps
    lr = defaults["lr"] if args.lr is None else args.lr

    results: dict[str, dict[str, dict[str, float]]] = {}  # row -> data set -> seed -> value
    for dataset in args.datasets:
        for seed in args.seeds:
            for key, value in run_seed(dataset, seed, args).items():
                results.setdefault(key, {}).setdefault(dataset, {})[str(seed)] = value
                shown = value if key.startswith("time") else 100 * value
                print(f"{dataset:8s} seed {seed} {key:52s} {shown:8.2f}", flush=True)
            args.out.with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    command = (
        f"python benchmarks/ptq.py --datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))}"
        f" --threads {args.threads}"
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + (f" --lr {args.lr}" if args.lr is not None else "")
    )
    write_table(results, args.datasets, steps, lr, command, args.out)


ABLATION = {  # label -> post_training_quantize keywords
    "BN re-estimated, 0 steps": {"steps": 0},
    "BN re-estimated, 20 steps, lr 0.01": {"steps": 20, "lr": 0.01},
    "BN re-estimated, 10 steps, lr 0.003 (default)": {"steps": 10, "lr": 0.003},
    "BN re-estimated, 10 steps, lr 0.001": {"steps": 10, "lr": 0.001},
    "BN kept, 0 steps": {"batchnorm": "keep", "steps": 0},
    "BN kept, 20 steps, lr 0.01": {"batchnorm": "keep", "steps": 20, "lr": 0.01},
}


class _PutBack(logging.Handler):
    """Counts post_training_quantize's "values kept" lines: fitting that raised the MSE and was undone."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "kept" in record.getMessage()


def ablation(args: argparse.Namespace) -> None:
    """PTQ PACT W8A4 and W4A4 under each ``ABLATION`` setting: mean accuracy, and how often fitting was undone."""
    counter = _PutBack()
    logger = logging.getLogger("lightning_quant.ptq")
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    results: dict[str, dict[str, list[float]]] = {}
    undone: dict[str, list[int]] = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            model, _, data = trained(dataset, seed, args.weights_dir)
            test, loader = data.test_dataloader(), calibration_loader(data, seed)
            for name, kwargs in ABLATION.items():
                for w, a in WIDTHS[1:]:
                    before = counter.count
                    student, _ = ptq_pact(model, loader, w, a, **kwargs)
                    acc = accuracy(student, test)
                    results.setdefault(name, {}).setdefault(f"{dataset} W{w}A{a}", []).append(acc)
                    undone.setdefault(name, []).append(counter.count - before)
                    print(f"{dataset} seed {seed} {name:40s} W{w}A{a} {100 * acc:6.2f}", flush=True)
    columns = list(next(iter(results.values())))
    lines = [
        f"PTQ PACT on the `benchmarks/ptq.py` models and 512 calibration images, mean test accuracy (%) over seeds"
        f" {args.seeds}; the last column counts the runs whose fitting steps raised the MSE on the calibration set"
        f" and were undone. Command: `python benchmarks/ptq.py --ablation --datasets {' '.join(args.datasets)}"
        f" --seeds {' '.join(map(str, args.seeds))} --threads {args.threads}`",
        "",
        "| setting | " + " | ".join(columns) + " | fitting undone |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name, per_column in results.items():
        means = [f"{100 * statistics.mean(per_column[c]):.2f}" for c in columns]
        steps = ABLATION[name].get("steps", 0)
        runs = len(undone[name])
        lines.append(f"| {name} | " + " | ".join(means) + f" | {f'{sum(undone[name])} of {runs}' if steps else '-'} |")
    out = args.out.with_name("ptq_ablation.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cell(per_seed: dict[str, float], key: str, fp32: float | None) -> str:
    """Mean in bold (and its gap to FP32's mean), then the per-seed values in seed order."""
    values = list(per_seed.values())
    mean = statistics.mean(values)
    if key.startswith("time ratio"):
        return f"**{mean:.2f}** ({', '.join(f'{v:.2f}' for v in values)})"
    if key.startswith("time"):
        return f"**{mean:.1f}** ({', '.join(f'{v:.1f}' for v in values)})"
    gap = "" if fp32 is None or key == "FP32" else f" {100 * (mean - fp32):+.2f}"
    return f"**{100 * mean:.2f}**{gap} ({', '.join(f'{100 * v:.1f}' for v in values)})"


def write_table(
    results: dict[str, dict[str, dict[str, float]]],
    datasets: list[str],
    steps: int,
    lr: float,
    command: str,
    out: Path,
) -> None:
    """Markdown: per data set the mean over seeds in bold, its gap to FP32's mean, then the per-seed values."""
    seeds = {d: sorted({s for row in results.values() for s in row.get(d, {})}, key=int) for d in datasets}
    lines = [
        f"Test accuracy (%) of DemoCNN trained in FP32 (Adam 1e-3, batch 64, 8 epochs), then quantized after training"
        f" on {CALIBRATION_IMAGES} training images (labels unused): mean over seeds in bold, its gap to FP32's mean,"
        f" per-seed values in brackets (seeds: {'; '.join(f'{d} {seeds[d]}' for d in datasets)}). PTQ PACT:"
        f" `post_training_quantize(steps={steps}, lr={lr})` defaults otherwise. Times in seconds, one thread, side"
        f" by side in one process on a shared 2-core machine. Command: `{command}`",
        "",
        "| row | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    keys = [k for k in ROW_ORDER if k in results] + [k for k in results if k not in ROW_ORDER]
    for key in keys:
        cells = []
        for d in datasets:
            fp32 = statistics.mean(results["FP32"][d].values()) if d in results.get("FP32", {}) else None
            cells.append(_cell(results[key][d], key, fp32) if d in results[key] else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
