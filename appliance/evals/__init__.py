"""Eval suites: cases on disk, graders for answers, statistics for scores, and the HTML
report of a run. Pure logic only: the runner that sends cases to models, the CLI and
the promotion gate call into this package."""

from __future__ import annotations

from .graders import GRADER_TYPES, Grader, SuiteError, Verdict, grade, parse_grader
from .report import render_html, summarize_text
from .stats import accuracy, auc, bootstrap_ci, f1, percentile, wilson
from .suite import Case, Suite, SuiteSettings, TensorCase, load_suite, tags_of

__all__ = [
    "GRADER_TYPES",
    "Case",
    "Grader",
    "Suite",
    "SuiteError",
    "SuiteSettings",
    "TensorCase",
    "Verdict",
    "accuracy",
    "auc",
    "bootstrap_ci",
    "f1",
    "grade",
    "load_suite",
    "parse_grader",
    "percentile",
    "render_html",
    "summarize_text",
    "tags_of",
    "wilson",
]
