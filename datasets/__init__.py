"""Readers, ROI cropping, webdataset shards and streaming loaders (this project's, not Hugging Face's)."""
