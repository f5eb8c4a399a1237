"""The CoMP vision-language model: patch merger, chat rendering, assembly (SPEC §2)."""
