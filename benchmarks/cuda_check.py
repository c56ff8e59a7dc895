"""CUDA smoke check (not a test: CI has no GPU). Run on a GPU machine from the repository root::

    PYTHONPATH=. python benchmarks/cuda_check.py

For each callback it trains the demo CNN on digits on the GPU in fp32 and bf16-mixed, checks every parameter stays
on the GPU and finite, that the quantizer parameters moved, and that ``load_from_checkpoint`` gives the same eval
outputs on the GPU; then it compares each quantizer's forward and backward on CUDA with the CPU result, and each
custom op's Triton kernel on CUDA with the torch reference on the same CUDA tensors (the forwards and the input
gradients must be bit-identical; DSQ's gradients agree to float32 rounding). benchmarks/gpu_check.sh runs it
with the speed rows of the GPU targets.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quant import DSQCallback, PACTCallback, QuantNoiseCallback, load_from_checkpoint
from lightning_quant.demos import DemoCNN, DigitsDataModule
from lightning_quant.quantizers import DoReFaWeight, DSQActivation, DSQWeight, PACTActivation, QuantNoiseWeight


def check_training(name: str, make_callback, precision: str, root: Path) -> str:
    L.seed_everything(0, verbose=False)
    model = DemoCNN(input_size=8)
    ckpt = ModelCheckpoint(dirpath=root / f"{name}-{precision}", save_last=True)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[make_callback(), ckpt],
    )
    cb = trainer.callbacks[0]
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    # Lightning moves the model back to the CPU at teardown; what matters is that training on the GPU kept it finite.
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values()), name
    (result,) = trainer.test(model, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    loaded = load_from_checkpoint(DemoCNN, ckpt.last_model_path).cuda()
    x = torch.randn(16, 1, 8, 8, device="cuda")
    model.cuda().eval()
    with torch.no_grad():
        same = torch.equal(loaded(x), model(x))
    quantizer_params = [n for n, _ in cb.quantizer_parameters(model)]
    acc = result["test/acc"]
    return f"{name:12s} {precision:10s} test_acc={acc:.4f} reload_equal={same} quantizer_params={len(quantizer_params)}"


def compare_devices() -> list[str]:
    torch.manual_seed(0)
    out = []
    x = torch.randn(4096) * 3
    modules = {
        "PACTActivation": PACTActivation(4, alpha_init=2.0),
        "DSQActivation": DSQActivation(4),
        "DoReFaWeight": DoReFaWeight(4),
        "DSQWeight": DSQWeight(4),
        "QuantNoiseWeight(eval)": QuantNoiseWeight(4, p=0.5).eval(),
    }
    for name, module in modules.items():
        if isinstance(module, DSQActivation):
            module.calibrate(x, 0)
        if isinstance(module, DSQWeight):
            module.calibrate(x)
        results = []
        for device in ("cpu", "cuda"):
            m = module.to(device)
            xi = x.to(device).clone().requires_grad_(True)
            y = m(xi)
            y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
            learned = [p for p in m.parameters() if p.requires_grad]  # DSQActivation keeps `lower` fixed
            grads = [p.grad.detach().cpu().clone() for p in learned]
            for p in learned:
                p.grad = None
            results.append((y.detach().cpu(), xi.grad.cpu(), grads))
        (y0, g0, p0), (y1, g1, p1) = results
        out.append(
            f"{name:24s} forward max|cpu-cuda|={float((y0 - y1).abs().max()):.2e}"
            f" grad_x max={float((g0 - g1).abs().max()):.2e}"
            + "".join(f" grad_param max={float((a - b).abs().max()):.2e}" for a, b in zip(p0, p1))
        )
    return out


def check_triton_kernels() -> list[str]:
    """Each op on CUDA (its Triton kernel) against its torch reference on the same tensors."""
    from lightning_quant.functional import _dispatch, dorefa, dsq, lsq, pact

    assert _dispatch.triton_kernels() is not None, "triton is not importable: the CUDA ops run the torch reference"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1 << 20, device="cuda", generator=g) * 2
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    grad = torch.randn(x.shape, device="cuda", generator=g)
    alpha, lo, up, temp = (torch.tensor(v, device="cuda") for v in ([1.5], 0.0, 2.5, 0.3))
    q, code = pact.pact_forward(x, alpha, 15, 0.0)
    t = torch.tanh(x)
    d_args = (4, 1e-8, 1)
    pairs = {
        "pact_forward": (pact.pact_forward(x, alpha, 15, 0.0), pact.pact_forward_reference(x, alpha, 15, 0.0)),
        "pact_backward": (pact.pact_backward(grad, code), pact.pact_backward_reference(grad, code)),
        "dorefa_forward": (dorefa.dorefa_forward(t, 15), dorefa.dorefa_forward_reference(t, 15)),
        "dsq_forward": (
            (dsq.dsq_forward(x, lo, up, temp, *d_args),),
            (dsq.dsq_forward_reference(x, lo, up, temp, *d_args),),
        ),
    }
    _, m, d = pairs["dorefa_forward"][1]
    pairs["dorefa_backward"] = (
        (dorefa.dorefa_backward(grad, t, m, d, 15),),
        (dorefa.dorefa_backward_reference(grad, t, m, d, 15),),
    )
    w, step = x[: 64 * 4096].view(64, 4096) * 0.05, torch.rand(64, 1, device="cuda", generator=g) * 0.01 + 0.001
    out_w, v = lsq.lsq_forward(w, step, 8, 7, 0.01, 1e-6)
    pairs["lsq_forward"] = ((out_w, v), lsq.lsq_forward_reference(w, step, 8, 7, 0.01, 1e-6))
    pairs["lsq_backward"] = (
        lsq.lsq_backward(grad[: w.numel()].view(w.shape), v, step, 8, 7, 0.01)[:1],
        lsq.lsq_backward_reference(grad[: w.numel()].view(w.shape), v, step, 8, 7, 0.01)[:1],
    )
    s, b = torch.tensor([0.05], device="cuda"), torch.tensor([-0.61], device="cuda")
    out_p, q_p = lsq.lsq_plus_forward(x, s, b, 15, 0.01, 1e-3)
    pairs["lsq_plus_forward"] = ((out_p, q_p), lsq.lsq_plus_forward_reference(x, s, b, 15, 0.01, 1e-3))
    pairs["lsq_plus_backward"] = (
        lsq.lsq_plus_backward(grad, q_p, s, b, 15, 0.01, 1e-3)[:1],
        lsq.lsq_plus_backward_reference(grad, q_p, s, b, 15, 0.01, 1e-3)[:1],
    )
    out = []
    for name, (got, want) in pairs.items():
        same = all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(got, want))
        out.append(f"{name:24s} bit-identical to the reference: {same}")
        assert same, name
    got = dsq.dsq_backward(grad, x, lo, up, temp, *d_args, True, True)
    want = dsq.dsq_backward_reference(grad, x, lo, up, temp, *d_args, True, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    out.append("dsq_backward             within float32 rounding of the reference: True")
    return out


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for line in check_triton_kernels():
        print(line, flush=True)
    for line in compare_devices():
        print(line, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("32-true", "bf16-mixed"):
            for name, make in (
                ("pact", lambda: PACTCallback(4, 4, verbose=False)),
                ("dsq", lambda: DSQCallback(4, 4, verbose=False)),
                ("quant_noise", lambda: QuantNoiseCallback(4, p=0.5, verbose=False)),
            ):
                print(check_training(name, make, precision, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
