"""The standard quantization flow in plain Python: train FP32, fine-tune with PACT W4A4, export to ONNX, run it.

1. Train the float ``DemoCNN`` on the 8x8 digits (a Lightning checkpoint is written).
2. Load that checkpoint with a smaller learning rate and fine-tune it with ``PACTCallback(act_bits=4, weight_bits=4)``
   (the defaults: LSQ weights, clips calibrated on the first training batch, first and last layers float).
3. Export the quantized model with ``lightning_quant.export_onnx`` (QDQ ONNX) and run it in onnxruntime.

Prints one line per model (``FP32 test acc``, ``W4A4 test acc``, ``ONNX W4A4 test acc``) and writes everything to
``outputs/finetune_demo`` (or the folder given with ``--out``). Under a minute on 2 CPU cores::

    python examples/finetune_demo.py
    python examples/finetune_demo.py --fp32-epochs 8 --qat-epochs 3     # longer runs, higher accuracy

The same flow with the Hydra app: ``python examples/train.py quant=none hydra.run.dir=outputs/fp32``, then
``python examples/train.py quant=pact init_from=outputs/fp32 model.lr=2e-4 export.onnx=true``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import numpy as np

from lightning_quant import PACTCallback, export_onnx
from lightning_quant.demos import DemoCNN, DigitsDataModule
from lightning_quant.export import onnxruntime_session

ROOT = Path(__file__).resolve().parents[1]


def make_trainer(out: Path, epochs: int, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A quiet single-process CPU trainer that keeps the last epoch's checkpoint under ``out/checkpoints``.

    Args:
        out: The run's folder.
        epochs: Training epochs.
        callbacks: Extra callbacks (the quantization callback).
    """
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=out,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def onnx_accuracy(path: Path, datamodule: DigitsDataModule) -> float:
    """Accuracy of the ONNX model at ``path`` on the test split, computed by onnxruntime.

    Args:
        path: A file written by :func:`lightning_quant.export_onnx`.
        datamodule: The set-up data module (its ``test_set``).
    """
    session = onnxruntime_session(path)
    x, y = datamodule.test_set.tensors
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.mean(logits.argmax(axis=1) == y.numpy()))


def run(out: Path, fp32_epochs: int = 3, qat_epochs: int = 1, lr: float = 2e-4, seed: int = 0) -> dict[str, float]:
    """Train FP32, fine-tune W4A4 from its checkpoint, export and run the ONNX model; print and return accuracies.

    Args:
        out: Folder for the checkpoints and ``model.onnx`` (created).
        fp32_epochs: Epochs of float training.
        qat_epochs: Epochs of PACT fine-tuning.
        lr: Fine-tuning learning rate of the weights (float training uses the model's default, 1e-3).
        seed: Seed of training and of the data split.

    Returns:
        ``{"fp32": ..., "w4a4": ..., "onnx": ...}`` test accuracies.
    """
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True)
    datamodule = DigitsDataModule(seed=seed)

    # 1. FP32.
    trainer = make_trainer(out / "fp32", fp32_epochs)
    trainer.fit(DemoCNN(), datamodule=datamodule)
    fp32_ckpt = trainer.checkpoint_callback.best_model_path
    fp32_acc = trainer.test(ckpt_path=fp32_ckpt, datamodule=datamodule, verbose=False)[0]["test/acc"]

    # 2. Fine-tune the trained model with PACT W4A4 at a smaller lr (the checkpoint's other hyper-parameters kept).
    model = DemoCNN.load_from_checkpoint(fp32_ckpt, map_location="cpu", lr=lr)
    trainer = make_trainer(out / "w4a4", qat_epochs, callbacks=[PACTCallback(act_bits=4, weight_bits=4)])
    trainer.fit(model, datamodule=datamodule)
    w4a4_acc = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]

    # 3. ONNX: integer weights and Q/DQ activations, run by onnxruntime.
    onnx_path = Path(export_onnx(model, model.example_input_array, out / "model.onnx"))
    accuracies = {"fp32": float(fp32_acc), "w4a4": float(w4a4_acc), "onnx": onnx_accuracy(onnx_path, datamodule)}

    print(f"FP32 test acc {accuracies['fp32']:.4f}  (epochs: {fp32_epochs}, checkpoint {fp32_ckpt})")
    print(f"W4A4 test acc {accuracies['w4a4']:.4f}  (PACT, epochs: {qat_epochs}, from the FP32 one at lr {lr:g})")
    print(f"ONNX W4A4 test acc {accuracies['onnx']:.4f}  (onnxruntime, {onnx_path})", flush=True)
    return accuracies


def main() -> None:
    """Parse the command line and run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "finetune_demo", help="output folder")
    parser.add_argument("--fp32-epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.out, args.fp32_epochs, args.qat_epochs, args.lr, args.seed)


if __name__ == "__main__":
    main()
