"""retroflow: RetroMAE pretraining to BEIR evaluation as a resumable pipeline.

The foundation every stage builds on: typed configs, the content-addressed artifact store and its
code keys, atomic publishing, checkpoints and the one training loop, devices and precision, model
loading, dataset readers (BEIR, MS MARCO, NQ) and IR metrics. The stages live in `retromae/`,
`retrieval/` and `eval/`; the chain, the CLI and the Prefect wiring in `flows/`.
"""

__version__ = "0.1.0"
