"""An offline top-K teacher cache for :func:`distillkit.sparse_kd_loss` (docs/math.md §4).

:func:`write_teacher_topk` runs a teacher once over a token dataset and stores, per token
position, the teacher's K most likely next tokens and their log-probabilities at
temperature T; :class:`TeacherTopKDataset` and :func:`topk_loader` feed them back aligned
with the tokens, so the student trains without the teacher in memory.

On disk (a directory; numpy ``.npy`` files, memory-mapped when read)::

    index.json                  format, k, temperature, vocab_size, dtypes, sizes, chunk list
    sequences.npy               (num_sequences, 2) int64: [first position, length]
    chunk_00000_tokens.npy      (n,) int64 token ids            \
    chunk_00000_indices.npy     (n, k) int32 or int64           } chunk_tokens positions
    chunk_00000_logprobs.npy    (n, k) float16 or float32       / per chunk (the last: fewer)

Positions are the batches' tokens in order, row after row; a sequence may straddle
chunks. ``index.json`` is written last, so a directory without it is an interrupted write.
Storage per position is about k * (4 + 2) bytes with the defaults (int32, fp16): 192 B at
k = 32, against 2 * C bytes for a dense bf16 row (256 kB at C = 128256).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["write_teacher_topk", "TeacherTopKDataset", "collate_topk", "topk_loader"]

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SEQUENCES_FILE = "sequences.npy"
FIELDS = ("tokens", "indices", "logprobs")
INDEX_DTYPES = {torch.int32: "int32", torch.int64: "int64"}
LOGPROB_DTYPES = {torch.float16: "float16", torch.float32: "float32"}


def _logits_of(output: Any) -> Tensor:
    """Logits from a model's output: a tensor, an object with ``.logits`` (Hugging Face
    style) or a tuple whose first element is the logits."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"teacher must return logits, an object with .logits or a tuple "
                    f"(got {type(output).__name__})")


def _tokens_of(batch: Union[Tensor, Dict[str, Tensor]]) -> Tensor:
    tokens = batch["input_ids"] if isinstance(batch, dict) else batch
    if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() not in (1, 2):
        raise ValueError(f"token batches must be (B, S) or (S,) integer tensors "
                         f"(got {tuple(tokens.shape)} {tokens.dtype})")
    return tokens if tokens.dim() == 2 else tokens[None]


class _ChunkWriter:
    """Buffers positions and writes them in chunks of exactly chunk_tokens (the last:
    what remains)."""

    def __init__(self, path: str, chunk_tokens: int):
        self.path = path
        self.chunk_tokens = chunk_tokens
        self.buffer: Dict[str, List[np.ndarray]] = {f: [] for f in FIELDS}
        self.buffered = 0
        self.chunks: List[Dict[str, Any]] = []

    def add(self, **arrays: np.ndarray) -> None:
        for f in FIELDS:
            self.buffer[f].append(arrays[f])
        self.buffered += len(arrays["tokens"])
        while self.buffered >= self.chunk_tokens:
            self._flush(self.chunk_tokens)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        entry = {"size": n}
        for f in FIELDS:
            data = np.concatenate(self.buffer[f])
            name = f"chunk_{len(self.chunks):05d}_{f}.npy"
            np.save(os.path.join(self.path, name), data[:n])
            self.buffer[f] = [data[n:]]
            entry[f] = name
        self.buffered -= n
        self.chunks.append(entry)


@torch.no_grad()
def write_teacher_topk(
    teacher: nn.Module,
    token_batches: Iterable[Union[Tensor, Dict[str, Tensor]]],
    path: Union[str, os.PathLike],
    k: int,
    temperature: float = 1.0,
    chunk_tokens: int = 1 << 20,
    *,
    index_dtype: torch.dtype = torch.int32,
    logprob_dtype: torch.dtype = torch.float16,
    device: Optional[Union[str, torch.device]] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    r"""Runs ``teacher`` over ``token_batches`` and caches its top-``k`` per position.

    For every position of every batch, the cache holds the token id, the ``k`` classes
    with the largest :math:`\log \mathrm{softmax}(u / T)` (descending; ties as
    ``torch.topk``) and those log-probabilities, computed in fp32 and stored as
    ``logprob_dtype``. Feed them to :func:`distillkit.sparse_kd_loss` with the same
    ``temperature``.

    Args:
        teacher: maps (B, S) int64 token ids to (B, S, V) logits (or an output with
            ``.logits``, or a tuple led by them); run under ``no_grad`` in its current
            mode (call ``teacher.eval()`` first for dropout-free logits).
        token_batches: iterable of (B, S) or (S,) integer tensors, or dicts with
            ``"input_ids"``; S may differ between batches. Each row is one sequence.
        path: directory to write (created if needed).
        k: positions keep their k most likely classes, 1 <= k <= V.
        temperature: T > 0 of the teacher's softmax.
        chunk_tokens: positions per chunk file (bounds the writer's host memory).
        index_dtype: torch.int32 (default, V < 2**31) or torch.int64.
        logprob_dtype: torch.float16 (default) or torch.float32.
        device: where the batches are moved before the teacher runs (default: the
            teacher's first parameter's device, else CPU).
        overwrite: replace an existing cache in ``path`` (else FileExistsError).

    Returns:
        The index written to ``path/index.json``.
    """
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64 (got {index_dtype})")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be torch.float16 or torch.float32 (got {logprob_dtype})")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive int (got {k!r})")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive int (got {chunk_tokens!r})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        if not overwrite:
            raise FileExistsError(f"{index_path} exists; pass overwrite=True to replace the cache")
        os.remove(index_path)
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

    writer = _ChunkWriter(path, chunk_tokens)
    sequences: List[List[int]] = []
    position, vocab_size = 0, None
    for batch in token_batches:
        tokens = _tokens_of(batch)
        b, s = tokens.shape
        logits = _logits_of(teacher(tokens.to(device)))
        if logits.shape[:2] != (b, s) or logits.dim() != 3:
            raise ValueError(f"teacher must return (B, S, V) = ({b}, {s}, V) logits "
                             f"(got {tuple(logits.shape)})")
        vocab_size = logits.shape[-1]
        if k > vocab_size:
            raise ValueError(f"k must be at most the vocabulary size {vocab_size} (got {k})")
        if index_dtype == torch.int32 and vocab_size >= 2**31:
            raise ValueError(f"index_dtype=torch.int32 cannot hold {vocab_size} classes")
        logprobs, indices = torch.log_softmax(logits.float() / temperature, -1).topk(k, dim=-1)
        writer.add(tokens=tokens.reshape(-1).long().cpu().numpy(),
                   indices=indices.reshape(-1, k).to(index_dtype).cpu().numpy(),
                   logprobs=logprobs.reshape(-1, k).to(logprob_dtype).cpu().numpy())
        sequences += [[position + r * s, s] for r in range(b)]
        position += b * s
    writer.close()

    np.save(os.path.join(path, SEQUENCES_FILE), np.asarray(sequences, dtype=np.int64).reshape(-1, 2))
    index = {
        "format": FORMAT_VERSION, "k": k, "temperature": float(temperature),
        "vocab_size": vocab_size, "index_dtype": INDEX_DTYPES[index_dtype],
        "logprob_dtype": LOGPROB_DTYPES[logprob_dtype], "chunk_tokens": chunk_tokens,
        "num_tokens": position, "num_sequences": len(sequences),
        "sequences": SEQUENCES_FILE, "chunks": writer.chunks,
    }
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
    return index


class TeacherTopKDataset(Dataset):
    """One item per cached sequence: ``{"tokens": (S,) int64, "teacher_indices": (S, k)
    int32/int64, "teacher_logprobs": (S, k) fp16/fp32}``, row s of the teacher tensors
    belonging to token s (the teacher's prediction for the token after it, as the
    student's logits at s are). Chunks are memory-mapped and read on access.

    ``index`` holds the cache's metadata (k, temperature, vocab_size, dtypes, ...).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX_FILE)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{index_path} not found: not a teacher top-k cache, or "
                                    "an interrupted write")
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: unsupported cache format {self.index.get('format')}")
        self.sequences = np.load(os.path.join(self.path, self.index["sequences"]))
        self.chunk_tokens = self.index["chunk_tokens"]
        self._chunks: Dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.sequences)

    def _chunk(self, c: int, field: str) -> np.ndarray:
        key = (c, field)
        if key not in self._chunks:
            name = self.index["chunks"][c][field]
            self._chunks[key] = np.load(os.path.join(self.path, name), mmap_mode="r")
        return self._chunks[key]

    def _positions(self, field: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of a field, across chunk boundaries."""
        parts = []
        while start < stop:
            c, offset = divmod(start, self.chunk_tokens)
            n = min(stop - start, self.chunk_tokens - offset)
            parts.append(self._chunk(c, field)[offset:offset + n])
            start += n
        # A copy: memory maps are read-only, and torch wants writable arrays.
        return torch.from_numpy(np.array(np.concatenate(parts) if parts else
                                         self._chunk(0, field)[:0]))

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        start, length = (int(v) for v in self.sequences[i])
        return {"tokens": self._positions("tokens", start, start + length),
                "teacher_indices": self._positions("indices", start, start + length),
                "teacher_logprobs": self._positions("logprobs", start, start + length)}


def collate_topk(items: List[Dict[str, Tensor]], pad_token: int = 0) -> Dict[str, Tensor]:
    """Stacks items into (B, S_max) batches, padding shorter sequences at the end: tokens
    with ``pad_token``, teacher indices with -1 (so :func:`distillkit.sparse_kd_loss`
    skips those positions as dead rows), log-probabilities with 0; ``mask`` (B, S_max)
    is True at real positions."""
    s_max = max(len(it["tokens"]) for it in items)
    k = items[0]["teacher_indices"].shape[-1]
    b = len(items)
    out = {"tokens": torch.full((b, s_max), pad_token, dtype=torch.int64),
           "teacher_indices": torch.full((b, s_max, k), -1,
                                         dtype=items[0]["teacher_indices"].dtype),
           "teacher_logprobs": torch.zeros((b, s_max, k),
                                           dtype=items[0]["teacher_logprobs"].dtype),
           "mask": torch.zeros((b, s_max), dtype=torch.bool)}
    for r, it in enumerate(items):
        s = len(it["tokens"])
        out["tokens"][r, :s] = it["tokens"]
        out["teacher_indices"][r, :s] = it["teacher_indices"]
        out["teacher_logprobs"][r, :s] = it["teacher_logprobs"]
        out["mask"][r, :s] = True
    return out


def topk_loader(path: Union[str, os.PathLike], batch_size: int, *, shuffle: bool = False,
                pad_token: int = 0, **loader_kwargs: Any) -> DataLoader:
    """A DataLoader over :class:`TeacherTopKDataset` batched by :func:`collate_topk`."""
    return DataLoader(TeacherTopKDataset(path), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=functools.partial(collate_topk, pad_token=pad_token), **loader_kwargs)
