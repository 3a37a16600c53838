"""retroflow: RetroMAE pretraining to BEIR evaluation as a resumable pipeline.

Shared plumbing lives here (typed configs, the content-addressed artifact store, devices,
the CLI entry point); the stages live in `retromae/`, `retrieval/` and `eval/`, and the
Prefect wiring in `flows/`.
"""

__version__ = "0.1.0"
