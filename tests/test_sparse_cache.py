"""distillkit.sparse_cache: the top-K teacher cache round trip, chunk boundaries, the
loader's padding, and training on it with sparse_kd_loss."""
import json

import pytest
import torch
from torch import nn

from distillkit import sparse_kd_loss
from distillkit.sparse_cache import (TeacherTopKDataset, collate_topk, topk_loader,
                                     write_teacher_topk)
from conftest import rounding_bound

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
