"""`make demo`: float baseline against PACT W4A4 on the 8x8 digits, as a 2-job Hydra sweep.

Runs ``examples/train.py -m quant=none,pact`` in a subprocess (a fixed sweep dir, ``outputs/demo``), then prints one
line comparing the two test accuracies. Extra arguments are passed on as Hydra overrides, e.g.
``python examples/demo.py trainer.max_epochs=3``. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP_DIR = ROOT / "outputs" / "demo"


def run_demo(extra_overrides: list[str]) -> dict[str, dict]:
    """Run the sweep and return each quant option's ``results.json``.

    Args:
        extra_overrides: Hydra overrides appended to the sweep's command line.

    Returns:
        ``{"none": {...}, "pact": {...}}`` with ``test_acc``, ``act_bits``, ``weight_bits`` and more.

    Raises:
        RuntimeError: If the sweep fails or a job leaves no ``results.json``.
    """
    # Start clean so a failed job cannot be reported with a previous run's numbers.
    shutil.rmtree(SWEEP_DIR, ignore_errors=True)
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "-m",
        "quant=none,pact",
        "data=digits",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={SWEEP_DIR}",
        *extra_overrides,
    ]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise RuntimeError("The demo sweep failed; see the output above.")
    results = {}
    for path in sorted(SWEEP_DIR.glob("*/results.json")):
        result = json.loads(path.read_text())
        results[result["quant"]] = result
    if set(results) != {"none", "pact"}:
        raise RuntimeError(
            f"Expected results for quant=none and quant=pact under {SWEEP_DIR}, found {sorted(results)}."
        )
    return results


def main() -> None:
    """Run the demo sweep and print the comparison line."""
    results = run_demo(sys.argv[1:])
    fp32, pact = results["none"], results["pact"]
    # Name the bits the PACT job really ran with, so overrides such as quant.act_bits=2 are labelled truthfully.
    label = f"W{pact['weight_bits'] or 32}A{pact['act_bits'] or 32}"
    print(
        f"FP32 test acc {fp32['test_acc']:.4f} vs PACT {label} test acc {pact['test_acc']:.4f}  (details: {SWEEP_DIR})"
    )


if __name__ == "__main__":
    main()
