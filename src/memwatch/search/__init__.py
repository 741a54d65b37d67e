"""Nearest-neighbour search over embeddings: exact in chunks, FAISS indexes for large sets, and all-pairs search."""
