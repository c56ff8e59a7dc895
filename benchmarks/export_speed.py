"""onnxruntime CPU latency and file size of the demo CNN: float ONNX vs QDQ (fake-quant) vs integer kernels.

Every model is run in one process, sessions interleaved per repetition, medians of ``--reps`` runs after warm-ups,
at 1 and 2 intra-op threads. The input is 32x32 (28x28 MNIST would need AdaptiveAvgPool2d(2) on 7x7, which the
TorchScript exporter refuses). The quantized model is PACT W4A4 (LSQ weights, first and last layers float; fc1's
input, an average pool, on its LSQ+ grid), trained a few steps so the clips are off their init; ``export_onnx``
writes it twice: the exact fake-quant graph (run with onnxruntime's QDQ fusions off, as
:func:`lightning_quant.export.onnxruntime_session` does) and the integer-kernel graph (fusions on; the integer ops
of onnxruntime's optimized graph are printed).

    python benchmarks/export_speed.py --reps 50 --batch 64 --input-size 32
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import torch
from torch.nn import functional as F

from lightning_quant import PACTConfig, export_onnx, inject_quantizers
from lightning_quant.demos.models import DemoCNN
from lightning_quant.export import export_float_onnx, onnxruntime_session


def _quantized(input_size: int) -> DemoCNN:
    torch.manual_seed(0)
    model = DemoCNN(input_size=input_size)
    inject_quantizers(model, PACTConfig(act_bits=4, weight_bits=4), warn=False, example_input=model.example_input_array)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        x, y = torch.randn(32, 1, input_size, input_size), torch.randint(0, 10, (32,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _median_ms(session, x: np.ndarray, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _integer_ops(path: str, folder: str) -> str:
    """The integer ops (QLinear*, *Integer*) of onnxruntime's optimized graph of ``path``, with their counts."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = f"{folder}/optimized.onnx"
    options.log_severity_level = 3  # its note that the saved graph is hardware specific
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()) if op.startswith("QLinear") or "Integer" in op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=32)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    example = torch.randn(2, 1, args.input_size, args.input_size)
    torch.manual_seed(0)
    paths = {"float": export_float_onnx(DemoCNN(input_size=args.input_size).eval(), example, f"{folder}/float.onnx")}
    quantized = _quantized(args.input_size)
    paths["QDQ (fake-quant, exact)"] = export_onnx(quantized, example, f"{folder}/qdq.onnx")
    paths["integer kernels"] = export_onnx(quantized, example, f"{folder}/int.onnx", integer_kernels=True)
    x = np.random.default_rng(0).standard_normal((args.batch, 1, args.input_size, args.input_size), np.float32)
    rows = []
    for threads in (1, 2):
        sessions = {
            name: onnxruntime_session(path, integer_kernels=name != "QDQ (fake-quant, exact)", threads=threads)
            for name, path in paths.items()
        }
        for session in sessions.values():
            for _ in range(5):
                session.run(None, {"input": x})
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.reps):  # interleaved, so drift on the shared machine hits every row alike
            for name, session in sessions.items():
                times[name].append(_median_ms(session, x, 1))
        for name in sessions:
            rows.append((name, threads, statistics.median(times[name])))
    print(
        f"DemoCNN (input 1x{args.input_size}x{args.input_size}), batch {args.batch}, median of {args.reps} runs,"
        f" onnxruntime {__import__('onnxruntime').__version__}, onnx {onnx.__version__}, torch {torch.__version__}\n"
    )
    print(f"integer kernels in onnxruntime's optimized graph: {_integer_ops(paths['integer kernels'], folder)}\n")
    print("| model | threads | median ms | file KiB |")
    print("|---|---|---|---|")
    for name, threads, ms in rows:
        print(f"| {name} | {threads} | {ms:.3f} | {os.path.getsize(paths[name]) / 1024:.1f} |")


if __name__ == "__main__":
    main()
