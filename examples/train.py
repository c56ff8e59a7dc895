"""Train a demo model with or without a quantization callback, configured by Hydra (``conf/``).

Examples:
    python examples/train.py                                    # float CNN on digits, 8 epochs
    python examples/train.py quant=pact quant.act_bits=2 trainer.max_epochs=20
    python examples/train.py quant=dsq data=mnist5k
    python examples/train.py quant=pact trainer=ddp             # 2 CPU processes, single run
    python examples/train.py -m quant=none,pact,dsq,quant_noise quant.act_bits=2,4
    python examples/train.py -m trainer=ddp_spawn quant=none,pact   # sweeps over DDP: ddp_spawn, not ddp

    # The standard flow: train FP32, then fine-tune that model with PACT W4A4 at a small lr and export it to ONNX.
    python examples/train.py quant=none hydra.run.dir=outputs/fp32
    python examples/train.py quant=pact init_from=outputs/fp32 model.lr=2e-4 export.onnx=true

Each run prints ``RESULT quant=... act_bits=... weight_bits=... test_acc=...`` and writes ``results.json`` into its
output directory; a sweep ends with a table of all jobs (``lightning_quant.demos.hydra_summary``).

``init_from=<ckpt or run dir>`` loads the weights of a Lightning checkpoint of an FP32 run of the same model config
(a run's folder stands for the checkpoint its ``results.json`` names) into the freshly built model before ``fit``
(strict; a checkpoint with quantizer state is refused): the quant callback then fine-tunes that model. It is not a
resume: epochs, optimizer and lr start afresh (``model.lr`` sets the fine-tuning lr). ``export.onnx=true`` writes
``model.onnx`` beside ``results.json`` from the run's checkpoint (QDQ ONNX by ``lightning_quant.export_onnx``; with
``quant=none`` a plain float ONNX model) and prints ``EXPORT onnx=<path>``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from lightning_quant import export_onnx, load_from_checkpoint
from lightning_quant.export import export_float_onnx
from lightning_quant.surgery import RECIPE_KEY

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


# State-dict key endings that only quantized models hold (PACT clips, DSQ ranges and temperatures, calibration flags,
# weight quantizers' parameters), besides the recipe itself.
_QUANTIZER_KEY_ENDINGS = (".alpha", ".lower", ".upper", ".temperature", ".calibrated")


def _is_quantizer_key(key: str) -> bool:
    return key.split(".")[-1] == RECIPE_KEY or "_quantizer." in key or key.endswith(_QUANTIZER_KEY_ENDINGS)


def resolve_init_checkpoint(init_from: str) -> Path:
    """The checkpoint file ``init_from`` names: a ``.ckpt`` file, or a run folder whose ``results.json`` names one.

    Args:
        init_from: A path, relative to the directory the app was launched from (Hydra does not change it).

    Raises:
        FileNotFoundError: If the path does not exist, or is a folder without a ``results.json`` naming a checkpoint.
    """
    path = Path(to_absolute_path(str(init_from)))
    if path.is_dir():
        results = path / "results.json"
        recorded = json.loads(results.read_text()) if results.is_file() else {}
        if not recorded.get("checkpoint"):
            raise FileNotFoundError(
                f"init_from={init_from!r}: the folder {str(path)!r} holds no results.json naming a checkpoint. Give a"
                " .ckpt file, or the output folder of an app run with trainer.enable_checkpointing=true."
            )
        checkpoint, run_dir = Path(recorded["checkpoint"]), Path(recorded.get("output_dir") or path)
        # A run folder that was moved or copied: its checkpoint lies at the same place inside it.
        moved = path / checkpoint.relative_to(run_dir) if checkpoint.is_relative_to(run_dir) else checkpoint
        path = checkpoint if checkpoint.is_file() or not moved.is_file() else moved
    if not path.is_file():
        raise FileNotFoundError(
            f"init_from={init_from!r}: no checkpoint at {str(path)!r}. Give the .ckpt of an FP32 run (the"
            " 'checkpoint' entry of its results.json) or that run's output folder."
        )
    return path


def load_float_weights(model: torch.nn.Module, init_from: str) -> Path:
    """Load the FP32 weights of a Lightning checkpoint into a freshly built, not yet quantized ``model`` (strict).

    Args:
        model: The model built from ``cfg.model``; the quant callback injects its quantizers later, in ``setup``.
        init_from: The ``init_from`` option (see :func:`resolve_init_checkpoint`).

    Returns:
        The checkpoint's absolute path.

    Raises:
        FileNotFoundError: If there is no such checkpoint.
        ValueError: If the file is not a Lightning checkpoint, holds quantizer state (a QAT run's checkpoint), or
            does not fit the model (another model class or config); the message names the path.
    """
    path = resolve_init_checkpoint(init_from)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry).")
    own = set(model.state_dict())
    quantizer_keys = [k for k in state if k not in own and _is_quantizer_key(k)]
    if quantizer_keys:
        raise ValueError(
            f"init_from: {str(path)!r} holds quantizer state ({', '.join(quantizer_keys[:4])}, ...): it is the"
            " checkpoint of a quantization-aware run, and init_from starts QAT from an FP32 model. Give the"
            " checkpoint of a quant=none run; to evaluate or export a quantized checkpoint use"
            " lightning_quant.load_from_checkpoint."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"init_from: {str(path)!r} does not fit {type(model).__name__} as configured (model.*): was it written by"
            f" another model or config? The checkpoint's hyper-parameters: {checkpoint.get('hyper_parameters')}.\n"
            f"{err}"
        ) from err
    return path


def write_onnx(model_cls: type[L.LightningModule], ckpt_path: str, quantized: bool, path: Path) -> Path:
    """Write the run's trained model, rebuilt from its checkpoint, as ONNX.

    A quantized model is written by :func:`lightning_quant.export_onnx` (QDQ: integer weights, Q/DQ activations); a
    float one (``quant=none``) by ``torch.onnx.export``, so that sweeps such as ``-m quant=none,pact export.onnx=true``
    give the float baseline beside each quantized model.

    Args:
        model_cls: The trained LightningModule class (rebuilt from the checkpoint's hyper-parameters).
        ckpt_path: The run's checkpoint.
        quantized: Whether the run had a quant callback (the checkpoint then holds its recipe).
        path: The ``.onnx`` file to write.

    Returns:
        ``path``.
    """
    if quantized:
        model = load_from_checkpoint(model_cls, ckpt_path)
        export_onnx(model, model.example_input_array, path)
        return path
    model = model_cls.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    export_float_onnx(model, model.example_input_array, path)
    return path


def train(cfg: DictConfig) -> float:
    """Fit and test one configuration; write ``results.json`` into the run's output dir.

    Args:
        cfg: The composed config (``conf/train.yaml`` plus overrides).

    Returns:
        The test accuracy (for Hydra sweepers that optimise the return value).
    """
    L.seed_everything(cfg.seed, workers=True)

    export_onnx_file = bool(OmegaConf.select(cfg, "export.onnx", default=False))
    if export_onnx_file and not cfg.trainer.enable_checkpointing:
        raise ValueError("export.onnx=true exports the run's checkpoint: keep trainer.enable_checkpointing=true.")

    datamodule = instantiate(cfg.data.datamodule)
    model = instantiate(cfg.model)
    init_from = OmegaConf.select(cfg, "init_from", default=None)
    init_path = load_float_weights(model, init_from) if init_from else None

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
            "init_from": None if init_path is None else str(init_path),
            "onnx": None,
            "quant_config": OmegaConf.to_container(cfg.quant, resolve=True),
            "callback": _describe_callback(quant_callback),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        if export_onnx_file:
            onnx_path = write_onnx(type(model), ckpt_path, quant_callback is not None, output_dir / "model.onnx")
            results["onnx"] = str(onnx_path)
        with open(output_dir / "results.json", "w") as f:
            json.dump(results, f, indent=2)
        print(
            f"RESULT quant={cfg.quant.name} act_bits={act_bits} weight_bits={weight_bits} test_acc={test_acc:.4f}",
            flush=True,
        )
        if results["onnx"]:
            print(f"EXPORT onnx={results['onnx']}", flush=True)
    return test_acc


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; see the module docstring for examples."""
    return train(cfg)


if __name__ == "__main__":
    main()
