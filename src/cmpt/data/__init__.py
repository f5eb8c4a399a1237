"""Data sources, synthetic offline data, validation and batching (SPEC §4)."""
