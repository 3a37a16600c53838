"""Dense and sparse retrieval, as two jobs: `training` a retriever (negatives, the teacher,
fine-tuning) and `serving` one (encoders, BM25, FAISS indexes, search, fusion). Training may
import serving (negatives are mined by searching); serving never imports training."""
