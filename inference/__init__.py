"""Inference library: metrics, distances, re-ranking, post-processing, aggregation, gallery bank, evaluation.

Modules: metrics (CMC/mAP/mINP), distance, rerank (k-reciprocal), postprocess (L2, PCA-whitening, DBA, alpha-QE),
aggregate (GAP/GMP/GeM/SPoC/R-MAC), bank (GalleryBank + faiss), extract (embeddings), evaluate (CLI).
"""
