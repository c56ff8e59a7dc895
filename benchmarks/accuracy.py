"""Test accuracy of the demo CNN under every method, on digits and MNIST-5k, as markdown tables. Not a test.

Two protocols, the same model (DemoCNN), data split, batch size (64) and seeds in every row; only the quantization
differs:

* ``scratch``: every row trains from random weights for 8 epochs with Adam at lr 1e-3.
* ``finetune``: per (data set, seed), FP32 trains once (8 epochs, Adam 1e-3) and its weights are saved; every
  quantized row then starts from those weights and fine-tunes for 4 epochs with Adam at lr 2e-4 (the model's
  ``lr``). The FP32 row is that trained float model; the control row "FP32 + 4 epochs" fine-tunes it like the
  others with no quantization.

Rows (``--groups`` picks groups, ``--rows`` picks rows by key; the table says which layers each quantizes):

* ``fp32``: FP32 (and, fine-tune only, the control ``fp32_more``).
* ``pact``: ``PACTCallback(act_bits=k, weight_bits=k)`` with its defaults (LSQ weights, clips calibrated on the
  first batch, first and last layers float), k = 8, 4, 3, 2.
* ``pact_all``: the same with ``first_last="quantize"`` (every layer), k = 4, 2.
* ``pact_paper``: what the new defaults change, k = 4, 2: DoReFa weights (``weight_quantizer="dorefa"``), and
  the paper's fixed start clip (``alpha_init=10, alpha_weight_decay=2e-4``).
* ``dsq``: ``DSQCallback(k, k)`` with its defaults, k = 8, 4, 3, 2.
* ``quant_noise``: ``QuantNoiseCallback(bits=k)`` (p = 0.5, every layer's weights), k = 8, 4.
* ``torch_ao``: torch.ao eager QAT (``references.torch_ao_qat``) on PACT's default places, k = 4, 2.
* ``brevitas``: Brevitas QAT (``references.brevitas_qat``) on the same places, k = 4, 2 (needs ``pip install
  brevitas``, the ``bench`` extra).

Each (protocol, data set, seed) gets its own JSON file in ``--out`` (accuracy per row and the seconds each run
took); rows already in it are kept, so runs can add rows later. After every run the script merges every JSON file
of the protocol into ``accuracy_finetune.md`` or ``accuracy.md`` (mean, min-max and per-seed values per row);
``--merge`` only merges. Reported numbers use ``--threads 1``: the thread count changes the order of torch's CPU
reductions, which alone moves a seed's result by about a point.

Usage::

    # two processes sharing the seeds (job 0 takes seeds 0 and 2, job 1 seeds 1 and 3)
    for j in 0 1; do python benchmarks/accuracy.py --protocol finetune --datasets mnist5k --seeds 0 1 2 3 \\
        --jobs 2 --job $j --threads 1 & done; wait
    python benchmarks/accuracy.py --merge --protocol finetune scratch
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from references import brevitas_qat, torch_ao_qat

from lightning_quant import DSQCallback, PACTCallback, QuantNoiseCallback
from lightning_quant.demos import DemoCNN, DigitsDataModule, MNIST5kDataModule

DATASETS = {"digits": (DigitsDataModule, 8), "mnist5k": (MNIST5kDataModule, 28)}
PROTOCOLS = {
    # protocol: (epochs, lr, table file)
    "scratch": (8, 1e-3, "accuracy.md"),
    "finetune": (4, 2e-4, "accuracy_finetune.md"),
}
BASE_EPOCHS, BASE_LR = 8, 1e-3  # the FP32 model the fine-tune protocol starts from

# Which layers each kind of row quantizes (DemoCNN: conv1-relu1, conv2-relu2, conv3-relu3, pool, fc1-relu4, fc2),
# as the table's "layers" column and the legend under it.
MIDDLE, EVERY, WEIGHTS_ONLY = "middle", "every", "all weights"
LAYERS = {
    "none": "nothing quantized.",
    MIDDLE: "weights of conv2, conv3, fc1 and the outputs of relu1-3 (the inputs of conv2, conv3, fc1); conv1, fc2"
    " and relu4 (the input of fc2) float: PACT's and DSQ's default, and the places the torch.ao and Brevitas rows"
    " quantize.",
    EVERY: 'weights of conv1, conv2, conv3, fc1, fc2 and the outputs of relu1-4 (`first_last="quantize"`).',
    WEIGHTS_ONLY: "weights of conv1, conv2, conv3, fc1, fc2; activations float (QuantNoise's default).",
}


@dataclass
class Row:
    """One row of the table.

    Args:
        key: Short name for ``--rows``.
        group: Group name for ``--groups``.
        label: The row's label in the table.
        layers: Which layers it quantizes (W: weights, A: activations).
        callbacks: Builds the row's fresh Lightning callbacks.
        transform: Edits the model in place before training (the reference implementations), or None.
        protocols: The protocols the row belongs to.
    """

    key: str
    group: str
    label: str
    layers: str
    callbacks: Callable[[], list] = field(default=lambda: [])
    transform: Callable[[torch.nn.Module], None] | None = None
    protocols: tuple[str, ...] = ("scratch", "finetune")


def all_rows() -> list[Row]:
    """Every row, in table order."""
    out = [
        Row("fp32", "fp32", "FP32", "none"),
        Row("fp32_more", "fp32", "FP32 + 4 epochs at lr 2e-4 (control)", "none", protocols=("finetune",)),
    ]
    for k in (8, 4, 3, 2):
        out.append(
            Row(f"pact_w{k}a{k}", "pact", f"PACT W{k}A{k}", MIDDLE, lambda k=k: [PACTCallback(k, k, verbose=False)])
        )
    for k in (4, 2):
        out.append(
            Row(
                f"pact_all_w{k}a{k}",
                "pact_all",
                f"PACT W{k}A{k}, every layer",
                EVERY,
                lambda k=k: [PACTCallback(k, k, first_last="quantize", verbose=False)],
            )
        )
    for k in (4, 2):
        out.append(
            Row(
                f"pact_dorefa_w{k}a{k}",
                "pact_paper",
                f"PACT W{k}A{k}, DoReFa weights",
                MIDDLE,
                lambda k=k: [PACTCallback(k, k, weight_quantizer="dorefa", verbose=False)],
            )
        )
        out.append(
            Row(
                f"pact_clip10_w{k}a{k}",
                "pact_paper",
                f"PACT W{k}A{k}, clip 10 + L2 2e-4 (paper)",
                MIDDLE,
                lambda k=k: [PACTCallback(k, k, alpha_init=10.0, alpha_weight_decay=2e-4, verbose=False)],
            )
        )
    for k in (8, 4, 3, 2):
        out.append(Row(f"dsq_w{k}a{k}", "dsq", f"DSQ W{k}A{k}", MIDDLE, lambda k=k: [DSQCallback(k, k, verbose=False)]))
    for k in (8, 4):
        out.append(
            Row(
                f"qn_int{k}",
                "quant_noise",
                f"QuantNoise int{k} (p=0.5)",
                WEIGHTS_ONLY,
                lambda k=k: [QuantNoiseCallback(bits=k, p=0.5, verbose=False)],
            )
        )
    for k in (4, 2):
        out.append(
            Row(
                f"ao_w{k}a{k}",
                "torch_ao",
                f"torch.ao QAT W{k}A{k}",
                MIDDLE,
                transform=lambda m, k=k: torch_ao_qat(m, k),
            )
        )
    for k in (4, 2):
        out.append(
            Row(
                f"brevitas_w{k}a{k}",
                "brevitas",
                f"Brevitas W{k}A{k}",
                MIDDLE,
                transform=lambda m, k=k: brevitas_qat(m, k),
            )
        )
    return out


def run_one(
    dataset: str,
    seed: int,
    epochs: int,
    callbacks: list,
    transform: Callable | None,
    lr: float = 1e-3,
    init_state: dict[str, torch.Tensor] | None = None,
) -> tuple[float, L.LightningModule]:
    """Train one row's model on one seed and test it.

    Args:
        dataset: Key of ``DATASETS``.
        seed: Seed of the data split, the initial weights and the batch order.
        epochs: Training epochs.
        callbacks: The row's Lightning callbacks (fresh ones: they hold state).
        transform: Edits the model in place before training, after ``init_state`` is loaded; or None.
        lr: Adam learning rate (the model's ``lr``).
        init_state: Float weights to start from (the fine-tune protocol), or None for random ones.

    Returns:
        The test accuracy (a fraction) and the trained model.
    """
    data_cls, size = DATASETS[dataset]
    L.seed_everything(seed, workers=True, verbose=False)
    data = data_cls(batch_size=64, seed=seed)
    model = DemoCNN(in_channels=1, num_classes=10, input_size=size, lr=lr)
    if init_state is not None:
        model.load_state_dict(init_state)
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


def fp32_base(dataset: str, seed: int, weights_dir: Path) -> tuple[dict[str, torch.Tensor], float, float]:
    """The fine-tune protocol's starting point: FP32 trained for 8 epochs at lr 1e-3, saved and reused.

    Returns:
        Its weights, its test accuracy and the seconds its training and test took.
    """
    path = weights_dir / f"fp32_{dataset}_s{seed}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["state_dict"], saved["acc"], saved["seconds"]
    start = time.perf_counter()
    acc, model = run_one(dataset, seed, BASE_EPOCHS, [], None, lr=BASE_LR)
    seconds = time.perf_counter() - start
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "acc": acc, "seconds": seconds}, path)
    return state, acc, seconds


def json_path(out: Path, protocol: str, dataset: str, seed: int) -> Path:
    """Where one (protocol, data set, seed) stores its rows."""
    return out / f"accuracy_{protocol}_{dataset}_s{seed}.json"


def run_seed(protocol: str, dataset: str, seed: int, rows: list[Row], args: argparse.Namespace) -> None:
    """Run the rows of one (protocol, data set, seed), writing its JSON file after every row."""
    epochs, lr, _ = PROTOCOLS[protocol]
    path = json_path(args.out, protocol, dataset, seed)
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(protocol=protocol, dataset=dataset, seed=seed, epochs=epochs, lr=lr, threads=torch.get_num_threads())
    record.setdefault("rows", {})
    init_state = None
    if protocol == "finetune":
        init_state, base_acc, base_seconds = fp32_base(dataset, seed, args.weights_dir)
        record.update(base_epochs=BASE_EPOCHS, base_lr=BASE_LR)
    for row in rows:
        if protocol == "finetune" and row.key == "fp32":
            acc, seconds = base_acc, base_seconds
        else:
            start = time.perf_counter()
            acc, _ = run_one(dataset, seed, epochs, row.callbacks(), row.transform, lr=lr, init_state=init_state)
            seconds = time.perf_counter() - start
        record["rows"][row.key] = {"label": row.label, "acc": acc, "seconds": round(seconds, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{protocol:8s} {dataset:8s} seed {seed} {row.label:42s} {100 * acc:6.2f}  ({seconds:.0f} s)", flush=True)


def merge(protocol: str, out: Path) -> None:
    """Write the protocol's markdown table from every JSON file of it in ``out``: one table per data set."""
    epochs, lr, table_name = PROTOCOLS[protocol]
    records = [json.loads(p.read_text()) for p in sorted(out.glob(f"accuracy_{protocol}_*_s*.json"))]
    if not records:
        return
    by_key = {row.key: row for row in all_rows()}
    if protocol == "scratch":
        setup = f"every row trains from random weights for {epochs} epochs, Adam lr {lr:g}"
    else:
        setup = (
            f"FP32 trains {BASE_EPOCHS} epochs at Adam lr {BASE_LR:g}; every other row starts from those weights and"
            f" fine-tunes {epochs} epochs at Adam lr {lr:g}"
        )
    lines = [
        f"Test accuracy (%) of DemoCNN, protocol `{protocol}`: {setup}; batch 64; same data split and seed-dependent"
        " initial weights and batch order in every row. Mean over seeds, min-max, the gap to FP32's mean, each seed's"
        " value, and the mean seconds per run (2-core CPU shared with other jobs, so the times are rough).",
        "",
        "Layers (DemoCNN is conv1-bn-relu1, conv2-bn-relu2, conv3-bn-relu3, pool, fc1-bn-relu4, fc2; its input is"
        " never quantized):",
        "",
        *(f"- {name}: {text}" for name, text in LAYERS.items()),
    ]
    threads = sorted({r["threads"] for r in records})
    if threads != [1]:
        lines += ["", f"**Not all runs used `--threads 1`** (threads seen: {threads}): not for reporting."]
    for dataset in DATASETS:
        per_dataset = [r for r in records if r["dataset"] == dataset]
        if not per_dataset:
            continue
        seeds = sorted(r["seed"] for r in per_dataset)
        keys = [k for k in by_key if any(k in r["rows"] for r in per_dataset)]
        keys += sorted({k for r in per_dataset for k in r["rows"]} - set(keys))
        fp32 = [100 * r["rows"]["fp32"]["acc"] for r in per_dataset if "fp32" in r["rows"]]
        fp32_mean = statistics.mean(fp32) if fp32 else None
        lines += [
            "",
            f"### {dataset} (seeds {', '.join(map(str, seeds))})",
            "",
            f"| row | layers | mean | min-max | vs FP32 | per seed ({', '.join(map(str, seeds))}) | s/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in keys:
            found = {r["seed"]: r["rows"][key] for r in per_dataset if key in r["rows"]}
            accs = [100 * v["acc"] for v in found.values()]
            mean = statistics.mean(accs)
            gap = "" if fp32_mean is None or key == "fp32" else f"{mean - fp32_mean:+.2f}"
            per_seed = " ".join(f"{100 * found[s]['acc']:.1f}" if s in found else "-" for s in seeds)
            seconds = statistics.mean(v["seconds"] for v in found.values())
            label = by_key[key].label if key in by_key else next(iter(found.values()))["label"]
            layers = by_key[key].layers if key in by_key else "?"
            n = "" if len(accs) == len(seeds) else f" (n={len(accs)})"
            lines.append(
                f"| {label} | {layers} | {mean:.2f}{n} | {min(accs):.1f}-{max(accs):.1f} | {gap} | {per_seed} |"
                f" {seconds:.0f} |"
            )
    if protocol == "finetune":
        lines += ["", "The FP32 row's seconds are its 8-epoch training; every other row's are its 4-epoch fine-tune."]
    text = "\n".join(lines) + "\n"
    (out / table_name).write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", nargs="+", default=["finetune", "scratch"], choices=sorted(PROTOCOLS))
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    groups = sorted({row.group for row in all_rows()})
    parser.add_argument("--groups", nargs="+", default=groups, choices=groups)
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default: every row of --groups)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; 1 for reported numbers")
    parser.add_argument("--jobs", type=int, default=1, help="number of processes sharing the seeds")
    parser.add_argument("--job", type=int, default=0, help="this process's index: it runs seeds[job::jobs]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder of the JSON and tables")
    parser.add_argument(
        "--weights-dir", type=Path, default=Path("/tmp/lightning_quant_fp32"), help="saved FP32 starting points"
    )
    parser.add_argument("--merge", action="store_true", help="only merge the JSON files in --out into the tables")
    args = parser.parse_args()
    if args.merge:
        for protocol in args.protocol:
            merge(protocol, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    table = all_rows()
    if args.rows is not None:
        unknown = set(args.rows) - {row.key for row in table}
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; known: {[row.key for row in table]}")
        table = [row for row in table if row.key in args.rows]
    else:
        table = [row for row in table if row.group in args.groups]
    seeds = args.seeds[args.job :: args.jobs]
    for protocol in args.protocol:
        for dataset in args.datasets:
            for seed in seeds:
                run_seed(protocol, dataset, seed, [r for r in table if protocol in r.protocols], args)
        merge(protocol, args.out)


if __name__ == "__main__":
    main()
