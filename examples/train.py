"""Train a demo model with or without a quantization callback, configured by Hydra (``conf/``).

Examples:
    python examples/train.py                                    # float CNN on digits, 8 epochs
    python examples/train.py quant=pact quant.act_bits=2 trainer.max_epochs=20
    python examples/train.py quant=dsq data=mnist5k
    python examples/train.py quant=pact trainer=ddp             # 2 CPU processes, single run
    python examples/train.py -m quant=none,pact,dsq,quant_noise quant.act_bits=2,4
    python examples/train.py -m trainer=ddp_spawn quant=none,pact   # sweeps over DDP: ddp_spawn, not ddp

Each run prints ``RESULT quant=... act_bits=... weight_bits=... test_acc=...`` and writes ``results.json`` into its
output directory; a sweep ends with a table of all jobs (``lightning_quant.demos.hydra_summary``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

_PLAIN = (bool, int, float, str, type(None))


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain-JSON view of a callback's settings: numbers, strings, lists, dicts, dataclasses; the rest as ``repr``."""
    if isinstance(value, _PLAIN):
        return value
    if depth > 4:
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **_jsonable(dataclasses.asdict(value), depth + 1)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    return repr(value)


def _describe_callback(callback: Any) -> dict[str, Any] | None:
    """What the instantiated quant callback actually holds (public plain attributes), for ``results.json``."""
    if callback is None:
        return None
    attrs = {
        k: _jsonable(v)
        for k, v in vars(callback).items()
        if not k.startswith("_") and (isinstance(v, _PLAIN + (list, tuple, dict)) or dataclasses.is_dataclass(v))
    }
    return {"class": f"{type(callback).__module__}.{type(callback).__qualname__}", "attrs": attrs}


def _instantiate_callbacks(nodes: Any) -> list[L.Callback]:
    """Instantiate a mapping (or list) of ``_target_`` nodes; ``null`` entries are skipped so overrides can drop one."""
    if not nodes:
        return []
    items = nodes.values() if isinstance(nodes, dict) else nodes
    return [instantiate(node) for node in items if node is not None]


def train(cfg: DictConfig) -> float:
    """Fit and test one configuration; write ``results.json`` into the run's output dir.

    Args:
        cfg: The composed config (``conf/train.yaml`` plus overrides).

    Returns:
        The test accuracy (for Hydra sweepers that optimise the return value).
    """
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data.datamodule)
    model = instantiate(cfg.model)

    callbacks: list[L.Callback] = []
    quant_callback = instantiate(cfg.quant.callback) if cfg.quant.get("callback") is not None else None
    if quant_callback is not None:
        callbacks.append(quant_callback)

    # `callbacks` in the trainer group is a name -> node mapping, not a Trainer argument: take it out, build it, and
    # hand the Trainer one list. Resolving here (in the Hydra job) also fixes ${hydra:...} paths before any
    # ddp_spawn worker, which has no Hydra context, sees the config.
    trainer_cfg = cast(dict, OmegaConf.to_container(cfg.trainer, resolve=True))
    callbacks += _instantiate_callbacks(trainer_cfg.pop("callbacks", None))
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks)
    # Fix each logger's version folder now: ddp_spawn starts fresh workers for `fit` and again for `test`, and
    # each would otherwise take the next free version_N, splitting one run's logs over two folders.
    for logger in trainer.loggers:
        _ = logger.version

    trainer.fit(model, datamodule=datamodule)
    val_acc = trainer.callback_metrics.get("val/acc")
    epochs = trainer.current_epoch

    # Test the final checkpoint rather than the in-memory model: under ddp_spawn the main process only gets the
    # worker's weights back (loaded non-strictly), not the quantizers' learned state, while a checkpoint restores
    # both after the callback has rebuilt the quantized structure in `setup`.
    ckpt_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
    test_metrics = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path or None)[0]
    test_acc = float(test_metrics["test/acc"])

    if trainer.is_global_zero:
        quant_args = cast(dict, OmegaConf.to_container(cfg.quant.callback, resolve=True)) if quant_callback else {}
        # Report the bits the callback was given (None where it leaves that part float), not the raw top-level keys:
        # `quant.act_bits=2` on quant=none or quant_noise changes nothing and must not read as if it did.
        act_bits = quant_args.get("act_bits")
        weight_bits = quant_args.get("weight_bits", quant_args.get("bits"))
        hydra_cfg = HydraConfig.get()
        output_dir = Path(hydra_cfg.runtime.output_dir)
        results = {
            "quant": cfg.quant.name,
            "act_bits": act_bits,
            "weight_bits": weight_bits,
            "test_acc": test_acc,
            "test_loss": float(test_metrics["test/loss"]),
            "val_acc": None if val_acc is None else float(val_acc),
            "data": cfg.data.name,
            "model": cfg.model._target_.rsplit(".", 1)[-1],
            "epochs": epochs,
            "seed": cfg.seed,
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "job_num": OmegaConf.select(hydra_cfg, "job.num", default=None),
            "overrides": list(hydra_cfg.overrides.task),
            "output_dir": str(output_dir),
            "checkpoint": ckpt_path or None,
            "quant_config": OmegaConf.to_container(cfg.quant, resolve=True),
            "callback": _describe_callback(quant_callback),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "results.json", "w") as f:
            json.dump(results, f, indent=2)
        print(
            f"RESULT quant={cfg.quant.name} act_bits={act_bits} weight_bits={weight_bits} test_acc={test_acc:.4f}",
            flush=True,
        )
    return test_acc


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; see the module docstring for examples."""
    return train(cfg)


if __name__ == "__main__":
    main()
