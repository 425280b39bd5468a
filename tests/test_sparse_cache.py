"""distillkit.sparse_cache: the top-K teacher cache round trip, chunk boundaries, the
loader's padding, training on it with sparse_kd_loss; caches that disagree with their
index rejected by name; writes that fail or are killed (SIGKILL) leave the old cache."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from distillkit import sparse_kd_loss
from distillkit.data import sparse_cache as sparse_cache_module
from distillkit.sparse_cache import (TeacherTopKDataset, collate_topk, topk_loader,
                                     write_teacher_topk)
from conftest import rounding_bound
from sigkill import kill_while_growing

V, K, T = 50, 6, 2.0


@pytest.fixture
def teacher():
    return nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).eval()


def batches():
    """Sequences of lengths 5, 5, 5, 7, 7, 4: with chunk_tokens=6 most straddle chunks."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, shape, generator=g) for shape in ((3, 5), (2, 7), (4,))]


def expected(teacher, tokens):
    with torch.no_grad():
        return torch.log_softmax(teacher(tokens[None])[0] / T, -1).topk(K, dim=-1)


@pytest.mark.parametrize("index_dtype,logprob_dtype", [(torch.int32, torch.float16),
                                                       (torch.int64, torch.float32)], ids=str)
@pytest.mark.parametrize("chunk_tokens", [1, 6, 1000])
def test_round_trip(tmp_path, teacher, index_dtype, logprob_dtype, chunk_tokens):
    index = write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens,
                               index_dtype=index_dtype, logprob_dtype=logprob_dtype)
    total = 3 * 5 + 2 * 7 + 4
    assert index["num_tokens"] == total and index["num_sequences"] == 6
    assert len(index["chunks"]) == -(-total // chunk_tokens)
    assert sum(c["size"] for c in index["chunks"]) == total
    assert json.loads((tmp_path / "index.json").read_text()) == index

    ds = TeacherTopKDataset(tmp_path)
    sequences = [row for b in batches() for row in (b if b.dim() == 2 else b[None])]
    assert len(ds) == len(sequences)
    for item, tokens in zip(ds, sequences):
        assert torch.equal(item["tokens"], tokens)
        logprobs, indices = expected(teacher, tokens)
        assert item["teacher_indices"].dtype == index_dtype
        assert item["teacher_logprobs"].dtype == logprob_dtype
        assert torch.equal(item["teacher_indices"].long(), indices)
        # fp16 storage rounds to ~1e-3; in fp32 the cache's batched teacher and this
        # one-sequence call may take different GEMM kernels: a few sqrt(V) eps of rounding.
        fp32_tol = rounding_bound(torch.float32, V, c=16)
        tol = 1e-3 if logprob_dtype == torch.float16 else fp32_tol
        torch.testing.assert_close(item["teacher_logprobs"].float(), logprobs, rtol=tol, atol=tol)


@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.float32], ids=str)
def test_tail_round_trip(tmp_path, teacher, logprob_dtype):
    """The cached tail is the log of the teacher's mass outside its top K, to fp32
    rounding (stored in fp32 whatever the log-probabilities' dtype)."""
    write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens=6,
                       logprob_dtype=logprob_dtype)
    ds = TeacherTopKDataset(tmp_path)
    sequences = [row for b in batches() for row in (b if b.dim() == 2 else b[None])]
    for item, tokens in zip(ds, sequences):
        with torch.no_grad():
            p = torch.softmax(teacher(tokens[None])[0].double() / T, -1)
        kept = p.gather(1, item["teacher_indices"].long()).sum(-1)
        tail = item["teacher_tail_logprob"]
        assert tail.dtype == torch.float32 and tail.shape == tokens.shape
        torch.testing.assert_close(tail.double().exp(), 1 - kept,
                                   rtol=rounding_bound(torch.float32, V, c=16), atol=1e-7)


def test_format_1_cache_loads_with_a_derived_tail(tmp_path, teacher):
    """A cache written before the tail files (format 1) opens with a warning; its tail is
    log(1 - sum exp(l)) of the stored log-probabilities."""
    write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens=8,
                       logprob_dtype=torch.float32)
    exact = [item["teacher_tail_logprob"] for item in TeacherTopKDataset(tmp_path)]
    index = json.loads((tmp_path / "index.json").read_text())
    for chunk in index["chunks"]:
        (tmp_path / chunk.pop("tail")).unlink()
    index["format"] = 1
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="format-1 top-k cache"):
        ds = TeacherTopKDataset(tmp_path)
    for item, tail in zip(ds, exact):
        # fp32 log-probabilities: the derived tail is good to a few fp32 eps of the mass.
        torch.testing.assert_close(item["teacher_tail_logprob"].exp(), tail.exp(),
                                   rtol=0, atol=rounding_bound(torch.float32, K, c=8))
    batch = next(iter(topk_loader(tmp_path, batch_size=6)))
    assert batch["teacher_tail_logprob"].shape == batch["tokens"].shape


def test_training_with_the_tail_bucket(tmp_path, teacher):
    """The loader's batches feed sparse_kd_loss with the tail; padded positions are dead."""
    write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens=6)
    batch = next(iter(topk_loader(tmp_path, batch_size=6)))
    student = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V))
    z = student(batch["tokens"])
    real = batch["mask"]
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        kw = dict(temperature=T, divergence=divergence)
        loss = sparse_kd_loss(z, batch["teacher_indices"], batch["teacher_logprobs"],
                              teacher_tail_logprob=batch["teacher_tail_logprob"], **kw)
        dense = sparse_kd_loss(z[real], batch["teacher_indices"][real],
                               batch["teacher_logprobs"][real],
                               teacher_tail_logprob=batch["teacher_tail_logprob"][real], **kw)
        torch.testing.assert_close(loss, dense)
        assert torch.isfinite(loss)


def test_loader_pads_as_dead_rows(tmp_path, teacher):
    write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens=6)
    batch = next(iter(topk_loader(tmp_path, batch_size=6, pad_token=7)))
    assert batch["tokens"].shape == (6, 7) and batch["teacher_indices"].shape == (6, 7, K)
    assert (batch["tokens"][0, 5:] == 7).all() and (batch["teacher_indices"][0, 5:] == -1).all()
    assert batch["mask"].sum() == 3 * 5 + 2 * 7 + 4

    # Train a student on the cache: padded positions are dead rows of sparse_kd_loss.
    student = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V))
    z = student(batch["tokens"])
    loss = sparse_kd_loss(z, batch["teacher_indices"], batch["teacher_logprobs"], temperature=T)
    real = batch["mask"]
    dense = sparse_kd_loss(z[real], batch["teacher_indices"][real],
                           batch["teacher_logprobs"][real], temperature=T)
    torch.testing.assert_close(loss, dense)
    loss.backward()
    assert student[1].weight.grad is not None


def test_collate_keeps_dtypes():
    items = [{"tokens": torch.arange(3), "teacher_indices": torch.zeros(3, 2, dtype=torch.int32),
              "teacher_logprobs": torch.zeros(3, 2, dtype=torch.float16)}]
    out = collate_topk(items)
    assert out["teacher_indices"].dtype == torch.int32
    assert out["teacher_logprobs"].dtype == torch.float16


def test_refuses_to_overwrite_and_bad_args(tmp_path, teacher):
    write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens=8)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_teacher_topk(teacher, batches(), tmp_path, K, T, chunk_tokens=8)
    index = write_teacher_topk(teacher, batches(), tmp_path, 2, T, chunk_tokens=8, overwrite=True)
    assert TeacherTopKDataset(tmp_path)[0]["teacher_indices"].shape == (5, 2) == (5, index["k"])
    with pytest.raises(ValueError, match="k must be at most the vocabulary size"):
        write_teacher_topk(teacher, batches(), tmp_path / "b", V + 1, T)
    with pytest.raises(ValueError, match="logprob_dtype"):
        write_teacher_topk(teacher, batches(), tmp_path / "c", K, T, logprob_dtype=torch.bfloat16)
    with pytest.raises(FileNotFoundError, match="index.json"):
        TeacherTopKDataset(tmp_path / "missing")


# ---- a cache whose files disagree with its index is rejected, naming the file ----------

def _rewrite(file, array):
    np.save(file, array)


def _truncate(file, n=10):
    data = file.read_bytes()
    file.write_bytes(data[:-n])


def _edit_index(path, **changes):
    index = json.loads((path / "index.json").read_text())
    index.update(changes)
    (path / "index.json").write_text(json.dumps(index))


CORRUPTIONS = {
    # name: (how to damage the cache at p, the error type, what the message must say)
    "truncated_chunk": (lambda p: _truncate(p / "chunk_00001_indices.npy"), ValueError,
                        r"chunk_00001_indices\.npy: truncated"),
    "truncated_header": (lambda p: _truncate(p / "chunk_00000_tokens.npy", 200), ValueError,
                         r"chunk_00000_tokens\.npy: not a readable \.npy"),
    "garbage_chunk": (lambda p: (p / "chunk_00002_logprobs.npy").write_bytes(b"hello"),
                      ValueError, r"chunk_00002_logprobs\.npy: not a readable \.npy"),
    "wrong_dtype": (lambda p: _rewrite(p / "chunk_00000_logprobs.npy",
                                       np.zeros((8, K), np.float64)), ValueError,
                    r"chunk_00000_logprobs\.npy: holds a \(8, 6\) float64 array where "
                    r".*index\.json says \(8, 6\) float16"),
    "wrong_k": (lambda p: _rewrite(p / "chunk_00001_indices.npy", np.zeros((8, K - 1), np.int32)),
                ValueError, r"chunk_00001_indices\.npy: holds a \(8, 5\)"),
    "wrong_rows": (lambda p: _rewrite(p / "chunk_00000_tokens.npy", np.zeros(7, np.int64)),
                   ValueError, r"chunk_00000_tokens\.npy: holds a \(7,\) int64 array"),
    "fortran_order": (lambda p: _rewrite(p / "chunk_00000_indices.npy",
                                         np.asfortranarray(np.zeros((8, K), np.int32))),
                      ValueError, r"chunk_00000_indices\.npy: holds a Fortran-order"),
    "missing_chunk": (lambda p: (p / "chunk_00003_tokens.npy").unlink(), FileNotFoundError,
                      r"chunk_00003_tokens\.npy: missing"),
    "extra_chunk": (lambda p: shutil.copy(p / "chunk_00000_tokens.npy",
                                          p / "chunk_00009_tokens.npy"), ValueError,
                    r"chunk_00009_tokens\.npy: not listed in .*index\.json"),
    "truncated_index": (lambda p: _truncate(p / "index.json", 40), ValueError,
                        r"index\.json: not valid JSON"),
    "binary_index": (lambda p: (p / "index.json").write_bytes(b"\xff\xfe\x00"), ValueError,
                     r"index\.json: not valid JSON"),
    "index_not_a_dict": (lambda p: (p / "index.json").write_text("[1, 2]"), ValueError,
                         r"index\.json: holds a list"),
    "index_without_k": (lambda p: (_edit_index(p, k=None), _strip_key(p, "k")), ValueError,
                        r"index\.json: has no 'k' entry"),
    "index_wrong_type": (lambda p: _edit_index(p, chunk_tokens="8"), ValueError,
                         r"index\.json: 'chunk_tokens' is '8', not a int"),
    "index_bool": (lambda p: _edit_index(p, k=True), ValueError, r"index\.json: 'k' is True"),
    "index_other_k": (lambda p: _edit_index(p, k=K + 1), ValueError,
                      r"chunk_00000_indices\.npy: holds a \(8, 6\) int32 array where"),
    "index_more_tokens": (lambda p: _edit_index(p, num_tokens=34), ValueError,
                          r"index\.json: chunk 4 has size 1, expected 2"),
    "index_other_version": (lambda p: _edit_index(p, format=3), ValueError,
                            r"index\.json: unsupported cache format 3 \(this version reads 1, 2\)"),
    "tail_wrong_dtype": (lambda p: _rewrite(p / "chunk_00001_tail.npy", np.zeros(8, np.float16)),
                         ValueError, r"chunk_00001_tail\.npy: holds a \(8,\) float16 array "
                                     r"where .*index\.json says \(8,\) float32"),
    "tail_wrong_rows": (lambda p: _rewrite(p / "chunk_00000_tail.npy", np.zeros(7, np.float32)),
                        ValueError, r"chunk_00000_tail\.npy: holds a \(7,\) float32"),
    "tail_missing": (lambda p: (p / "chunk_00002_tail.npy").unlink(), FileNotFoundError,
                     r"chunk_00002_tail\.npy: missing"),
    "tail_truncated": (lambda p: _truncate(p / "chunk_00003_tail.npy", 4), ValueError,
                       r"chunk_00003_tail\.npy: truncated"),
    "index_path_escape": (lambda p: _edit_chunk(p, 0, tokens="../chunk_00000_tokens.npy"),
                          ValueError, r"index\.json: chunk 0's 'tokens' is '\.\./"),
    "index_same_file_twice": (lambda p: _edit_chunk(p, 1, tokens="chunk_00000_tokens.npy"),
                              ValueError, r"chunk 1's 'tokens' names chunk_00000_tokens\.npy, "
                                          r"which it lists already"),
    "index_bad_size": (lambda p: _edit_chunk(p, 2, size=7), ValueError,
                       r"index\.json: chunk 2 has size 7, expected 8"),
    "sequences_overlap": (lambda p: _rewrite(p / "sequences.npy",
                                             np.array([[0, 5]] * 6, np.int64)), ValueError,
                          r"sequences\.npy: the sequences do not tile"),
    "sequences_missing": (lambda p: (p / "sequences.npy").unlink(), FileNotFoundError,
                          r"sequences\.npy: missing"),
}


def _strip_key(path, key):
    index = json.loads((path / "index.json").read_text())
    del index[key]
    (path / "index.json").write_text(json.dumps(index))


def _edit_chunk(path, c, **changes):
    index = json.loads((path / "index.json").read_text())
    index["chunks"][c].update(changes)
    (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=str)
def test_cache_disagreeing_with_its_index_is_rejected(tmp_path, teacher, damage):
    path = tmp_path / "cache"
    write_teacher_topk(teacher, batches(), path, K, T, chunk_tokens=8)  # 33 positions: 5 chunks
    TeacherTopKDataset(path)
    corrupt, error, match = CORRUPTIONS[damage]
    corrupt(path)
    with pytest.raises(error, match=match) as info:
        TeacherTopKDataset(path)
    assert str(path) in str(info.value)  # the message names the file, with its directory


# ---- write_teacher_topk checks everything first and replaces a cache only when complete --

def snapshot(path):
    """Every file of a directory, name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


class FailingBatches:
    """Two good batches, then an error: the teacher has run when the write fails."""

    def __iter__(self):
        yield from batches()[:2]
        raise RuntimeError("the data pipeline broke")


BAD_WRITES = [
    (dict(k=0), ValueError, "k must be a positive int"),
    (dict(k=2.0), ValueError, "k must be a positive int"),
    (dict(k=True), ValueError, "k must be a positive int"),
    (dict(k=V + 1), ValueError, "k must be at most the vocabulary size"),  # after the teacher ran
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(chunk_tokens=0), ValueError, "chunk_tokens"),
    (dict(index_dtype=torch.int16), ValueError, "index_dtype"),
    (dict(index_dtype=[torch.int32]), ValueError, "index_dtype"),
    (dict(logprob_dtype=torch.bfloat16), ValueError, "logprob_dtype"),
    (dict(device="gpu7"), ValueError, "device must name a torch device"),
    (dict(token_batches=5), TypeError, "token_batches must be an iterable"),
    (dict(token_batches=[[1, 2, 3]]), ValueError, "token_batches must yield"),
    (dict(token_batches=[torch.zeros(2, 3)]), ValueError, "token_batches must yield"),
    (dict(token_batches=[]), ValueError, "at least one token position"),
    (dict(token_batches=[torch.zeros(2, 0, dtype=torch.int64)]), ValueError,
     "at least one token position"),
    (dict(token_batches=FailingBatches()), RuntimeError, "the data pipeline broke"),
    (dict(teacher=lambda t: torch.zeros(t.shape[0], V)), ValueError, r"\(B, S, V\)"),
    (dict(teacher=lambda t: torch.full((*t.shape, V), float("nan"))), ValueError,
     "teacher returned NaN logits for batch 0"),
    (dict(teacher="teacher"), TypeError, "teacher must be a module"),
    (dict(overwrite="yes"), TypeError, "overwrite must be a bool"),
]


@pytest.mark.parametrize("changes,error,match", BAD_WRITES,
                         ids=[str(i) for i in range(len(BAD_WRITES))])
def test_failed_overwrite_leaves_the_old_cache(tmp_path, teacher, changes, error, match):
    path = tmp_path / "cache"
    write_teacher_topk(teacher, batches(), path, K, T, chunk_tokens=8)
    before = snapshot(path)
    args = dict(teacher=teacher, token_batches=batches(), path=path, k=K, temperature=T,
                chunk_tokens=8, overwrite=True)
    args.update(changes)
    with pytest.raises(error, match=match):
        write_teacher_topk(**args)
    assert snapshot(path) == before
    assert len(TeacherTopKDataset(path)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary left


def test_teacher_changing_vocabulary_is_rejected(tmp_path):
    vocab = iter([V, V + 1])
    with pytest.raises(ValueError, match=f"returned {V + 1} classes after {V}"):
        write_teacher_topk(lambda t: torch.zeros(*t.shape, next(vocab)), batches(),
                           tmp_path / "c", K)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_whole_cache(tmp_path, teacher, monkeypatch):
    path = tmp_path / "cache"
    write_teacher_topk(teacher, batches(), path, K, T, chunk_tokens=4)  # 9 chunks
    write_teacher_topk(teacher, batches(), path, 2, T, chunk_tokens=16, overwrite=True)
    ds = TeacherTopKDataset(path)  # the old cache's extra chunk files are gone with it
    assert ds.index["k"] == 2 and len(ds.index["chunks"]) == 3
    # Where the filesystem has no atomic exchange the cache is replaced by two renames.
    monkeypatch.setattr(sparse_cache_module, "_exchange", lambda a, b: False)
    write_teacher_topk(teacher, batches(), path, 3, T, chunk_tokens=5, overwrite=True)
    assert TeacherTopKDataset(path).index["k"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_refuses_to_replace_what_is_not_a_cache(tmp_path, teacher):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a teacher top-k cache"):
            write_teacher_topk(teacher, batches(), tmp_path, K, overwrite=overwrite)
        with pytest.raises(FileExistsError, match="is not a directory"):
            write_teacher_topk(teacher, batches(), tmp_path / "notes.txt", K, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# A writer that overwrites one cache again and again, version i holding only token i % V:
# ~26 MB a version, so a write takes long enough to be caught in progress.
POSITIONS, WRITER_K = 1 << 17, 16
WRITER = f"""
import sys, torch
from torch import nn
from distillkit.sparse_cache import write_teacher_topk
torch.manual_seed(0)
teacher = nn.Embedding({V}, {V})
i = 1
while True:
    tokens = torch.full((64, {POSITIONS} // 64), i % {V})
    write_teacher_topk(teacher, [tokens], sys.argv[1], {WRITER_K}, chunk_tokens=1 << 14,
                       index_dtype=torch.int64, logprob_dtype=torch.float32, overwrite=True)
    i += 1
"""


def test_sigkill_during_overwrite_leaves_a_loadable_cache(tmp_path):
    path = tmp_path / "cache"
    torch.manual_seed(0)
    teacher = nn.Embedding(V, V)
    write_teacher_topk(teacher, [torch.zeros(64, POSITIONS // 64, dtype=torch.int64)], path,
                       WRITER_K, chunk_tokens=1 << 14, index_dtype=torch.int64,
                       logprob_dtype=torch.float32)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    # Only a write in progress grows a temporary sibling of the cache.
    kill_while_growing(child, lambda: [tmp_path / n for n in os.listdir(tmp_path)
                                       if n.endswith(".tmp")])

    ds = TeacherTopKDataset(path)  # checks every file against the index
    assert ds.index["num_tokens"] == POSITIONS and len(ds) == 64
    token = int(ds[0]["tokens"][0])
    expected = torch.log_softmax(teacher.weight[token].detach(), -1).topk(WRITER_K)
    for item in (ds[0], ds[63]):  # one version throughout: the first and last chunks agree
        assert (item["tokens"] == token).all()
        assert (item["teacher_indices"] == expected.indices).all()
    # The next write clears what the killed one left behind, apart from its temporary.
    write_teacher_topk(teacher, [torch.ones(1, 3, dtype=torch.int64)], path, 2, overwrite=True)
    assert TeacherTopKDataset(path).index["num_tokens"] == 3


def test_out_of_range_items_and_mixed_batches_are_named(tmp_path, teacher):
    write_teacher_topk(teacher, batches(), tmp_path / "a", K, T)
    ds = TeacherTopKDataset(tmp_path / "a")
    assert torch.equal(ds[-1]["tokens"], ds[5]["tokens"])
    for i in (6, -7):
        with pytest.raises(IndexError, match=f"sequence {i} out of range: .* holds 6"):
            ds[i]
    with pytest.raises(ValueError, match="at least one item"):
        collate_topk([])
    write_teacher_topk(teacher, batches(), tmp_path / "b", 2, T, logprob_dtype=torch.float32)
    other = TeacherTopKDataset(tmp_path / "b")
    with pytest.raises(ValueError, match="items disagree on teacher_indices"):
        collate_topk([ds[0], other[0]])


def test_padded_vocabulary_is_cached_nan_is_not(tmp_path):
    # -inf logits (a padded vocabulary) are probability 0: cached as -inf log-probabilities.
    def padded(tokens):
        logits = torch.zeros(*tokens.shape, V)
        logits[..., V - 2:] = float("-inf")
        return logits
    write_teacher_topk(padded, batches(), tmp_path / "c", V, logprob_dtype=torch.float32)
    logprobs = TeacherTopKDataset(tmp_path / "c")[0]["teacher_logprobs"]
    assert torch.isinf(logprobs[:, -2:]).all() and torch.isfinite(logprobs[:, :-2]).all()


def test_overwrite_through_a_symlink_replaces_the_target(tmp_path, teacher):
    (tmp_path / "disk").mkdir()
    write_teacher_topk(teacher, batches(), tmp_path / "disk" / "cache", K, T)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "cache")
    write_teacher_topk(teacher, batches(), tmp_path / "link", 2, T, overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert TeacherTopKDataset(tmp_path / "link").index["k"] == 2
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["cache"]


def test_a_dataset_open_across_an_overwrite_never_mixes_two_caches(tmp_path, teacher):
    path = tmp_path / "cache"
    write_teacher_topk(teacher, batches(), path, K, T, chunk_tokens=8)
    ds = TeacherTopKDataset(path)
    first = ds[0]  # maps chunk 0
    # The same shapes from another teacher: only the files' identity tells them apart.
    other = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).eval()
    write_teacher_topk(other, batches(), path, K, T, chunk_tokens=8, overwrite=True)
    again = ds[0]  # an open map keeps reading the old, unlinked file
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ValueError, match=r"chunk_00003_tokens\.npy: not the file checked when "
                                         r"this dataset was opened: .* was replaced since"):
        ds[5]  # its chunk was never mapped: it would come from the new cache
    assert not torch.equal(TeacherTopKDataset(path)[0]["teacher_logprobs"],
                           first["teacher_logprobs"])
