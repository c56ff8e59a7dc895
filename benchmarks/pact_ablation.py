"""PACT at low bit widths: what the clip's start, learning rate and L2 penalty do to test accuracy. Not a test.

Same setup as ``benchmarks/accuracy.py`` (DemoCNN on MNIST-5k, Adam 1e-3, batch 64, 8 epochs, the same seeded splits);
each row changes one PACTCallback argument from its default and reports the mean test accuracy over the seeds and the
clips the three quantized activations ended at. It records what was tried for issue 3's W2A2 target.

Usage::

    python benchmarks/pact_ablation.py --bits 2 --seeds 0 1 2 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from accuracy import run_one

from lightning_quant import PACTCallback
from lightning_quant.quantizers.pact import PACTActivation

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults (alpha_init 10, alpha_lr 0.01, L2 2e-4)": {},
    "alpha_init 2": {"alpha_init": 2.0},
    "alpha_init 3": {"alpha_init": 3.0},
    "alpha_init 6": {"alpha_init": 6.0},
    "alpha_weight_decay 0": {"alpha_weight_decay": 0.0},
    "alpha_lr 0.001": {"alpha_lr": 0.001},
    "alpha_lr 0.05": {"alpha_lr": 0.05},
    "activations only (weight_bits None)": {"weight_bits": None},
}


def run(seed: int, bits: int, overrides: dict[str, Any], epochs: int) -> tuple[float, list[float]]:
    """accuracy.py's training run with one PACTCallback; the test accuracy and the learned clips."""
    kwargs = {"act_bits": bits, "weight_bits": bits, "verbose": False, **overrides}
    acc, model = run_one("mnist5k", seed, epochs, [PACTCallback(**kwargs)], None)
    clips = [float(m.alpha.detach()[0]) for m in model.modules() if isinstance(m, PACTActivation)]
    return acc, clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="row labels to run (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"PACT W{args.bits}A{args.bits}, MNIST-5k test accuracy (%), mean over seeds {args.seeds}",
        "",
        "| variant | mean | per seed | learned clips (relu1..3, seed 0) |",
        "|---|---|---|---|",
    ]
    for label in args.variants:
        accs, first_clips = [], []
        for seed in args.seeds:
            start = time.perf_counter()
            acc, clips = run(seed, args.bits, VARIANTS[label], args.epochs)
            accs.append(100 * acc)
            first_clips = first_clips or clips
            print(f"{label:45s} seed {seed}: {100 * acc:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
        per_seed = " ".join(f"{a:.1f}" for a in accs)
        clips = ", ".join(f"{c:.2f}" for c in first_clips)
        lines.append(f"| {label} | {statistics.mean(accs):.2f} | {per_seed} | {clips} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
