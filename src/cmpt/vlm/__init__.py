"""The CoMP vision-language model: patch merger, chat rendering, assembly (docs/method.md §2)."""
