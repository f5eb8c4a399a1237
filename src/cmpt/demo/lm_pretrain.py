"""The demo's small causal LM, pretrained on the training conversations (chat-templated text).

CoMP starts from a pretrained LLM (docs/method.md §2.1); the offline demo makes it here as a recipe
of the generic trainer (:func:`cmpt.demo.pretrain_run.train_into`): a BPE tokenizer and a Qwen2
causal LM whose loss is :func:`cmpt.losses.next_token_loss` on the LM body's hidden states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..losses import next_token_loss
from ..train import LossTerms
from .pretrain_run import ShuffledBatches, train_into

if TYPE_CHECKING:
    from .tiny_models import TinySizes

__all__ = ["CausalLMObjective", "LMPretrainTask", "chat_texts", "held_out_loss", "lm_batch", "pretrain_lm"]


def chat_texts(json_path: Path, tokenizer: Any = None) -> list[str]:
    """The conversations of a LLaVA JSON as text: raw turns, or chat-templated with ``tokenizer``."""
    texts = []
    for rec in json.loads(json_path.read_text()):
        msgs = [
            {
                "role": "user" if t["from"] == "human" else "assistant",
                "content": t["value"].replace("<image>\n", ""),
            }
            for t in rec["conversations"]
        ]
        if tokenizer is None:
            texts.extend(m["content"] for m in msgs)
        else:
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return texts


def lm_batch(seqs: list[Tensor], pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` and ``labels`` (−100 on padding)."""
    ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    labels = ids.masked_fill(mask == 0, -100)
    n = sum(len(s) for s in seqs)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "num_samples": len(seqs),
        "num_tokens": n,
    }


class CausalLMObjective(nn.Module):
    """A Hugging Face causal LM whose forward returns ``(summed next-token loss, token count)``: the
    LM body's hidden states (``get_decoder()``) through :func:`cmpt.losses.next_token_loss` with the
    LM head's weights, never a sequence × vocabulary logits tensor."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.lm.get_output_embeddings()
        return next_token_loss(hidden, labels, head.weight, head.bias)


class LMPretrainTask:
    """Causal-LM pretraining on tokenized texts (a :class:`~cmpt.train.Task`; loss term ``lm``,
    normalized by the number of predicted tokens of the step)."""

    def __init__(
        self, lm: nn.Module, tokenizer: Any, seqs: list[Tensor], *, batch_size: int, seed: int = 0
    ) -> None:
        self.model = CausalLMObjective(lm).train()
        self.tokenizer, self.seqs, self.batch_size, self.seed = tokenizer, seqs, batch_size, seed

    def param_groups(self) -> list[dict]:
        return [{"name": "lm", "params": list(self.model.parameters())}]  # lr: optim.lr

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.model.lm.get_decoder().layers)

    def _batch(self, idx: list[int], index: int) -> dict:
        return lm_batch([self.seqs[i] for i in idx], self.tokenizer.pad_token_id)

    def build_loader(self, rank: int, world_size: int) -> ShuffledBatches:
        n, bs = len(self.seqs), self.batch_size
        return ShuffledBatches(n, bs, self._batch, seed=self.seed, rank=rank, world_size=world_size)

    def loss_counts(self, batch: dict) -> dict[str, int]:
        return {"lm": int((batch["labels"][:, 1:] != -100).sum())}

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        total, count = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return LossTerms({"lm": total}, {"lm": count}, {"lm": 1.0})

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The LM and its tokenizer as an HF directory."""
        from .tiny_lm import save_tiny_lm

        save_tiny_lm(model.lm, self.tokenizer, out_dir)


@torch.no_grad()
def held_out_loss(model: CausalLMObjective, seqs: list[Tensor], pad_id: int, batch_size: int = 16) -> float:
    """Mean over batches of ``batch_size`` texts of the per-token next-token loss (eval mode)."""
    model.eval()
    losses = []
    for i in range(0, len(seqs), batch_size):
        b = lm_batch(seqs[i : i + batch_size], pad_id)
        total, count = model(b["input_ids"], b["attention_mask"], b["labels"])
        losses.append(float(total) / max(1, count))
    return sum(losses) / len(losses)


def pretrain_lm(out: Path, data: Path, s: TinySizes, seed: int) -> dict:
    """BPE tokenizer + Qwen2 causal LM pretrained on the training conversations (text only) into ``out``."""
    from .tiny_lm import build_tiny_causal_lm, train_tokenizer

    def encode(texts: list[str]) -> list[Tensor]:
        return [torch.tensor(tok(t, add_special_tokens=False)["input_ids"][: s.lm_max_len]) for t in texts]

    tok = train_tokenizer(chat_texts(data / "train.json"), vocab_size=s.lm_vocab)
    train = encode(chat_texts(data / "train.json", tok))
    test = encode(chat_texts(data / "test.json", tok))
    sizes = dict(hidden_size=s.lm_hidden, num_layers=s.lm_layers, num_heads=s.lm_heads)
    sizes |= dict(num_kv_heads=s.lm_kv_heads, intermediate_size=s.lm_intermediate)
    task = LMPretrainTask(
        build_tiny_causal_lm(tok, seed=seed, **sizes), tok, train, batch_size=s.lm_batch, seed=seed
    )
    before = held_out_loss(task.model, test, tok.pad_token_id)
    task.model.train()
    summary = train_into(
        task, out, steps=s.lm_steps, lr=s.lm_lr, weight_decay=0.01, seed=seed, name="LM pretraining"
    )
    after = held_out_loss(task.model.cpu(), test, tok.pad_token_id)
    stats = {
        "vocab_size": len(tok),
        "held_out_loss_before": before,
        "held_out_loss": after,
        "final_train_loss": summary["loss"],
        "train_tokens": sum(len(t) for t in train),
        "params": sum(p.numel() for p in task.model.parameters()),
    }
    (out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"  LM: held-out loss {before:.2f} -> {after:.2f} ({len(tok)} tokens vocabulary)")
    return stats
