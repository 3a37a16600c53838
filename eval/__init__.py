"""Evaluation: dataset loading and validation, IR metrics, evaluation suites and reports."""
