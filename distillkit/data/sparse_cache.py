"""An offline top-K teacher cache for :func:`distillkit.sparse_kd_loss` (docs/math.md §4).

:func:`write_teacher_topk` runs a teacher once over a token dataset and stores, per token
position, the teacher's K most likely next tokens, their log-probabilities at
temperature T and the log of the probability left to the other V - K classes (the tail
bucket of :func:`distillkit.sparse_kd_loss`, docs/math.md §4.1);
:class:`TeacherTopKDataset` and :func:`topk_loader` feed them back aligned with the
tokens, so the student trains without the teacher in memory.

On disk (a directory; numpy ``.npy`` files, memory-mapped when read)::

    index.json                  format, k, temperature, vocab_size, dtypes, sizes, chunk list
    sequences.npy               (num_sequences, 2) int64: [first position, length]
    chunk_00000_tokens.npy      (n,) int64 token ids            \
    chunk_00000_indices.npy     (n, k) int32 or int64           } chunk_tokens positions
    chunk_00000_logprobs.npy    (n, k) float16 or float32       | per chunk (the last: fewer)
    chunk_00000_tail.npy        (n,) float32 log tail mass      /

Positions are the batches' tokens in order, row after row; a sequence may straddle
chunks. A cache is written whole into a temporary sibling directory (``.<name>.*.tmp``),
every file fsynced, and only then renamed to ``path`` (atomically exchanged with the old
cache under ``overwrite=True``): a writer killed at any instant leaves ``path`` as it
was, the old cache or nothing, plus at most a stale temporary sibling.
Format 2 added the tail files; a format-1 cache (no tail) still opens, with a warning,
and its tail is derived from the stored log-probabilities (see
:class:`TeacherTopKDataset`).
:class:`TeacherTopKDataset` checks that the files agree with the index (names, shapes,
dtypes, row counts, no missing or extra chunk file, no truncated file) and names the
file that does not.
Storage per position is about k * (4 + 2) + 4 bytes with the defaults (int32, fp16): 196 B
at k = 32, against 2 * C bytes for a dense bf16 row (256 kB at C = 128256).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import numbers
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["write_teacher_topk", "TeacherTopKDataset", "collate_topk", "topk_loader",
           "teacher_topk", "tail_from_logprobs"]

FORMAT_VERSION = 2
# Format 1: no tail files; read, with the tail derived from the log-probabilities.
READ_VERSIONS = (1, 2)
INDEX_FILE = "index.json"
SEQUENCES_FILE = "sequences.npy"
FIELDS = ("tokens", "indices", "logprobs", "tail")
TAIL_DTYPE = "float32"
INDEX_DTYPES = {torch.int32: "int32", torch.int64: "int64"}
LOGPROB_DTYPES = {torch.float16: "float16", torch.float32: "float32"}


def _logits_of(output: Any) -> Tensor:
    """Logits from a model's output: a tensor, an object with ``.logits`` (Hugging Face
    style) or a tuple whose first element is the logits."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"teacher must return logits, an object with .logits or a tuple "
                    f"(got {type(output).__name__})")


def _tokens_of(batch: Union[Tensor, Dict[str, Tensor]]) -> Tensor:
    tokens = batch.get("input_ids") if isinstance(batch, dict) else batch
    if not (isinstance(tokens, Tensor) and tokens.dtype in (torch.int64, torch.int32)
            and tokens.dim() in (1, 2)):
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"token_batches must yield (B, S) or (S,) integer tensors or dicts "
                         f"with 'input_ids' (got {shape} {getattr(tokens, 'dtype', '')})")
    return tokens if tokens.dim() == 2 else tokens[None]


def _save_synced(path: str, write) -> None:
    """``write(f)`` into a new file at ``path``, flushed and fsynced before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            _save_synced(os.path.join(self.path, name), functools.partial(np.save, arr=data[:n]))
            self.buffer[f] = [data[n:]]
            entry[f] = name
        self.buffered -= n
        self.chunks.append(entry)


def teacher_topk(logits: Tensor, k: int, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` log-probabilities of ``softmax(logits / T)`` over the last dim (in
    fp32, descending, ties as ``torch.topk``), their classes, and the log of the mass of
    the other classes, ``logsumexp`` of their log-probabilities: formed from the tail
    classes themselves, so a tail of 1e-30 is not lost to ``1 - sum`` (-inf when k = V)."""
    log_p = torch.log_softmax(logits.float() / temperature, -1)
    logprobs, indices = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), -1)
    return logprobs, indices, tail


def tail_from_logprobs(logprobs: Tensor) -> Tensor:
    """log(1 - sum exp(logprobs)) over the last dim, in fp32: the tail of a format-1 cache.
    Limited by the stored log-probabilities' rounding (fp16: about 5e-4 of the kept
    mass); a kept mass that rounds to 1 or above gives -inf (no tail)."""
    kept = torch.exp(logprobs.float()).sum(-1)
    return torch.where(kept < 1, torch.log1p(-kept.clamp(max=1)), torch.full_like(kept, float("-inf")))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_write_arguments(teacher, token_batches, path, k, temperature, chunk_tokens,
                           index_dtype, logprob_dtype, device, overwrite) -> Tuple[str, torch.device]:
    """Every argument of :func:`write_teacher_topk` that can be checked before the teacher
    runs; returns the absolute path and the device. Touches nothing on disk."""
    if not callable(teacher):
        raise TypeError(f"teacher must be a module mapping tokens to logits "
                        f"(got {type(teacher).__name__})")
    try:
        iter(token_batches)
    except TypeError:
        raise TypeError(f"token_batches must be an iterable of token batches "
                        f"(got {type(token_batches).__name__})") from None
    if not (_is_int(k) and k >= 1):
        raise ValueError(f"k must be a positive int (got {k!r})")
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number (got {temperature!r})")
    if not (_is_int(chunk_tokens) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive int (got {chunk_tokens!r})")
    if index_dtype not in tuple(INDEX_DTYPES):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64 (got {index_dtype})")
    if logprob_dtype not in tuple(LOGPROB_DTYPES):
        raise ValueError(f"logprob_dtype must be torch.float16 or torch.float32 (got {logprob_dtype})")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool (got {type(overwrite).__name__})")
    if device is None:
        param = next(teacher.parameters(), None) if isinstance(teacher, nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device (got {device!r}: {e})") from None
    try:
        # A symlinked cache is replaced where it lives, the link kept (and the temporary
        # sibling is on the target's filesystem, so the rename is atomic).
        path = os.path.realpath(os.fspath(path))
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike (got {type(path).__name__})") from None
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"path {path} exists and is not a directory")
        if os.path.lexists(index_path):
            if not overwrite:
                raise FileExistsError(f"{index_path} exists; pass overwrite=True to replace "
                                      "the cache")
        elif os.listdir(path):
            raise FileExistsError(f"path {path} is a non-empty directory without {INDEX_FILE} "
                                  "(not a teacher top-k cache): refusing to replace it")
    return path, device


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the OS or filesystem cannot (e.g. NFS)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _install(new: str, path: str) -> None:
    """Make the complete cache directory ``new`` the one at ``path``, replacing an old one."""
    if not os.path.exists(os.path.join(path, INDEX_FILE)):
        os.rename(new, path)  # path is absent or an empty directory: one atomic rename
    elif _exchange(new, path):
        shutil.rmtree(new)  # the old cache, now at the temporary name
    else:
        # No atomic exchange here: between these two renames path is absent and the old
        # cache sits, complete, at the temporary name.
        old = tempfile.mkdtemp(prefix=os.path.basename(new) + ".", suffix=".old",
                               dir=os.path.dirname(path))
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    _fsync_dir(os.path.dirname(path))


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
    ``logprob_dtype``, and the log of the teacher's remaining mass (fp32, the
    ``logsumexp`` over the other classes: :func:`teacher_topk`). Feed them to
    :func:`distillkit.sparse_kd_loss` (the tail as ``teacher_tail_logprob``) or
    :func:`distillkit.fused_linear_sparse_kd_loss` with the same ``temperature``.

    The cache is written into a temporary sibling of ``path`` and moved to ``path``
    only once every file is complete and fsynced, so an error or a killed process
    leaves whatever was at ``path`` untouched (a stale ``.<name>.*.tmp`` sibling may
    remain after a kill). With ``overwrite=True`` the old cache is replaced by an
    atomic directory exchange where the filesystem offers one (Linux ``renameat2``;
    elsewhere, e.g. NFS, two renames, between which ``path`` is briefly absent).

    Args:
        teacher: maps (B, S) int64 token ids to (B, S, V) logits (or an output with
            ``.logits``, or a tuple led by them); run under ``no_grad`` in its current
            mode (call ``teacher.eval()`` first for dropout-free logits). V must be the
            same for every batch.
        token_batches: iterable of (B, S) or (S,) integer tensors, or dicts with
            ``"input_ids"``; S may differ between batches. Each row is one sequence.
            At least one position in all.
        path: directory to write: absent, empty, or (with ``overwrite``) a cache.
        k: positions keep their k most likely classes, 1 <= k <= V.
        temperature: T > 0 (finite) of the teacher's softmax.
        chunk_tokens: positions per chunk file (bounds the writer's host memory).
        index_dtype: torch.int32 (default, V < 2**31) or torch.int64.
        logprob_dtype: torch.float16 (default) or torch.float32.
        device: where the batches are moved before the teacher runs (default: the
            teacher's first parameter's device, else CPU).
        overwrite: replace an existing cache in ``path`` (else FileExistsError). A
            non-empty directory that is not a cache is never replaced.

    Returns:
        The index written to ``path/index.json``.
    """
    path, device = _check_write_arguments(teacher, token_batches, path, k, temperature,
                                          chunk_tokens, index_dtype, logprob_dtype, device,
                                          overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        index = _write_cache(teacher, token_batches, tmp, k, temperature, chunk_tokens,
                             index_dtype, logprob_dtype, device)
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _write_cache(teacher, token_batches, path, k, temperature, chunk_tokens, index_dtype,
                 logprob_dtype, device) -> Dict[str, Any]:
    """The files of a cache, written into the (new, empty) directory ``path``."""
    writer = _ChunkWriter(path, chunk_tokens)
    sequences: List[List[int]] = []
    position, vocab_size = 0, None
    for batch_number, batch in enumerate(token_batches):
        tokens = _tokens_of(batch)
        b, s = tokens.shape
        logits = _logits_of(teacher(tokens.to(device)))
        if logits.shape[:2] != (b, s) or logits.dim() != 3:
            raise ValueError(f"teacher must return (B, S, V) = ({b}, {s}, V) logits "
                             f"(got {tuple(logits.shape)})")
        if vocab_size is not None and logits.shape[-1] != vocab_size:
            raise ValueError(f"teacher returned {logits.shape[-1]} classes after "
                             f"{vocab_size} on earlier batches")
        vocab_size = logits.shape[-1]
        if k > vocab_size:
            raise ValueError(f"k must be at most the vocabulary size {vocab_size} (got {k})")
        if index_dtype == torch.int32 and vocab_size >= 2**31:
            raise ValueError(f"index_dtype=torch.int32 cannot hold {vocab_size} classes")
        logprobs, indices, tail = teacher_topk(logits, k, temperature)
        # A NaN would be cached and come back as a NaN loss in every epoch; −inf (a
        # padded vocabulary's probability 0) is valid.
        if bool(logprobs.isnan().any()) or bool(tail.isnan().any()):
            raise ValueError(f"teacher returned NaN logits for batch {batch_number} (0-based)")
        writer.add(tokens=tokens.reshape(-1).long().cpu().numpy(),
                   indices=indices.reshape(-1, k).to(index_dtype).cpu().numpy(),
                   logprobs=logprobs.reshape(-1, k).to(logprob_dtype).cpu().numpy(),
                   tail=tail.reshape(-1).cpu().numpy())
        sequences += [[position + r * s, s] for r in range(b)]
        position += b * s
    if position == 0:
        raise ValueError("token_batches must hold at least one token position (got none)")
    writer.close()

    _save_synced(os.path.join(path, SEQUENCES_FILE), functools.partial(
        np.save, arr=np.asarray(sequences, dtype=np.int64).reshape(-1, 2)))
    index = {
        "format": FORMAT_VERSION, "k": k, "temperature": float(temperature),
        "vocab_size": vocab_size, "index_dtype": INDEX_DTYPES[index_dtype],
        "logprob_dtype": LOGPROB_DTYPES[logprob_dtype], "chunk_tokens": chunk_tokens,
        "num_tokens": position, "num_sequences": len(sequences),
        "sequences": SEQUENCES_FILE, "chunks": writer.chunks,
    }
    _save_synced(os.path.join(path, INDEX_FILE),
                 lambda f: f.write(json.dumps(index, indent=1).encode()))
    _fsync_dir(path)
    return index


# ---- reading: the files must agree with the index --------------------------------------

# Index entries and their types (bool is no int here).
_INDEX_FIELDS = {"k": int, "temperature": (int, float), "vocab_size": int, "index_dtype": str,
                 "logprob_dtype": str, "chunk_tokens": int, "num_tokens": int,
                 "num_sequences": int, "sequences": str, "chunks": list}


def _read_index(index_path: str) -> Dict[str, Any]:
    """``index.json``, checked to hold every entry with a valid type and value."""
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{index_path} not found: not a teacher top-k cache")
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{index_path}: not valid JSON, the index is truncated or corrupt "
                         f"({e})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_path}: holds a {type(index).__name__}, not a cache index")
    if index.get("format") not in READ_VERSIONS or isinstance(index.get("format"), bool):
        raise ValueError(f"{index_path}: unsupported cache format {index.get('format')!r} "
                         f"(this version reads {', '.join(map(str, READ_VERSIONS))})")
    for key, kind in _INDEX_FIELDS.items():
        if key not in index:
            raise ValueError(f"{index_path}: has no {key!r} entry")
        if not isinstance(index[key], kind) or isinstance(index[key], bool):
            raise ValueError(f"{index_path}: {key!r} is {index[key]!r}, not a "
                             f"{getattr(kind, '__name__', 'number')}")
    problems = [
        (index["k"] >= 1, "k must be >= 1"),
        (index["vocab_size"] >= index["k"], "vocab_size must be >= k"),
        (math.isfinite(index["temperature"]) and index["temperature"] > 0,
         "temperature must be positive and finite"),
        (index["index_dtype"] in INDEX_DTYPES.values(), "index_dtype must be int32 or int64"),
        (index["logprob_dtype"] in LOGPROB_DTYPES.values(),
         "logprob_dtype must be float16 or float32"),
        (index["chunk_tokens"] >= 1, "chunk_tokens must be >= 1"),
        (index["num_tokens"] >= 1, "num_tokens must be >= 1"),
        (index["num_sequences"] >= 1, "num_sequences must be >= 1"),
    ]
    for ok, what in problems:
        if not ok:
            raise ValueError(f"{index_path}: {what}")
    return index


class _ArrayFile(NamedTuple):
    """Where a checked ``.npy`` file's array lies, and which file it was (device, inode)."""
    shape: Tuple[int, ...]
    dtype: np.dtype
    offset: int
    identity: Tuple[int, int]


def _npy_header(file: str) -> _ArrayFile:
    """The array of the ``.npy`` file ``file``, checked to be a C-order array whose data
    is all there (a truncated file has fewer bytes than its header promises)."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing (the cache index lists it)")
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"npy format version {version}")
            shape, fortran_order, dtype = read(f)
            offset = f.tell()
            stat = os.fstat(f.fileno())
    except ValueError as e:  # numpy's own: a bad magic string or header
        raise ValueError(f"{file}: not a readable .npy array, truncated or corrupt ({e})") from None
    if fortran_order or dtype.hasobject:
        raise ValueError(f"{file}: holds a Fortran-order or object array, not a cache array")
    expected = offset + math.prod(shape) * dtype.itemsize
    if stat.st_size != expected:
        raise ValueError(f"{file}: truncated or corrupt, {stat.st_size} bytes where its "
                         f"header promises {expected}")
    return _ArrayFile(tuple(shape), dtype, offset, (stat.st_dev, stat.st_ino))


def _check_array(file: str, shape: Tuple[int, ...], dtype: str, index_path: str) -> _ArrayFile:
    array = _npy_header(file)
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise ValueError(f"{file}: holds a {array.shape} {array.dtype} array where "
                         f"{index_path} says {shape} {dtype}")
    return array


def _check_cache(path: str, index: Dict[str, Any], index_path: str
                 ) -> Tuple[np.ndarray, Dict[Tuple[int, str], _ArrayFile]]:
    """Check every file of the cache at ``path`` against ``index``; return the sequences
    and every chunk file's checked array, by (chunk, field)."""
    chunks, n_chunk = index["chunks"], index["chunk_tokens"]
    listed = {INDEX_FILE}
    arrays: Dict[Tuple[int, str], _ArrayFile] = {}

    def name_of(value: Any, what: str) -> str:
        if not (isinstance(value, str) and value and os.path.basename(value) == value
                and value not in (".", "..")):
            raise ValueError(f"{index_path}: {what} is {value!r}, not a file name in the cache")
        if value in listed:
            raise ValueError(f"{index_path}: {what} names {value}, which it lists already")
        listed.add(value)
        return os.path.join(path, value)

    if len(chunks) != -(-index["num_tokens"] // n_chunk):
        raise ValueError(f"{index_path}: lists {len(chunks)} chunks for {index['num_tokens']} "
                         f"positions of {n_chunk} per chunk")
    for c, entry in enumerate(chunks):
        if not (isinstance(entry, dict) and _is_int(entry.get("size"))):
            raise ValueError(f"{index_path}: chunk {c} is {entry!r}, not a chunk entry")
        size = entry["size"]
        # Every chunk holds chunk_tokens positions, the last what remains.
        full = n_chunk if c + 1 < len(chunks) else index["num_tokens"] - n_chunk * c
        if size != full:
            raise ValueError(f"{index_path}: chunk {c} has size {size}, expected {full}")
        fields = [("tokens", (size,), "int64"),
                  ("indices", (size, index["k"]), index["index_dtype"]),
                  ("logprobs", (size, index["k"]), index["logprob_dtype"])]
        if index["format"] >= 2:
            fields.append(("tail", (size,), TAIL_DTYPE))
        for field, shape, dtype in fields:
            arrays[c, field] = _check_array(name_of(entry.get(field), f"chunk {c}'s {field!r}"),
                                            shape, dtype, index_path)
    sequences_file = name_of(index["sequences"], "'sequences'")
    _check_array(sequences_file, (index["num_sequences"], 2), "int64", index_path)
    sequences = np.load(sequences_file, allow_pickle=False)
    # Sequences tile the positions in order: each starts where the previous ended.
    starts, lengths = sequences[:, 0], sequences[:, 1]
    ends = np.cumsum(lengths)
    if (lengths < 0).any() or (starts != ends - lengths).any() or ends[-1] != index["num_tokens"]:
        raise ValueError(f"{sequences_file}: the sequences do not tile the "
                         f"{index['num_tokens']} positions of {index_path} in order")
    extra = sorted(n for n in os.listdir(path) if n.endswith(".npy") and n not in listed)
    if extra:
        raise ValueError(f"{os.path.join(path, extra[0])}: not listed in {index_path} "
                         f"({len(extra)} such file(s); a chunk of another write?)")
    return sequences, arrays


class TeacherTopKDataset(Dataset):
    """One item per cached sequence: ``{"tokens": (S,) int64, "teacher_indices": (S, k)
    int32/int64, "teacher_logprobs": (S, k) fp16/fp32, "teacher_tail_logprob": (S,)
    fp32}``, row s of the teacher tensors belonging to token s (the teacher's prediction
    for the token after it, as the student's logits at s are). Chunks are memory-mapped
    and read on access.

    A format-1 cache (written before the tail files existed) opens with a warning; its
    ``teacher_tail_logprob`` is derived as log(1 - Σ exp(ℓ)) from the stored
    log-probabilities (:func:`tail_from_logprobs`): good to their rounding (fp16: about
    5e-4 of the kept mass), not to a small tail's own digits. Rewrite the cache for
    those.

    ``index`` holds the cache's metadata (k, temperature, vocab_size, dtypes, ...).

    Opening checks the whole directory against ``index.json`` (from the files' headers
    and sizes; the values are not read): every listed chunk exists with the shape,
    dtype and row count the index gives, no ``.npy`` file is unlisted, no file is
    truncated, and the sequences tile the positions. A disagreement raises
    ``ValueError`` (``FileNotFoundError`` for a missing file) naming the file and what
    is wrong. Index values out of [0, vocab_size) are caught by
    :func:`distillkit.sparse_kd_loss`, which checks its indices. A chunk is mapped from
    the very file checked at open: after an overwrite of the cache, chunks already mapped
    read the old data and the others raise ``ValueError`` (open the cache again), so a
    dataset never mixes two caches.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX_FILE)
        self.index = _read_index(index_path)
        self.sequences, self._arrays = _check_cache(self.path, self.index, index_path)
        self.stored_tail = self.index["format"] >= 2
        if not self.stored_tail:
            warnings.warn(f"{index_path}: a format-1 top-k cache (no tail files); its "
                          "teacher_tail_logprob is derived from the stored log-probabilities, "
                          "accurate only to their rounding: rewrite it with "
                          "write_teacher_topk for the exact tail", stacklevel=2)
        self.chunk_tokens = self.index["chunk_tokens"]
        self._chunks: Dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.sequences)

    def _chunk(self, c: int, field: str) -> np.ndarray:
        """Chunk c's ``field``, memory-mapped on first use from the very file checked at
        open: a cache replaced since (an overwrite) is an error, never a mix of two."""
        key = (c, field)
        if key not in self._chunks:
            file = os.path.join(self.path, self.index["chunks"][c][field])
            array = self._arrays[key]
            replaced = ValueError(f"{file}: not the file checked when this dataset was "
                                  f"opened: the cache at {self.path} was replaced since "
                                  "(open it again)")
            try:
                f = open(file, "rb")
            except FileNotFoundError:
                raise replaced from None
            with f:
                stat = os.fstat(f.fileno())
                if (stat.st_dev, stat.st_ino) != array.identity:
                    raise replaced
                self._chunks[key] = np.memmap(f, dtype=array.dtype, mode="r",
                                              offset=array.offset, shape=array.shape)
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
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range: {self.path} holds {len(self)}")
        start, length = (int(v) for v in self.sequences[i])
        item = {"tokens": self._positions("tokens", start, start + length),
                "teacher_indices": self._positions("indices", start, start + length),
                "teacher_logprobs": self._positions("logprobs", start, start + length)}
        item["teacher_tail_logprob"] = (self._positions("tail", start, start + length)
                                        if self.stored_tail
                                        else tail_from_logprobs(item["teacher_logprobs"]))
        return item


def collate_topk(items: List[Dict[str, Tensor]], pad_token: int = 0) -> Dict[str, Tensor]:
    """Stacks items into (B, S_max) batches, padding shorter sequences at the end: tokens
    with ``pad_token``, teacher indices with -1 (so :func:`distillkit.sparse_kd_loss`
    skips those positions as dead rows), log-probabilities and tails with 0; ``mask``
    (B, S_max) is True at real positions. Items must agree on K and on the dtypes (one
    cache's do); ``teacher_tail_logprob`` is batched when the items have it."""
    if not items:
        raise ValueError("collate_topk needs at least one item")
    first = items[0]
    for it in items[1:]:
        for key in ("teacher_indices", "teacher_logprobs"):
            if it[key].shape[-1:] != first[key].shape[-1:] or it[key].dtype != first[key].dtype:
                raise ValueError(f"items disagree on {key}: {tuple(first[key].shape)} "
                                 f"{first[key].dtype} and {tuple(it[key].shape)} {it[key].dtype}")
    s_max = max(len(it["tokens"]) for it in items)
    k = items[0]["teacher_indices"].shape[-1]
    b = len(items)
    out = {"tokens": torch.full((b, s_max), pad_token, dtype=torch.int64),
           "teacher_indices": torch.full((b, s_max, k), -1,
                                         dtype=items[0]["teacher_indices"].dtype),
           "teacher_logprobs": torch.zeros((b, s_max, k),
                                           dtype=items[0]["teacher_logprobs"].dtype),
           "mask": torch.zeros((b, s_max), dtype=torch.bool)}
    with_tail = all("teacher_tail_logprob" in it for it in items)
    if with_tail:
        out["teacher_tail_logprob"] = torch.zeros((b, s_max), dtype=torch.float32)
    for r, it in enumerate(items):
        s = len(it["tokens"])
        out["tokens"][r, :s] = it["tokens"]
        out["teacher_indices"][r, :s] = it["teacher_indices"]
        out["teacher_logprobs"][r, :s] = it["teacher_logprobs"]
        if with_tail:
            out["teacher_tail_logprob"][r, :s] = it["teacher_tail_logprob"]
        out["mask"][r, :s] = True
    return out


def topk_loader(path: Union[str, os.PathLike], batch_size: int, *, shuffle: bool = False,
                pad_token: int = 0, **loader_kwargs: Any) -> DataLoader:
    """A DataLoader over :class:`TeacherTopKDataset` batched by :func:`collate_topk`."""
    return DataLoader(TeacherTopKDataset(path), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=functools.partial(collate_topk, pad_token=pad_token), **loader_kwargs)
