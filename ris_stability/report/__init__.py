"""Markdown reports with figures from a run folder's trace files, and side-by-side comparisons."""

from ris_stability.report.build import ReportError, build_report, render_report
from ris_stability.report.compare import build_comparison

__all__ = ["ReportError", "build_report", "build_comparison", "render_report"]
