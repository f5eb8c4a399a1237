"""Data sources, validation and batching (method.md §4); the synthetic offline data is in :mod:`cmpt.demo`."""
