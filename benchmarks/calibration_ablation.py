"""PACT/DSQ at low bits, fine-tuned from the saved FP32 models, with one calibration setting changed per row.

Not a test: the rows behind the README's "What was tried for the 2-bit miss" table. Each run is the fine-tune
protocol of ``benchmarks/accuracy.py`` (same FP32 weights per seed, 4 epochs at Adam lr 2e-4), or with
``--protocol scratch`` its from-scratch one (8 epochs at lr 1e-3), with the callback shown.
Prints one JSON line per (row, seed).

Usage::

    python benchmarks/calibration_ablation.py --rows pact_w2a2_mse pact_w2a2_percentile --seeds 0 1 2 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from accuracy import fp32_base, run_one

from lightning_quant import DSQCallback, PACTCallback
from lightning_quant.config import DSQConfig, PACTConfig

ROWS = {
    "pact_w2a2_mse": lambda: [PACTCallback(2, 2, calibration="mse", verbose=False)],
    "pact_w2a2_mse_alpha_lr_1e-3": lambda: [PACTCallback(2, 2, calibration="mse", alpha_lr=1e-3, verbose=False)],
    "pact_w2a2_percentile": lambda: [PACTCallback(2, 2, calibration="percentile", verbose=False)],
    "pact_w4a4_percentile": lambda: [PACTCallback(4, 4, calibration="percentile", verbose=False)],
    "pact_every_w4a4_percentile": lambda: [
        PACTCallback(4, 4, calibration="percentile", first_last="quantize", verbose=False)
    ],
    "dsq_w2a2_percentile": lambda: [DSQCallback(2, 2, calibration="percentile", verbose=False)],
    "dsq_w2a2_quantizer_lr_2e-4": lambda: [DSQCallback(2, 2, quantizer_lr=2e-4, verbose=False)],
    "dsq_w2a2_freeze_bn_0.5": lambda: [DSQCallback(2, 2, freeze_bn_stats=0.5, verbose=False)],
    "dsq_w2a2_freeze_bn_0.5_t0.4": lambda: [DSQCallback(2, 2, freeze_bn_stats=0.5, temperature=0.4, verbose=False)],
    "dsq_w2a2_freeze_bn_0.5_t0.4_percentile": lambda: [
        DSQCallback(2, 2, freeze_bn_stats=0.5, temperature=0.4, calibration="percentile", verbose=False)
    ],
    "dsq_w2a2_freeze_bn_0.5_t0.6": lambda: [DSQCallback(2, 2, freeze_bn_stats=0.5, temperature=0.6, verbose=False)],
    "dsq_a2_only": lambda: [DSQCallback(2, None, verbose=False)],
    "dsq_w2_only": lambda: [DSQCallback(None, 2, verbose=False)],
    "dsq_w2a2_lsq_weights": lambda: [DSQCallback(2, 2, verbose=False)],  # run with DSQ's weights swapped for LSQ's
    "pact_w2a2_per_channel": lambda: [PACTCallback(2, 2, per_channel=True, verbose=False)],
    "pact_w2a2_freeze_bn_0.75": lambda: [PACTCallback(2, 2, freeze_bn_stats=0.75, verbose=False)],
    # BatchNorm statistics as the running average of training left them (the default before `reestimate_bn`).
    "pact_w2a2_no_bn_reestimate": lambda: [PACTCallback(2, 2, reestimate_bn=0, verbose=False)],
    "dsq_w2a2_no_bn_reestimate": lambda: [DSQCallback(2, 2, reestimate_bn=0, verbose=False)],
}


@contextlib.contextmanager
def lsq_weights_in_dsq(row: str):
    """For the diagnostic row ``dsq_w2a2_lsq_weights``: DSQ's activations with PACT's (LSQ) weight quantizer."""
    if row != "dsq_w2a2_lsq_weights":
        yield
        return
    original = DSQConfig.make_weight
    DSQConfig.make_weight = lambda self, layer, name, bits: PACTConfig(bits, bits).make_weight(layer, name, bits)
    try:
        yield
    finally:
        DSQConfig.make_weight = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=sorted(ROWS), choices=sorted(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=Path("/tmp/lightning_quant_fp32"), help="FP32 cache")
    parser.add_argument(
        "--protocol", choices=["finetune", "scratch"], default="finetune", help="scratch: 8 epochs at 1e-3"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for row in args.rows:
        accs = []
        for seed in args.seeds:
            state, fp32, _ = fp32_base(args.dataset, seed, args.weights)
            start = time.perf_counter()
            with lsq_weights_in_dsq(row):
                if args.protocol == "finetune":
                    acc, _ = run_one(args.dataset, seed, 4, ROWS[row](), None, lr=2e-4, init_state=state)
                else:
                    acc, _ = run_one(args.dataset, seed, 8, ROWS[row](), None, lr=1e-3)
            accs.append(100 * acc)
            line = {"row": row, "seed": seed, "acc": 100 * acc, "fp32": 100 * fp32, "s": time.perf_counter() - start}
            print(json.dumps(line), flush=True)
        print(json.dumps({"row": row, "mean": statistics.mean(accs)}), flush=True)


if __name__ == "__main__":
    main()
