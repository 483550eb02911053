"""A sweep's report from MLflow: one module per job.

``data`` (runs -> a frame of the newest FINISHED run per trial; the published numbers), ``tables``
(summary, per-paper and pairwise tables -> markdown/CSV/LaTeX), ``plots`` (metric bars and curves),
``figures`` (qualitative grids), ``build`` (the report directory and ``python -m bench.report``).
"""
from bench.report.build import build_report, main

__all__ = ["build_report", "main"]
