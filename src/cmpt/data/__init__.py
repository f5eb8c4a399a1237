"""Data sources, validation and batching (SPEC §4); the synthetic offline data is in :mod:`cmpt.demo`."""
