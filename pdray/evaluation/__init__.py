"""Evaluation and pages: judges and metrics, eval.json, report.html, study tables and figures, W&B and
metrics.jsonl."""
