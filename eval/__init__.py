"""The evaluation stage and what reads its results: `evaluate` (a model or BM25 on one dataset
split), the run registry, paired comparisons between runs, and report tables and plots. Datasets
and metrics live in `retroflow`; Prefect artifacts are made from these in `flows/`."""
