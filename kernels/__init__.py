"""The recurrences as plain functions over tensors, layout ``[B, T, H, D]``."""
