"""Token mixers, blocks, multi-dimensional scans and stacks (built on ``seqapps.kernels``)."""
