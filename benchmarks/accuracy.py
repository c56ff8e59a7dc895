"""Test accuracy of the demo CNN under every method, on digits and MNIST-5k, as a markdown table.

Not a test: it trains ~23 configurations x seeds x data sets (about 25 minutes on 2 CPU cores for the defaults).
Every row uses the same model (DemoCNN), data split, optimizer (Adam, lr 1e-3), batch size and epochs; only the
quantization differs. Rows:

* FP32: no quantization.
* PACT WkAk: PACTCallback(act_bits=k, weight_bits=k) with the defaults (first and last layers float).
* PACT WkAk, fixed clip: the same, with every alpha frozen at its start (no learning): what learning the clip buys.
* torch.ao WkAk: torch.ao's eager QAT (``prepare_qat``; FakeQuantize with moving-average min/max observers,
  ``quant_min``/``quant_max`` set for k bits) on the same places: the ReLU outputs and the weights of the middle
  layers; the reference implementation most users would reach for.
* DSQ k-bit / STE k-bit: DSQCallback(act_bits=k, weight_bits=k) with the temperature learned per layer from 0.2
  (the paper's mode); the STE row is the same quantizer with the temperature held at 1 - 1e-6, where DSQ's
  backward is the straight-through estimator: the rows differ in the gradient only.
* QuantNoise intk (p = 0.5) vs QAT intk (p = 1, every weight quantized every step): QuantNoiseCallback, scalar mode,
  weights only, every layer.

Usage::

    python benchmarks/accuracy.py                                  # everything, 2 seeds, writes the table
    python benchmarks/accuracy.py --datasets digits --seeds 0 --groups pact   # a quick subset
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from references import torch_ao_qat

from lightning_quant import DSQCallback, PACTCallback, QuantNoiseCallback
from lightning_quant.demos import DemoCNN, DigitsDataModule, MNIST5kDataModule
from lightning_quant.quantizers.pact import PACTActivation

DATASETS = {"digits": (DigitsDataModule, 8), "mnist5k": (MNIST5kDataModule, 28)}


class FreezeClips(L.Callback):
    """Freezes every PACT alpha at its initial value (the fixed-clip baseline)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, PACTActivation):
                module.alpha.requires_grad_(False)


def rows(bits_list: list[int], groups: set[str]) -> list[tuple[str, str, Callable[[], list], Callable | None]]:
    """(group, label, callbacks factory, model transform) for every row."""
    out: list[tuple[str, str, Callable[[], list], Callable | None]] = []
    if "fp32" in groups:
        out.append(("fp32", "FP32", lambda: [], None))
    if "pact" in groups:
        for k in bits_list:
            out.append(("pact", f"PACT W{k}A{k}", lambda k=k: [PACTCallback(k, k, verbose=False)], None))
        for k in bits_list:
            out.append(
                (
                    "pact",
                    f"PACT W{k}A{k}, fixed clip",
                    lambda k=k: [PACTCallback(k, k, verbose=False), FreezeClips()],
                    None,
                )
            )
        for k in bits_list:
            out.append(("pact", f"torch.ao QAT W{k}A{k}", lambda: [], lambda m, k=k: torch_ao_qat(m, k)))
    if "dsq" in groups:
        for k in (4, 3, 2):
            out.append(
                (
                    "dsq",
                    f"DSQ W{k}A{k} (temperature learned from 0.2)",
                    lambda k=k: [DSQCallback(k, k, 0.2, learn_temperature=True, verbose=False)],
                    None,
                )
            )
        for k in (4, 3, 2):
            out.append(
                (
                    "dsq",
                    f"STE W{k}A{k} (DSQ grid, temperature 1)",
                    lambda k=k: [DSQCallback(k, k, 1 - 1e-6, verbose=False)],
                    None,
                )
            )
    if "quant_noise" in groups:
        for k in (8, 4):
            out.append(
                (
                    "quant_noise",
                    f"QuantNoise int{k} (p=0.5)",
                    lambda k=k: [QuantNoiseCallback(k, p=0.5, verbose=False)],
                    None,
                )
            )
            out.append(
                (
                    "quant_noise",
                    f"QAT int{k} (QuantNoise p=1)",
                    lambda k=k: [QuantNoiseCallback(k, p=1.0, verbose=False)],
                    None,
                )
            )
    return out


def run_one(
    dataset: str, seed: int, epochs: int, callbacks: list, transform: Callable | None
) -> tuple[float, L.LightningModule]:
    """Train one row's model on one seed; return its test accuracy and the trained model."""
    data_cls, size = DATASETS[dataset]
    L.seed_everything(seed, workers=True, verbose=False)
    data = data_cls(batch_size=64, seed=seed)
    model = DemoCNN(in_channels=1, num_classes=10, input_size=size, lr=1e-3)
    if transform is not None:
        transform(model)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    return float(result["test/acc"]), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"], choices=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3, 2])
    parser.add_argument("--groups", nargs="+", default=["fp32", "pact", "dsq", "quant_noise"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.md"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="only merge earlier runs' .json files (e.g. one per seed or data set) into one table at --out",
    )
    parser.add_argument("--exclude", nargs="+", default=[], help="with --merge: drop rows whose label matches")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        merged: dict[str, dict[str, list[float]]] = {}
        for path in args.merge:
            for label, per_dataset in json.loads(path.read_text()).items():
                if any(re.search(pattern, label) for pattern in args.exclude):
                    continue
                for dataset, accs in per_dataset.items():
                    merged.setdefault(label, {}).setdefault(dataset, []).extend(accs)
        datasets = [d for d in DATASETS if any(d in v for v in merged.values())]
        write_table(merged, datasets, args.epochs, "merged: " + " ".join(str(p) for p in args.merge), args.out)
        return

    table = rows(args.bits, set(args.groups))
    results: dict[str, dict[str, list[float]]] = {}
    raw_path = args.out.with_suffix(".json")
    for dataset in args.datasets:
        for _group, label, make_callbacks, transform in table:
            accs = []
            for seed in args.seeds:
                start = time.perf_counter()
                acc, _ = run_one(dataset, seed, args.epochs, make_callbacks(), transform)
                accs.append(acc)
                print(
                    f"{dataset:8s} {label:32s} seed {seed}: {100 * acc:6.2f}  ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            results.setdefault(label, {})[dataset] = accs
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(results, indent=1))

    command = "python benchmarks/accuracy.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in (("datasets", args.datasets), ("seeds", args.seeds), ("epochs", args.epochs))
    )
    write_table(results, args.datasets, args.epochs, command, args.out)


def write_table(
    results: dict[str, dict[str, list[float]]], datasets: list[str], epochs: int, command: str, out: Path
) -> None:
    """Write and print the markdown table: mean over seeds, min-max in brackets."""
    n_seeds = max((len(a) for per in results.values() for a in per.values()), default=0)
    lines = [
        f"Test accuracy (%), DemoCNN, Adam lr 1e-3, batch 64, {epochs} epochs, mean over seeds (min-max and the"
        f" number of seeds n in brackets; up to {n_seeds}). Command: `{command}`",
        "",
        "| row | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for label, per_dataset in results.items():
        cells = []
        for dataset in datasets:
            accs = [100 * a for a in per_dataset.get(dataset, [])]
            cells.append(
                f"{statistics.mean(accs):.2f} ({min(accs):.1f}-{max(accs):.1f}, n={len(accs)})" if accs else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
