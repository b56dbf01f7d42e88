"""Sweep-level results tables (CSV and Markdown) from one row per job.

Each job writes its own row file atomically (``rows/<job>.json`` in the sweep folder; no two
jobs touch the same file, so no lock is needed) and then rebuilds the tables from all row
files present. :class:`ResultsTableCallback` rebuilds them once more when the multirun ends,
so the final tables hold every finished job even when jobs ran in parallel.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import format_value, write_json, write_text

__all__ = ["write_row", "aggregate", "write_tables", "read_rows", "ResultsTableCallback"]


def write_row(folder: Path, job: str, row: dict[str, Any]) -> None:
    """Write one job's row and rebuild the tables in ``folder``."""
    write_json(folder / "rows" / f"{job}.json", row)
    aggregate(folder)


def read_rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    files = sorted((folder / "rows").glob("*.json"), key=lambda p: (len(p.stem), p.stem))
    for f in files:
        rows.append(json.loads(f.read_text()))
    return rows


def aggregate(folder: Path) -> list[dict[str, Any]]:
    """Rebuild results.csv and results.md in ``folder`` from its row files; return the rows."""
    return write_tables(folder, read_rows(folder))


def write_tables(folder: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``rows`` as results.csv and results.md in ``folder`` (columns in order of first appearance)."""
    if not rows:
        return rows
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / "results.csv", buf.getvalue())
    md = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    md += ["| " + " | ".join(format_value(r.get(c, "")) for c in columns) + " |" for r in rows]
    write_text(folder / "results.md", "\n".join(md) + "\n")
    return rows


class ResultsTableCallback(Callback):
    """Hydra callback: at the end of a multirun, rebuild and print the sweep's results table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        rows = aggregate(folder)
        if rows:
            print(f"\nResults of {len(rows)} jobs: {folder / 'results.md'}")
            print((folder / "results.md").read_text(), flush=True)
