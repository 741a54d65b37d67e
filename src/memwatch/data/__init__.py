"""Training and holdout data: reference sets in folders, manifests and container files, image decoding, the embedding
and file-hash caches, the reference index, and the training-set analysis."""
