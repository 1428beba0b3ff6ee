"""Inference library: metrics, distances, re-ranking, post-processing, aggregation, gallery bank, evaluation.

Modules: metrics (CMC/mAP/mINP), distance, rerank (k-reciprocal), postprocess (L2, PCA-whitening, DBA, alpha-QE),
aggregate (GAP/GMP/GeM/SPoC/R-MAC), bank (GalleryBank + faiss), extract (embeddings), evaluate (CLI).
Recognition: retriever (.pth or .onnx + fingerprint), crops, bankstore (versioned bank on disk), gallery (CLI),
match (bank search, open set, score rule), recognize (pipeline + CLI), e2e_eval ((a)-(d) table), draw, export.
"""
