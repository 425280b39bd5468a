"""The options objects (one per loss family) and the stats layouts shared with C++."""
import dataclasses

import pytest
import torch

import distillkit
from distillkit import KDLoss, KDOptions, SparseKDOptions, fused_linear_kd_loss, kd_loss
from distillkit.ops import KD_STATS, SPARSE_KD_STATS, kd_loss_forward, sparse_kd_loss_forward
from distillkit.reference import kd_loss_ref, sparse_kd_loss_ref
from distillkit.trainers import KDConfig


@pytest.mark.parametrize("fields, match", [
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(temperature=-2), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="2"), "temperature must be a real number"),
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(beta=1.5), "beta must be in"),
    (dict(beta=float("nan")), "beta"),
    (dict(hard_weight=-0.1), "hard_weight must be in"),
    (dict(ignore_index=1.5), "ignore_index must be an int"),
    (dict(ignore_index=True), "ignore_index"),
    (dict(reduction="batchmean"), "reduction must be one of"),
    (dict(scale_by_t2=1), "scale_by_t2 must be a bool"),
])
def test_kd_options_reject_bad_fields_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        KDOptions(**fields)
    # Every entry point validates through the same object, with the same message.
    z = torch.randn(3, 5)
    for call in (lambda: kd_loss(z, z, **fields), lambda: KDLoss(**fields),
                 lambda: kd_loss_ref(z, z, **fields), lambda: KDConfig(**fields),
                 lambda: fused_linear_kd_loss(z, torch.randn(4, 5), torch.randn(3, 4), **fields)):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("fields, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(renormalize="yes"), "renormalize must be a bool"),
    (dict(reduction="avg"), "reduction"),
    (dict(check_duplicates=None), "check_duplicates"),
])
def test_sparse_kd_options_reject_bad_fields_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        SparseKDOptions(**fields)


def test_options_normalize_types_and_are_immutable():
    o = KDOptions(temperature=2, beta=1, hard_weight=0)
    assert type(o.temperature) is float and type(o.beta) is float
    assert o == KDOptions(temperature=2.0, beta=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.temperature = 3.0
    changed = o.replace(divergence="jsd")
    assert changed.divergence == "jsd" and o.divergence == "forward_kl"
    with pytest.raises(ValueError, match="beta"):
        o.replace(beta=2.0)


def test_resolve_combines_an_object_and_fields():
    base = KDOptions(temperature=3.0, divergence="reverse_kl")
    assert KDOptions.resolve(base) is base
    assert KDOptions.resolve(base, temperature=1.5) == KDOptions(temperature=1.5,
                                                                 divergence="reverse_kl")
    assert KDOptions.resolve(None, beta=0.25) == KDOptions(beta=0.25)
    with pytest.raises(ValueError, match="options must be a KDOptions"):
        KDOptions.resolve(SparseKDOptions())
    with pytest.raises(TypeError, match="tempreature"):
        KDOptions.resolve(None, tempreature=2.0)


def test_every_kd_entry_point_takes_the_options_object():
    torch.manual_seed(0)
    h, w, wt = torch.randn(6, 8), torch.randn(11, 8), torch.randn(11, 8)
    labels = torch.tensor([0, 3, -100, 10, 2, 5])
    opts = KDOptions(temperature=2.5, divergence="jsd", beta=0.3, hard_weight=0.2,
                     scale_by_t2=False)
    fields = dataclasses.asdict(opts)
    z, u = h @ w.t(), h @ wt.t()
    expected = kd_loss_ref(z.double(), u.double(), labels=labels, **fields).float()
    got = {
        "kd_loss": kd_loss(z, u, labels=labels, options=opts),
        "kd_loss fields": kd_loss(z, u, labels=labels, **fields),
        "KDLoss": KDLoss(opts)(z, u, labels),
        "reference": kd_loss_ref(z, u, labels=labels, options=opts),
        "fused_linear": fused_linear_kd_loss(h, w, teacher_hidden=h, teacher_weight=wt,
                                             labels=labels, options=opts, chunk_rows=4),
    }
    # fp32 rounding over C = 11 classes and 6 rows, losses of order 1.
    for name, value in got.items():
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    # A field overrides the object's value.
    torch.testing.assert_close(kd_loss(z, u, labels=labels, options=opts, divergence="forward_kl"),
                               kd_loss(z, u, labels=labels, **dict(fields, divergence="forward_kl")))


def test_kd_config_is_the_kd_options():
    assert KDConfig is KDOptions and distillkit.KDOptions is KDOptions


def test_fused_linear_rejects_per_row_reduction_by_name():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fused_linear_kd_loss(h, w, torch.randn(3, 5), reduction="none")


def test_kd_stats_layout_names_the_kernel_columns():
    """The layout the extension exports is the one the kernel writes: each named column
    holds what its name says (checked against plain torch in fp64)."""
    torch.manual_seed(1)
    z, u = torch.randn(7, 13, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    t = 1.7
    y = torch.arange(7)
    # lse(z) at T = 1 is only formed for the hard term (else the column repeats lse(z/T)).
    _, st = kd_loss_forward(z, u, y, KDOptions(temperature=t, divergence="jsd", beta=0.4,
                                               hard_weight=0.3))
    assert st.shape == (7, KD_STATS.cols)
    log_q, log_p = torch.log_softmax(z / t, -1), torch.log_softmax(u / t, -1)
    log_m = torch.log(0.4 * log_p.exp() + 0.6 * log_q.exp())
    expected = {
        "lse_student": torch.logsumexp(z / t, -1),
        "lse_teacher": torch.logsumexp(u / t, -1),
        "lse_student_t1": torch.logsumexp(z, -1),
        "d_student": (log_q.exp() * (log_q - log_m)).sum(-1),
        "d_teacher": (log_p.exp() * (log_p - log_m)).sum(-1),
        # No row takes the cancellation-free pass here: the difference of the lse's.
        "log_ratio_offset": torch.logsumexp(u / t, -1) - torch.logsumexp(z / t, -1),
    }
    assert set(KD_STATS.names) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(st[:, getattr(KD_STATS, name)], value, msg=name)


def test_sparse_kd_stats_layout_names_the_kernel_columns():
    torch.manual_seed(3)
    z = torch.randn(4, 9, dtype=torch.float64)
    idx = torch.tensor([[0, 2, -1], [5, 1, 3], [8, -1, -1], [4, 6, 7]])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3], [0.9, 0.0, 0.0],
                                 [0.1, 0.2, 0.3]], dtype=torch.float64))
    t = 2.0
    _, st = sparse_kd_loss_forward(z, idx, lp, None, SparseKDOptions(temperature=t))
    assert st.shape == (4, SPARSE_KD_STATS.cols)
    kept = torch.where(idx >= 0, lp, torch.full_like(lp, float("-inf")))
    torch.testing.assert_close(st[:, SPARSE_KD_STATS.lse_student], torch.logsumexp(z / t, -1))
    torch.testing.assert_close(st[:, SPARSE_KD_STATS.teacher_log_normalizer],
                               torch.logsumexp(kept, -1))


def test_sparse_entry_points_take_the_options_object():
    torch.manual_seed(2)
    z = torch.randn(5, 12)
    idx = torch.randint(0, 12, (5, 12)).argsort(-1)[:, :4]
    lp = torch.log_softmax(torch.randn(5, 4), -1)
    opts = SparseKDOptions(temperature=2.0, renormalize=False, reduction="sum")
    torch.testing.assert_close(distillkit.sparse_kd_loss(z, idx, lp, options=opts),
                               sparse_kd_loss_ref(z, idx, lp, options=opts), rtol=1e-5, atol=1e-6)
