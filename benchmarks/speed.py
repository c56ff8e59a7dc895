"""Speed of the quantizers, side by side in one process: forward+backward against ReLU, bytes kept for backward, and
whole training steps of the demo CNN against the float step. Not a test.

Everything is timed in one process, interleaved (each repetition runs every case once, in a rotating order) so that
the load of the machine hits every case alike, and reported as the median over the repetitions. Our quantizers run
their custom ops (``lightning_quant::*``), whose kernel PyTorch's dispatcher picks by device: the C/OpenMP kernels
of ``lightning_quant/csrc`` on CPU float32 (column "kernels": ``C``), Triton on CUDA (``Triton``); QuantNoise is
plain torch ops (``torch``). Rows marked ``torch.compile(module)`` / ``torch.compile(model)`` compile the user's
module or whole model instead (the ops stay opaque inside the graph); their first call, compile included, is not
in the medians. The one-time build (or disk-cache load) of the C library is reported apart.

On CUDA (``--device cuda``) two columns are added: the kernels' own device time per call (``torch.profiler``) and
its ratio to the reference's. A call on a small tensor costs the host more than the GPU, and the wall-clock median
shows the host.

Sections:

* activations: a float32 tensor 64x64x32x32 (4M elements), forward + backward (``torch.autograd.grad`` with respect
  to the input and the quantizer's learned values) as a ratio to ``torch.relu`` forward + backward, and the bytes
  each keeps for backward per input element (``torch.autograd.graph.saved_tensors_hooks``: the packed tensors,
  each storage counted once, divided by the input's number of elements). References: Distiller-style PACT (relu,
  ``torch.where`` clip, rounding with the straight-through estimator written ``y + (q - y).detach()``), the same
  under ``torch.compile``, and ReLU followed by torch.ao's ``FakeQuantize`` (moving-average min/max observer,
  ``quant_min=0, quant_max=15``).
* weights: a 256x256x3x3 conv weight; the quantizer's forward + backward alone (ratio to ReLU forward + backward on
  the weight) and inside a conv layer (input 8x256x8x8; ratio to the same conv with the float weight).
* training step: ``DemoCNN(in_channels=1, input_size=28)`` on a 64x1x28x28 batch, plain torch (forward,
  cross-entropy, backward, Adam step; no Trainer), each method injected with ``inject_quantizers``, as a ratio to
  the float model's step (the ``torch.compile(model)`` rows: to the float model compiled the same way).

Usage::

    python benchmarks/speed.py                    # everything, 30 repetitions after 5 warm-up calls
    python benchmarks/speed.py --quick            # 8 repetitions, fewer rows: a smoke run
    python benchmarks/speed.py --threads 2 --reps 50 --sections act step
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from references import ao_fake_quantize, torch_ao_qat  # noqa: E402  (benchmarks/references.py)
from torch import Tensor, nn  # noqa: E402

from lightning_quant import inject_quantizers  # noqa: E402
from lightning_quant.config import DSQConfig, PACTConfig, QuantConfig, QuantNoiseConfig  # noqa: E402
from lightning_quant.demos import DemoCNN  # noqa: E402
from lightning_quant.functional import native  # noqa: E402
from lightning_quant.quantizers import (  # noqa: E402
    DoReFaWeight,
    DSQActivation,
    DSQWeight,
    PACTActivation,
    QuantNoiseWeight,
)

ACT_SHAPE = (64, 64, 32, 32)
WEIGHT_SHAPE = (256, 256, 3, 3)
CONV_INPUT = (8, 256, 8, 8)
BATCH = (64, 1, 28, 28)
DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Case:
    """One timed row: ``run`` does one forward + backward (or one training step)."""

    section: str
    name: str
    run: Callable[[], object]
    mode: str = ""  # the kernels of our quantizers (kernels_of), "" for references
    reference: str = ""  # the row this one is divided by
    saved: float | None = None
    note: str = ""
    first_s: float = 0.0
    kernel_ms: float | None = None  # CUDA only: the device time of its kernels per call (torch.profiler)
    times: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def kernels_of(name: str) -> str:
    """The "kernels" column of one of our rows: what the dispatcher runs for it on this device."""
    if name.startswith("QuantNoise"):
        return "torch"
    return "Triton" if DEVICE.type == "cuda" else "C" if name.startswith(("PACT", "DoReFa", "DSQ")) else "torch"


def saved_bytes_per_element(forward: Callable[[], Tensor], numel: int) -> float:
    """Bytes of the tensors autograd keeps for backward, each storage counted once, per input element."""
    seen: dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values()) / numel


def grad_step(forward: Callable[[], Tensor], inputs: list[Tensor], grad_out: Tensor) -> Callable[[], object]:
    """Forward + backward with respect to ``inputs`` (no ``.grad`` accumulation, as for an intermediate tensor)."""

    inputs = [t for t in inputs if t.requires_grad]  # e.g. a learned bound the module keeps fixed

    def run() -> object:
        out = forward()
        grads = torch.autograd.grad(out, inputs, grad_out)
        sync()
        return grads

    return run


# ---------------------------------------------------------------------------------------------------- references


def distiller_pact(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Distiller's ``LearnedClippedLinearQuantization`` written out: relu, where-clip, round, STE by detach."""
    y = F.relu(x)
    y = torch.where(y < alpha, y, alpha)
    scale = (2**bits - 1) / alpha
    q = torch.round(y * scale) / scale
    return y + (q - y).detach()


# ---------------------------------------------------------------------------------------------------- sections


def activation_cases(quick: bool) -> list[Case]:
    torch.manual_seed(0)
    x = torch.randn(ACT_SHAPE, device=DEVICE, requires_grad=True)
    g = torch.randn(ACT_SHAPE, device=DEVICE)
    n = x.numel()
    cases = [Case("act", "ReLU", grad_step(lambda: torch.relu(x), [x], g), note="reference")]
    cases[0].saved = saved_bytes_per_element(lambda: torch.relu(x), n)

    pact = PACTActivation(4, alpha_init=2.5).to(DEVICE)
    dsq = DSQActivation(4).to(DEVICE)
    dsq.calibrate(x.detach(), 0)
    dsq_learned = DSQActivation(4, learn_temperature=True).to(DEVICE)  # the paper's mode
    dsq_learned.calibrate(x.detach(), 0)
    ours = [
        ("PACT A4 (PACTActivation)", lambda: pact(x), [x, pact.alpha]),
        ("DSQ A4 (DSQActivation)", lambda: dsq(x), [x, dsq.lower, dsq.upper]),
        (
            "DSQ A4, learned temperature",
            lambda: dsq_learned(x),
            [x, dsq_learned.lower, dsq_learned.upper, dsq_learned.temperature_logit],
        ),
    ]
    for name, fwd, inputs in ours:
        case = Case("act", name, grad_step(fwd, inputs, g), mode=kernels_of(name), reference="ReLU")
        case.saved = saved_bytes_per_element(fwd, n)
        cases.append(case)
    if not quick:
        # What a user gets from torch.compile(model): the quantizers' ops stay opaque inside the compiled graph.
        relu_c = torch.compile(torch.relu)
        case = Case("act", "ReLU, torch.compile", grad_step(lambda: relu_c(x), [x], g), reference="ReLU")
        relu_c(x)  # compile before measuring the saved bytes
        case.saved = saved_bytes_per_element(lambda: relu_c(x), n)
        cases.append(case)
        for name, module, inputs in (("PACT A4", pact, [x, pact.alpha]), ("DSQ A4", dsq, [x, dsq.lower, dsq.upper])):
            compiled = torch.compile(module)
            fwd = lambda compiled=compiled: compiled(x)  # noqa: E731
            case = Case("act", f"{name}, torch.compile(module)", grad_step(fwd, inputs, g), reference="ReLU")
            fwd()  # compile before measuring the saved bytes
            case.saved = saved_bytes_per_element(fwd, n)
            cases.append(case)

    alpha = nn.Parameter(torch.tensor(2.5, device=DEVICE))
    dist = lambda: distiller_pact(x, alpha, 4)  # noqa: E731
    case = Case("act", "Distiller-style PACT A4", grad_step(dist, [x, alpha], g), reference="ReLU")
    case.saved = saved_bytes_per_element(dist, n)
    cases.append(case)
    if not quick:
        compiled = torch.compile(distiller_pact)
        dist_c = lambda: compiled(x, alpha, 4)  # noqa: E731
        case = Case("act", "Distiller-style PACT A4, torch.compile", grad_step(dist_c, [x, alpha], g), reference="ReLU")
        dist_c()  # compile before measuring the saved bytes
        case.saved = saved_bytes_per_element(dist_c, n)
        cases.append(case)
    fq = ao_fake_quantize(4, signed=False)().to(DEVICE)
    ao = lambda: fq(torch.relu(x))  # noqa: E731
    case = Case("act", "ReLU + torch.ao FakeQuantize A4", grad_step(ao, [x], g), reference="ReLU")
    case.saved = saved_bytes_per_element(ao, n)
    cases.append(case)
    return cases


def weight_cases(quick: bool) -> list[Case]:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(WEIGHT_SHAPE, device=DEVICE) * 0.05)
    gw = torch.randn(WEIGHT_SHAPE, device=DEVICE)
    xin = torch.randn(CONV_INPUT, device=DEVICE, requires_grad=True)
    gconv = torch.randn(CONV_INPUT[0], WEIGHT_SHAPE[0], CONV_INPUT[2], CONV_INPUT[3], device=DEVICE)
    n = w.numel()

    def conv(weight_fn: Callable[[], Tensor], params: list[Tensor]) -> Callable[[], object]:
        return grad_step(lambda: F.conv2d(xin, weight_fn(), padding=1), [xin, w, *params], gconv)

    cases = [
        Case("weight", "ReLU on the weight", grad_step(lambda: torch.relu(w), [w], gw), note="reference"),
        Case("weight", "conv, float weight", conv(lambda: w, []), note="reference (layer)"),
    ]
    dorefa = DoReFaWeight(4)
    dsq = DSQWeight(4).to(DEVICE)
    dsq.calibrate(w.detach())
    scalar = QuantNoiseWeight(4, p=0.5, mode="scalar").to(DEVICE)
    block = QuantNoiseWeight(4, p=0.1, mode="block", block_size=8).to(DEVICE)
    ours = [
        ("DoReFa W4 (DoReFaWeight)", dorefa, []),
        ("DSQ W4 (DSQWeight)", dsq, [dsq.lower, dsq.upper]),
        ("QuantNoise scalar int4, p=0.5", scalar, []),
        ("QuantNoise block, p=0.1", block, []),
    ]
    for name, module, params in ours:
        mode = kernels_of(name)
        fwd = lambda module=module: module(w)  # noqa: E731
        case = Case("weight", name, grad_step(fwd, [w, *params], gw), mode, "ReLU on the weight")
        case.saved = saved_bytes_per_element(fwd, n)
        cases.append(case)
        if not quick:
            cases.append(Case("weight", f"conv, {name}", conv(fwd, params), mode, "conv, float weight"))
    fq = ao_fake_quantize(4, signed=True)().to(DEVICE)
    ao = lambda: fq(w)  # noqa: E731
    case = Case("weight", "torch.ao FakeQuantize W4", grad_step(ao, [w], gw), reference="ReLU on the weight")
    case.saved = saved_bytes_per_element(ao, n)
    cases.append(case)
    if not quick:
        cases.append(Case("weight", "conv, torch.ao FakeQuantize W4", conv(ao, []), reference="conv, float weight"))
    return cases


@torch.no_grad()
def _calibrate_dsq(model: nn.Module, x: Tensor) -> None:
    """Set every DSQ activation range from one batch (what DSQCallback does on the first batch)."""
    hooks = []

    def hook(module: DSQActivation, args: tuple) -> None:
        site = module.upcoming_site()
        if not bool(module.calibrated[site]):
            module.calibrate(args[0], site)

    for module in model.modules():
        if isinstance(module, DSQActivation):
            hooks.append(module.register_forward_pre_hook(hook))
    model(x)
    for h in hooks:
        h.remove()


def step_cases(quick: bool) -> list[Case]:
    x = torch.randn(BATCH, device=DEVICE)
    y = torch.randint(0, 10, (BATCH[0],), device=DEVICE)

    def make(
        config: QuantConfig | None,
        p: float | None = None,
        transform: Callable | None = None,
        compile_model: bool = False,
    ) -> Callable:
        torch.manual_seed(0)
        model = DemoCNN(in_channels=BATCH[1], input_size=BATCH[2])
        if config is not None:
            inject_quantizers(model, config, warn=False, example_input=model.example_input_array)
        if transform is not None:
            transform(model)
        model.to(DEVICE)
        if p is not None:
            for module in model.modules():
                if isinstance(module, QuantNoiseWeight):
                    module.set_p(p)
        _calibrate_dsq(model, x)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        forward = torch.compile(model) if compile_model else model

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            sync()

        return step

    cases = [Case("step", "float (DemoCNN)", make(None), note="reference")]
    ours: list[tuple[str, QuantConfig, float | None]] = [
        ("PACT W4A4", PACTConfig(act_bits=4, weight_bits=4), None),
        ("DSQ W4A4", DSQConfig(act_bits=4, weight_bits=4), None),
        ("QuantNoise scalar int4, p=0.5", QuantNoiseConfig(weight_bits=4), 0.5),
    ]
    if not quick:
        ours.insert(1, ("PACT A4 (float weights)", PACTConfig(act_bits=4, weight_bits=None), None))
        ours.append(("QuantNoise block, p=0.1", QuantNoiseConfig(weight_bits=4, mode="block"), 0.1))
    for name, config, p in ours:
        cases.append(Case("step", name, make(config, p), kernels_of(name), "float (DemoCNN)"))
    cases.append(
        Case(
            "step", "torch.ao QAT W4A4", make(None, transform=lambda m: torch_ao_qat(m, 4)), reference="float (DemoCNN)"
        )
    )
    if not quick:
        # The whole model under torch.compile, against the float model compiled the same way.
        ref = "float (DemoCNN), torch.compile(model)"
        cases.append(Case("step", ref, make(None, compile_model=True), note="reference (compiled)"))
        for name, config in (
            ("PACT W4A4", PACTConfig(act_bits=4, weight_bits=4)),
            ("DSQ W4A4", DSQConfig(act_bits=4, weight_bits=4)),
        ):
            cases.append(Case("step", f"{name}, torch.compile(model)", make(config, compile_model=True), reference=ref))
    return cases


# ---------------------------------------------------------------------------------------------------- timing


def measure(cases: list[Case], reps: int, warmup: int) -> None:
    """Warm every case up (the first call, compile included, timed apart), then time them interleaved."""
    for case in cases:
        start = time.perf_counter()
        case.run()
        case.first_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            case.run()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            shift = r % len(cases)
            for case in cases[shift:] + cases[:shift]:
                start = time.perf_counter()
                case.run()
                case.times.append(time.perf_counter() - start)
    finally:
        gc.enable()


def measure_kernels(cases: list[Case], calls: int = 5) -> None:
    """CUDA: each case's summed kernel time per call. On a GPU the wall time of a small call is mostly the host
    launching kernels; this column shows what the device itself spends."""
    from torch.profiler import ProfilerActivity, profile

    for case in cases:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                case.run()
            sync()
        total_us = sum(e.self_device_time_total for e in prof.key_averages())
        case.kernel_ms = total_us / calls / 1e3


def ratio(case: Case, by_name: dict[str, Case]) -> float | None:
    ref = by_name.get(case.reference)
    return case.median_ms / ref.median_ms if ref is not None else None


def table(cases: list[Case], ref_label: str, with_saved: bool) -> list[str]:
    by_name = {c.name: c for c in cases if not c.mode}
    with_kernels = any(c.kernel_ms is not None for c in cases)
    head = f"| row | kernels | median ms | x {ref_label} |" + (" saved B/elem |" if with_saved else "")
    head += " GPU kernel ms | kernel x ref |" if with_kernels else ""
    lines = [head, "|---|---|---|---|" + ("---|" if with_saved else "") + ("---|---|" if with_kernels else "")]
    for c in cases:
        r = ratio(c, by_name)
        cells = [c.name, c.mode or "-", f"{c.median_ms:.2f}", "1.00" if not c.reference else f"{r:.2f}"]
        if with_saved:
            cells.append("-" if c.saved is None else f"{c.saved:.2f}")
        if with_kernels:
            ref = by_name.get(c.reference, c)
            cells += [f"{c.kernel_ms:.3f}", f"{c.kernel_ms / ref.kernel_ms:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    global DEVICE, ACT_SHAPE
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per row (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per row first (default 5)")
    parser.add_argument("--quick", action="store_true", help="8 repetitions, 2 warm-up calls, fewer rows")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--sections", nargs="+", default=["act", "weight", "step"], choices=["act", "weight", "step"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--act-batch", type=int, default=ACT_SHAPE[0], help="batch of the activation tensor")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    ACT_SHAPE = (args.act_batch, *ACT_SHAPE[1:])
    if args.quick:
        args.reps, args.warmup = min(args.reps, 8), min(args.warmup, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")

    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"threads: {torch.get_num_threads()}, CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    if DEVICE.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(DEVICE)}")
    print(f"repetitions: {args.reps} timed (interleaved, median) after {args.warmup} warm-up calls per row")
    print(f"activation tensor {ACT_SHAPE} float32; weight {WEIGHT_SHAPE}, conv input {CONV_INPUT}; step batch {BATCH}")
    print()

    start = time.perf_counter()
    library = native.library()
    build_s = time.perf_counter() - start
    print(f"native kernels: {'loaded' if library else native.build_error()} in {build_s:.2f} s (build or cache)\n")

    builders = {"act": activation_cases, "weight": weight_cases, "step": step_cases}
    titles = {
        "act": ("Activation quantizers, forward + backward", "ReLU", True),
        "weight": ("Weight quantizers, forward + backward", "ref", True),
        "step": ("DemoCNN training step (forward, cross-entropy, backward, Adam)", "float step", False),
    }
    results: dict[str, list[Case]] = {}
    markdown: list[str] = []
    for section in args.sections:
        start = time.perf_counter()
        cases = builders[section](args.quick)
        measure(cases, args.reps, args.warmup)
        if DEVICE.type == "cuda":
            measure_kernels(cases)
        title, ref_label, with_saved = titles[section]
        lines = table(cases, ref_label, with_saved)
        print(f"## {title}  ({time.perf_counter() - start:.0f} s)\n")
        print("\n".join(lines) + "\n")
        markdown += [f"**{title}**", "", *lines, ""]
        results[section] = cases

    print(f"## Start-up: the C library (build or disk cache) {build_s:.2f} s")
    print("\n## Markdown\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.reps}; command: "
        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`\n"
    )
    print("\n".join(markdown))
    if args.json:
        data = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "rows": [
                {
                    "section": c.section,
                    "name": c.name,
                    "mode": c.mode,
                    "median_ms": c.median_ms,
                    "reference": c.reference,
                    "saved_bytes_per_element": c.saved,
                    "first_call_s": c.first_s,
                    "kernel_ms": c.kernel_ms,
                }
                for cases in results.values()
                for c in cases
            ],
            "native_build_s": build_s,
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)


if __name__ == "__main__":
    main()
