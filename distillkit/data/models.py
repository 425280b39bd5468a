"""A small byte-level causal transformer and its tokenization, for the LM distillation trainer.

Token ids 0–255 are the bytes of UTF-8 text; :data:`BOS`, :data:`EOS` and :data:`PAD`
follow, so the vocabulary has :data:`VOCAB_SIZE` = 259 ids. :class:`ByteTransformer`
follows the protocol :class:`distillkit.trainers.LMDistillationTrainer` expects:
``model(tokens (B, S)) -> hidden states (B, S, H)``, with the language-model head
kept apart as ``model.lm_head`` (an ``nn.Linear(H, VOCAB_SIZE)``), so the trainer can
fuse the head into the loss instead of materialising (B, S, V) logits.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BOS", "EOS", "PAD", "VOCAB_SIZE", "ByteTransformer", "byte_sequences"]

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def byte_sequences(texts: Iterable[str], seq_len: int) -> Tensor:
    """Token rows (num_sequences, ``seq_len``) int64 for ``texts``.

    Each text becomes ``BOS, its UTF-8 bytes, EOS``, cut into consecutive windows
    of ``seq_len`` tokens; a text's last window is right-padded with :data:`PAD`,
    so rows have uneven numbers of real tokens. A window never spans two texts.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a token and its successor), got {seq_len}")
    rows: List[Tensor] = []
    for text in texts:
        ids = torch.tensor([BOS, *text.encode("utf-8"), EOS], dtype=torch.int64)
        pad = -len(ids) % seq_len
        rows.append(F.pad(ids, (0, pad), value=PAD).view(-1, seq_len))
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.int64)
    return torch.cat(rows)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.mlp_norm(x))


class ByteTransformer(nn.Module):
    """Causal byte-level transformer returning final hidden states.

    Token embedding plus a learned position embedding (up to ``max_len``
    positions), ``layers`` pre-norm blocks of causal multi-head self-attention
    (:func:`torch.nn.functional.scaled_dot_product_attention`, ``is_causal=True``)
    and a 4×-wide GELU MLP, a final LayerNorm. ``forward(tokens (B, S) int64)``
    returns hidden states (B, S, ``dim``); logits are ``self.lm_head(hidden)``,
    ``lm_head`` being an ``nn.Linear(dim, vocab_size, bias=False)`` that forward
    does not call. Position s sees tokens 0..s only, so right padding does not
    change the hidden states of the real tokens before it.
    """

    def __init__(self, dim: int = 128, layers: int = 4, heads: int = 4, max_len: int = 512,
                 vocab_size: int = VOCAB_SIZE, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads (got dim={dim}, heads={heads})")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's scale: N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
