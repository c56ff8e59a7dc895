"""Before and after issue 14, side by side in one process: the quantizers of an earlier commit (default: a2226aa, the
autograd Functions calling the same C kernels in their default "auto" mode) against this checkout's custom ops.
Not a test. The earlier package is extracted with ``git archive`` into a temporary directory and imported as
``lightning_quant_base``. Each repetition runs every case once in a fresh random order (a fixed order gives each case
fixed neighbours, whose memory traffic moved a case's time by up to 2x on a loaded machine); medians.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/kernels_before_after.py --reps 40 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lightning_quant as new
from lightning_quant.demos import DemoCNN


def import_base(commit: str):
    """The package at ``commit``, renamed ``lightning_quant_base`` so that both import side by side."""
    root = Path(tempfile.mkdtemp(prefix="lq_base_"))
    archive = subprocess.run(["git", "archive", commit, "lightning_quant"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")
    package = root / "lightning_quant_base"
    (root / "lightning_quant").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\blightning_quant\b", "lightning_quant_base", path.read_text()))
    sys.path.insert(0, str(root))
    import lightning_quant_base

    return lightning_quant_base


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--reps", type=int, default=40)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--base", default="a2226aa", help="the commit to compare against (default a2226aa)")
args = parser.parse_args()
torch.set_num_threads(args.threads)
base = import_base(args.base)


def grad_step(forward, inputs, grad_out):
    """Forward + backward with respect to the inputs that require grad."""
    inputs = [t for t in inputs if t.requires_grad]
    return lambda: torch.autograd.grad(forward(), inputs, grad_out)


def quantizer_cases(x, g, w, gw) -> dict:
    cases = {
        "ReLU": grad_step(lambda: torch.relu(x), [x], g),
        "ReLU on the weight": grad_step(lambda: torch.relu(w), [w], gw),
    }
    for tag, lib in (("base", base), ("new", new)):
        q = lib.quantizers
        pact = q.PACTActivation(4, alpha_init=2.5)
        dsq = q.DSQActivation(4)
        dsq.calibrate(x.detach(), 0)
        dsql = q.DSQActivation(4, learn_temperature=True)  # the paper's mode
        dsql.calibrate(x.detach(), 0)
        dorefa = q.DoReFaWeight(4)
        dsqw = q.DSQWeight(4)
        dsqw.calibrate(w.detach())
        cases[f"PACT A4 [{tag}]"] = grad_step(lambda m=pact: m(x), [x, pact.alpha], g)
        cases[f"DSQ A4 [{tag}]"] = grad_step(lambda m=dsq: m(x), [x, dsq.lower, dsq.upper], g)
        learned = [x, dsql.lower, dsql.upper, dsql.temperature_logit]
        cases[f"DSQ A4 learned T [{tag}]"] = grad_step(lambda m=dsql: m(x), learned, g)
        cases[f"DoReFa W4 [{tag}]"] = grad_step(lambda m=dorefa: m(w), [w], gw)
        cases[f"DSQ W4 [{tag}]"] = grad_step(lambda m=dsqw: m(w), [w, dsqw.lower, dsqw.upper], gw)
    return cases


def per_call_cases(x, g) -> dict:
    """The activation quantizers on a small tensor, where the fixed cost of a call (Python, dispatch) dominates."""
    cases = {"ReLU, small": grad_step(lambda: torch.relu(x), [x], g)}
    for tag, lib in (("base", base), ("new", new)):
        pact = lib.quantizers.PACTActivation(4, alpha_init=2.5)
        dsq = lib.quantizers.DSQActivation(4)
        dsq.calibrate(x.detach(), 0)
        cases[f"PACT A4, small [{tag}]"] = grad_step(lambda m=pact: m(x), [x, pact.alpha], g)
        cases[f"DSQ A4, small [{tag}]"] = grad_step(lambda m=dsq: m(x), [x, dsq.upper], g)
    return cases


def training_step(lib, config, bx, by):
    """One DemoCNN step (forward, cross-entropy, backward, Adam) with ``lib``'s quantizers injected."""
    torch.manual_seed(0)
    model = DemoCNN(in_channels=1, input_size=28)
    if config is not None:
        lib.inject_quantizers(model, config, warn=False, example_input=model.example_input_array)
        for m in model.modules():  # DSQ ranges from one batch, as DSQCallback does on its first batch
            if isinstance(m, lib.quantizers.DSQActivation):
                m.register_forward_pre_hook(_calibrate_once)
        with torch.no_grad():
            model(bx)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(bx), by).backward()
        optimizer.step()

    return step


def _calibrate_once(module, args) -> None:
    site = module.upcoming_site()
    if not bool(module.calibrated[site]):
        module.calibrate(args[0], site)


def reference_row(name: str) -> str:
    """The row a case's ratio is taken against."""
    if "step" in name:
        return "float step"
    if "small" in name:
        return "ReLU, small"
    return "ReLU on the weight" if "W4 [" in name or name == "ReLU on the weight" else "ReLU"


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 64, 32, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(256, 256, 3, 3) * 0.05)
    cases = quantizer_cases(x, torch.randn_like(x), w, torch.randn_like(w))
    small = torch.randn(8, 32, 4, 4, requires_grad=True)  # 4,096 elements
    cases.update(per_call_cases(small, torch.randn_like(small)))
    bx, by = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    cases["float step"] = training_step(new, None, bx, by)
    for tag, lib in (("base", base), ("new", new)):
        cases[f"PACT W4A4 step [{tag}]"] = training_step(lib, lib.config.PACTConfig(act_bits=4, weight_bits=4), bx, by)
        cases[f"DSQ W4A4 step [{tag}]"] = training_step(lib, lib.config.DSQConfig(act_bits=4, weight_bits=4), bx, by)
    names, times = list(cases), {n: [] for n in cases}
    for name in names:
        for _ in range(3):
            cases[name]()
    gc.collect()
    gc.disable()
    for r in range(args.reps):
        for name in random.Random(r).sample(names, len(names)):
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    gc.enable()
    medians = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.reps} repetitions")
    print("| row | median ms | x ref |\n|---|---|---|")
    for name in names:
        ref = reference_row(name)
        print(f"| {name} | {medians[name]:.3f} | {medians[name] / medians[ref]:.2f} |")


if __name__ == "__main__":
    main()
