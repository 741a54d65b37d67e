"""Tolerances for results that must agree across batch sizes, chunkings, process splits and processors.

CPU kernels (oneDNN, MKL, OpenBLAS) choose their blocking by batch size, matrix shape and processor, so
float32 sums of the same numbers differ in their last bits, and a sampling loop carries that further:
between batch sizes 2 and 1, 1.7e-5 was seen on one 2-core machine where another of the same kind gave
exactly 0. A property that holds "whatever the batch" is therefore asserted with these tolerances, never
bit for bit. Results that differ for a real reason (another seed, another prompt, other noise) differ by
orders of magnitude more, and the tests check that too.
"""

#: one forward pass or one distance computation (embeddings, denoising losses, noise predictions)
ONE_PASS = {"atol": 1e-4, "rtol": 1e-4}
#: a few denoising steps of a sample in [0, 1] (or its latents)
SAMPLING = {"atol": 1e-3, "rtol": 0.0}
