"""Weight-gradient norm of a BN-free conv net under QAT against the float model: what ``gradient_clip_val`` meets.

Not a test. A ``gradient_clip_val`` tuned on the float model clips by the norm of the gradient; if quantization
changes that norm by orders of magnitude, the same value cuts QAT updates hard (or never clips). Each row trains the
same BN-free CNN from the same seed on scikit-learn's digits (Adam 1e-3, batch 64, ``--steps`` steps, no clipping)
and records the L2 norm of the gradient of the layer weights (quantizer parameters excluded) at every step.

Usage::

    python benchmarks/grad_norm.py --threads 1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant import PACTCallback
from lightning_quant.demos import DigitsDataModule


class NoBNCNN(L.LightningModule):
    """Three conv + ReLU blocks and a two-layer head, no BatchNorm (what DoReFa's unscaled weights hurt)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU()
        self.fc1, self.relu4 = nn.Linear(32 * 2 * 2, 64), nn.ReLU()
        self.fc2 = nn.Linear(64, 10)
        self.norms: list[float] = []
        self.clip_ratios: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.fc2(self.relu4(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for n, p in self.named_parameters() if n.endswith(".weight") and p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        self.norms.append(norm)
        clips = [p.grad for n, p in self.named_parameters() if n.endswith(".alpha") and p.grad is not None]
        if clips:  # the PACT clips' gradient beside the weights': does it starve a norm-based clipping?
            self.clip_ratios.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in clips]))) / norm)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


ROWS = {
    "float": lambda: [],
    "PACT W4A4, LSQ weights (default)": lambda: [PACTCallback(4, 4, first_last="quantize", verbose=False)],
    "PACT W4A4, DoReFa weights": lambda: [
        PACTCallback(4, 4, weight_quantizer="dorefa", first_last="quantize", verbose=False)
    ],
}


def run(row: str, seed: int, steps: int) -> NoBNCNN:
    L.seed_everything(seed, verbose=False)
    model = NoBNCNN()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=ROWS[row](),
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, seed=seed))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {row: [run(row, s, args.steps) for s in args.seeds] for row in ROWS}
    medians = {row: [statistics.median(m.norms) for m in ms] for row, ms in models.items()}
    base = medians["float"]
    print(
        f"| row | median weight-gradient norm per seed (first {args.steps} steps) | x float (mean of seeds) |"
        " clip-gradient norm / weight-gradient norm (range over steps and seeds) |"
    )
    print("|---|---|---|---|")
    for row, values in medians.items():
        ratio = statistics.mean(v / b for v, b in zip(values, base))
        clips = [r for m in models[row] for r in m.clip_ratios]
        clip_text = f"{min(clips):.2g} - {max(clips):.2g}" if clips else "-"
        print(f"| {row} | {', '.join(f'{v:.3g}' for v in values)} | {ratio:.3g} | {clip_text} |")


if __name__ == "__main__":
    main()
