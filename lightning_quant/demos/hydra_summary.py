"""A Hydra callback that prints one table of every job's result at the end of a ``-m`` sweep.

Registered in ``conf/train.yaml`` under ``hydra.callbacks``. It reads the ``results.json`` that ``examples/train.py``
writes into each job's output directory, so it works with any launcher that leaves those files under the sweep dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.json"
_COLUMNS = ("job", "quant", "act_bits", "weight_bits", "test_acc", "overrides")


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Read every ``results.json`` below ``sweep_dir``, ordered by Hydra job number.

    Args:
        sweep_dir: The sweep's root directory (``hydra.sweep.dir``).

    Returns:
        One dict per finished job; jobs that crashed before writing their file are absent.
    """
    rows = []
    for path in Path(sweep_dir).rglob(RESULTS_FILE):
        with open(path) as f:
            rows.append(json.load(f))
    return sorted(rows, key=lambda r: (r.get("job_num") is None, r.get("job_num") or 0, str(r.get("output_dir"))))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render result rows as an aligned plain-text table (job, quant, bits, test accuracy, overrides).

    Args:
        rows: Dicts as written by ``examples/train.py``.

    Returns:
        The table, header first, one line per row.
    """

    def cell(row: dict[str, Any], key: str) -> str:
        if key == "job":
            return str(row.get("job_num", "-"))
        if key == "overrides":
            return " ".join(row.get("overrides", []))
        value = row.get(key)
        if key == "test_acc" and isinstance(value, (int, float)):
            return f"{value:.4f}"
        return "-" if value is None else str(value)

    table = [list(_COLUMNS)] + [[cell(r, k) for k in _COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ResultsTable(Callback):
    """At the end of a multirun, print every job's quant method, bits and test accuracy, and save them together.

    The combined rows also go to ``summary.json`` in the sweep dir, for scripts such as ``examples/demo.py``.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Collect the jobs' ``results.json`` files, print the table and write ``summary.json``.

        Args:
            config: Hydra's config for the sweep; only ``hydra.sweep.dir`` is read.
            **kwargs: Unused; part of Hydra's callback signature.
        """
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = collect_results(sweep_dir)
        if not rows:
            print(f"[results] no {RESULTS_FILE} found under {sweep_dir}")
            return
        with open(sweep_dir / SUMMARY_FILE, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"[results] {len(rows)} job(s) in {sweep_dir}:")
        print(format_table(rows), flush=True)
