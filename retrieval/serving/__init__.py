"""Serving a retriever: the encoders, corpus encoding, BM25, FAISS indexes and their tuning,
the one search interface and BM25 + dense fusion. Nothing here imports `retrieval.training`."""
