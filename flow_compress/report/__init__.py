"""The report of a compression on disk: ``report.json`` (the ``CompressionReport``),
``report.md`` (``report.markdown``) and the dynamics plots (``report.plots``)."""

from __future__ import annotations

import json
from pathlib import Path

from flow_compress.artifacts import atomic_write_text
from flow_compress.report.markdown import md_table, render_markdown
from flow_compress.report.plots import PLOT_NAMES, plot_dynamics
from flow_compress.schema import CompressionReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def write_report(report: CompressionReport, out_dir: Path) -> list[str]:
    """Write ``report.json`` (the pydantic model, indented), ``report.md`` and the plots into
    ``out_dir``, each atomically; return the file names written, in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / REPORT_JSON, report.model_dump_json(indent=2) + "\n")
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report))
    return [REPORT_JSON, REPORT_MD, *plot_dynamics(report, out_dir)]


def load_report(path: str | Path) -> CompressionReport:
    """A ``report.json`` (of any schema version) as a ``CompressionReport``."""
    return CompressionReport.model_validate(json.loads(Path(path).read_text()))


__all__ = [
    "PLOT_NAMES",
    "REPORT_JSON",
    "REPORT_MD",
    "load_report",
    "md_table",
    "plot_dynamics",
    "render_markdown",
    "write_report",
]
