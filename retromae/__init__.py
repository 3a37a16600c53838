"""RetroMAE: retrieval-oriented pretraining with a masked auto-encoder (model, collator, trainer)."""
