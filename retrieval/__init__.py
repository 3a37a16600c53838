"""Dense and sparse retrieval: encoders, BM25, FAISS search, fine-tuning and negatives."""
