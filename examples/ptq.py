"""Post-training quantization of a trained float checkpoint, configured by Hydra (``conf/ptq.yaml``).

Examples:
    python examples/train.py trainer.max_epochs=8                       # a float model; note its checkpoint path
    python examples/ptq.py model.checkpoint=<fp32.ckpt>                 # W8A4 PACT, no labels
    python examples/ptq.py model.checkpoint=<fp32.ckpt> ptq.config.act_bits=4 ptq.config.weight_bits=4
    python examples/ptq.py model.checkpoint=<fp32.ckpt> ptq.batchnorm=keep ptq.steps=20   # fit the clips instead

The app builds the model and data from the same config groups as ``examples/train.py``, loads the float weights,
runs :func:`lightning_quant.post_training_quantize` on training images (the labels are dropped before the loader),
tests the result with a Trainer, and saves ``ptq.ckpt`` in the run's output directory: a checkpoint that
``lightning_quant.load_from_checkpoint(DemoCNN, path)`` rebuilds and ``lightning_quant.export_onnx`` exports. It
prints ``RESULT ptq act_bits=... weight_bits=... fp32_acc=... test_acc=...`` and writes ``results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import post_training_quantize


def _trainer(cfg: DictConfig) -> L.Trainer:
    trainer_cfg = cast(dict, OmegaConf.to_container(cfg.trainer, resolve=True))
    trainer_cfg.pop("callbacks", None)
    trainer_cfg.update(devices=1, strategy="auto", enable_checkpointing=False, logger=False)
    return instantiate(trainer_cfg)


def _unlabelled_loader(datamodule: L.LightningDataModule, batch_size: int) -> DataLoader:
    """The training images alone: the labels are not in the loader, so nothing can read them."""
    datamodule.setup("fit")
    images = datamodule.train_set.tensors[0]
    return DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=True)


def run(cfg: DictConfig) -> float:
    """Load, quantize, test and save one model; return its test accuracy.

    Args:
        cfg: The composed config (``conf/ptq.yaml`` plus overrides).
    """
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data.datamodule)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    checkpoint_path = to_absolute_path(model_cfg.pop("checkpoint"))
    model = instantiate(model_cfg)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint.get("state_dict", checkpoint))

    trainer = _trainer(cfg)
    fp32_acc = float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"])
    config = instantiate(cfg.ptq.config)
    plan = post_training_quantize(
        model,
        config,
        _unlabelled_loader(datamodule, cfg.ptq.batch_size),
        steps=cfg.ptq.steps,
        lr=cfg.ptq.lr,
        calibration_batches=cfg.ptq.calibration_batches,
        calibration=cfg.ptq.calibration,
        batchnorm=cfg.ptq.batchnorm,
        progress=cfg.ptq.progress,
    )
    print(plan.format("post-training quantization plan"), flush=True)
    test_acc = float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"])

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The recipe travels in the model's state_dict (buffer `lightning_quant_recipe`): a plain dict is enough.
    hparams = dict(getattr(model, "hparams", {}))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, output_dir / "ptq.ckpt")
    results = {
        "act_bits": config.act_bits,
        "weight_bits": config.weight_bits,
        "fp32_acc": fp32_acc,
        "test_acc": test_acc,
        "steps": cfg.ptq.steps,
        "checkpoint": str(output_dir / "ptq.ckpt"),
        "fp32_checkpoint": checkpoint_path,
        "config": OmegaConf.to_container(cfg.ptq, resolve=True),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"RESULT ptq act_bits={config.act_bits} weight_bits={config.weight_bits} fp32_acc={fp32_acc:.4f}"
        f" test_acc={test_acc:.4f}",
        flush=True,
    )
    return test_acc


@hydra.main(version_base="1.3", config_path="../conf", config_name="ptq")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; see the module docstring for examples."""
    return run(cfg)


if __name__ == "__main__":
    main()
