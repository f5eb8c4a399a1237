"""Multimodal embeddings (docs/method.md §3): :class:`~cmpt.embed.embedder.Embedder` over a backbone —
a cmpt VLM or a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint (:mod:`cmpt.embed.backbones`)."""
