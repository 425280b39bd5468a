"""Edges of the public API: empty batches (N = 0 rows) give a defined result, empty
reductions (C = 0 classes, K = 0 kept entries, H = 0 features) raise the op's own
ValueError, and labels / weight / normalizer of the wrong type, shape, dtype or device
raise errors naming the argument instead of crashing or answering silently wrong.

Every op's N = 0 result is 0 for "sum" and for "mean" (kd_loss documents it: the mean's
denominator is clamped to 1 row), an empty tensor for "none", with a zero gradient of the
input's shape. The kernels handle N = 0 themselves: no Python early path. The TRL
drop-ins give 0 for "batchmean" and "sum"; TRL's elementwise "mean" over no tokens is 0/0
(NaN), in TRL as in the drop-in.
"""
import pytest
import torch

from conftest import DEVICES
from distillkit import KDLoss, distance, fused_linear_kd_loss, kd_loss, slam_loss, sparse_kd_loss
from distillkit.integrations.trl import chunked_divergence_loss, generalized_jsd_loss

C, K, H = 7, 3, 4


def other_device(device):
    """A device the op's tensors are not on: the CPU for CUDA, else the meta device."""
    return torch.device("cpu") if torch.device(device).type == "cuda" else torch.device("meta")


# ---- every op, as a function of its leading shape ---------------------------------------

def kd_call(lead, device, dtype=torch.float32, c=C, **kw):
    z = torch.randn(*lead, c, device=device, dtype=dtype, requires_grad=True)
    return z, lambda: kd_loss(z, torch.randn(*lead, c, device=device, dtype=dtype), **kw)


def kd_module_call(lead, device, dtype=torch.float32, c=C, **kw):
    z = torch.randn(*lead, c, device=device, dtype=dtype, requires_grad=True)
    options = {k: kw.pop(k) for k in list(kw) if k not in ("labels", "weight", "normalizer")}
    return z, lambda: KDLoss(**options)(z, torch.randn(*lead, c, device=device, dtype=dtype), **kw)


def sparse_call(lead, device, dtype=torch.float32, c=C, k=K, **kw):
    z = torch.randn(*lead, c, device=device, dtype=dtype, requires_grad=True)
    idx = torch.arange(k, device=device).expand(*lead, k)
    lp = torch.log_softmax(torch.randn(*lead, k, device=device), -1)
    return z, lambda: sparse_kd_loss(z, idx, lp, **kw)


def slam_call(lead, device, dtype=torch.float32, c=C, **kw):
    kw.pop("labels", None)
    kw.pop("normalizer", None)
    z = torch.randn(*lead, c, device=device, dtype=dtype, requires_grad=True)
    t = torch.softmax(torch.randn(*lead, c, device=device, dtype=dtype), -1)
    return z, lambda: slam_loss(z, t, 0.8, min(2, c) if c else 1, **kw)


def fused_call(lead, device, dtype=torch.float32, c=C, h=H, **kw):
    hidden = torch.randn(*lead, h, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(c, h, device=device, dtype=dtype)
    return hidden, lambda: fused_linear_kd_loss(hidden, w, torch.randn(*lead, c, device=device,
                                                                       dtype=dtype), **kw)


def distance_call(op):
    def call(lead, device, dtype=torch.float32, c=C, **kw):
        kw.pop("labels", None)
        kw.pop("normalizer", None)
        kw.pop("weight", None)
        s = torch.randn(*lead, c, device=device, dtype=dtype, requires_grad=True)
        return s, lambda: distance(s, torch.randn(*lead, c, device=device, dtype=dtype), op, **kw)
    return call


OPS = {"kd_loss": kd_call, "KDLoss": kd_module_call, "sparse_kd_loss": sparse_call,
       "slam_loss": slam_call, "fused_linear_kd_loss": fused_call,
       **{f"distance-{op}": distance_call(op)
          for op in ("l1", "l2", "smooth_l1", "kl", "cosine", "pearson")}}
NO_NONE = {"fused_linear_kd_loss"}  # reduction="none" is kd_loss's (per-row losses)
TWO_D = {"slam_loss"}  # (N, C) only


# ---- N = 0 -----------------------------------------------------------------------------

def empty_leads(name):
    return [(0,)] if name in TWO_D else [(0,), (2, 0), (0, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, reduction", [(n, r) for n in OPS for r in ("mean", "sum", "none")
                                             if not (r == "none" and n in NO_NONE)])
def test_no_rows_give_zero_and_a_zero_gradient(name, reduction, dtype, device):
    for lead in empty_leads(name):
        x, call = OPS[name](lead, device, dtype, reduction=reduction)
        loss = call()
        accumulated = torch.float64 if dtype == torch.float64 else torch.float32
        if reduction == "none":
            elementwise = name in ("distance-l1", "distance-l2", "distance-smooth_l1")
            assert loss.shape == (x.shape if elementwise else lead)
        else:
            assert loss.shape == () and loss.item() == 0.0
        assert loss.dtype == accumulated
        loss.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kd_loss", "sparse_kd_loss", "fused_linear_kd_loss"])
def test_no_rows_with_labels_weight_and_normalizer(name, device):
    """Empty labels and weights are accepted with the empty rows; a normalizer divides 0."""
    lead = (2, 0)
    for kw in (dict(labels=torch.zeros(lead, dtype=torch.int64, device=device)),
               dict(weight=torch.ones(lead, device=device)),
               dict(normalizer=5.0), dict(normalizer=torch.tensor(5.0, device=device))):
        x, call = OPS[name](lead, device, **kw)
        loss = call()
        assert loss.item() == 0.0
        loss.backward()
        assert x.grad.shape == x.shape and not x.grad.any()


def test_trainer_style_mean_over_an_all_ignored_batch_is_zero():
    # Every label ignored: no live row; the mean's denominator is clamped to 1, not 0/0.
    z = torch.randn(4, C, requires_grad=True)
    loss = kd_loss(z, torch.randn(4, C), labels=torch.full((4,), -100), hard_weight=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert not z.grad.any()


# ---- C = 0, K = 0, H = 0 -----------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in OPS if n not in
                                  ("distance-l1", "distance-l2", "distance-smooth_l1")])
@pytest.mark.parametrize("rows", [3, 0])
def test_no_classes_is_the_ops_own_error(name, rows):
    _, call = OPS[name]((rows,), "cpu", c=0)
    argument = {"fused_linear_kd_loss": "student_weight",
                "slam_loss": "student_logits", "kd_loss": "student_logits",
                "KDLoss": "student_logits", "sparse_kd_loss": "student_logits"}.get(name, "student")
    with pytest.raises(ValueError, match=f"{argument} must have at least one"):
        call()


@pytest.mark.parametrize("op", ["l1", "l2", "smooth_l1"])
def test_elementwise_distances_of_no_elements_are_zero(op):
    # Elementwise ops reduce over all elements, not along dim: none at all is N = 0.
    assert distance(torch.zeros(3, 0), torch.zeros(3, 0), op).item() == 0.0
    assert distance(torch.zeros(3, 0), torch.zeros(3, 0), op, reduction="sum").item() == 0.0


def test_no_kept_entries_is_sparse_kd_losss_error():
    _, call = sparse_call((3,), "cpu", k=0)
    with pytest.raises(ValueError, match=r"teacher_indices must have at least one kept class"):
        call()


def test_no_hidden_features_is_fused_linear_kd_losss_error():
    _, call = fused_call((3,), "cpu", h=0)
    with pytest.raises(ValueError, match="student_hidden must have at least one feature"):
        call()


def test_distance_along_an_empty_dim_is_an_error():
    with pytest.raises(ValueError, match="student must have at least one element along dim 0"):
        distance(torch.zeros(0, 4), torch.zeros(0, 4), "pearson", dim=0)


# ---- labels, weight, normalizer of the wrong type, shape, dtype or device ---------------

def bad_row_tensors(device):
    other = other_device(device)
    lead = (4,)
    return {
        "labels-list": (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a tensor"),
        "labels-shape": (dict(labels=torch.zeros(5, dtype=torch.int64, device=device)),
                         ValueError, r"labels must have shape \(4,\)"),
        "labels-(4,1)": (dict(labels=torch.zeros(4, 1, dtype=torch.int64, device=device)),
                         ValueError, r"labels must have shape \(4,\)"),
        "labels-float": (dict(labels=torch.zeros(lead, device=device)), ValueError,
                         "labels must be int64"),
        "labels-int32": (dict(labels=torch.zeros(lead, dtype=torch.int32, device=device)),
                         ValueError, "labels must be int64"),
        "labels-device": (dict(labels=torch.zeros(lead, dtype=torch.int64, device=other)),
                          ValueError, "labels must be on the logits' device"),
        "weight-list": (dict(weight=[1.0] * 4), TypeError, "weight must be a tensor"),
        "weight-shape": (dict(weight=torch.ones(3, device=device)), ValueError,
                         r"weight must have shape \(4,\)"),
        "weight-(4,1)": (dict(weight=torch.ones(4, 1, device=device)), ValueError,
                         r"weight must have shape \(4,\)"),
        "weight-int": (dict(weight=torch.ones(lead, dtype=torch.int64, device=device)),
                       ValueError, "weight must be a floating-point tensor"),
        "weight-bool": (dict(weight=torch.ones(lead, dtype=torch.bool, device=device)),
                        ValueError, "weight must be a floating-point tensor"),
        "weight-complex": (dict(weight=torch.ones(lead, dtype=torch.complex64, device=device)),
                           ValueError, "weight must be a floating-point tensor"),
        "weight-device": (dict(weight=torch.ones(lead, device=other)), ValueError,
                          "weight must be on the logits' device"),
        "normalizer-(1,)": (dict(normalizer=torch.ones(1, device=device)), ValueError,
                            r"normalizer must be a number or a 0-d tensor \(got shape \(1,\)\)"),
        "normalizer-(2,)": (dict(normalizer=torch.ones(2, device=device)), ValueError,
                            "normalizer must be a number or a 0-d tensor"),
        "normalizer-bool": (dict(normalizer=True), ValueError, "normalizer must be a positive"),
        "normalizer-str": (dict(normalizer="4"), ValueError, "normalizer must be a positive"),
        "normalizer-zero": (dict(normalizer=0), ValueError, "normalizer must be a positive"),
        "normalizer-inf": (dict(normalizer=float("inf")), ValueError,
                           "normalizer must be a positive finite"),
        "normalizer-nan": (dict(normalizer=float("nan")), ValueError,
                           "normalizer must be a positive finite"),
        "normalizer-negative-tensor": (dict(normalizer=torch.tensor(-2.0, device=device)),
                                       ValueError, "normalizer must be positive and finite"),
        "normalizer-inf-tensor": (dict(normalizer=torch.tensor(float("inf"), device=device)),
                                  ValueError, "normalizer must be positive and finite"),
        "normalizer-bool-tensor": (dict(normalizer=torch.tensor(True, device=device)),
                                   ValueError, "normalizer must be a real number tensor"),
        "normalizer-complex-tensor": (dict(normalizer=torch.tensor(2 + 0j, device=device)),
                                      ValueError, "normalizer must be a real number tensor"),
        "normalizer-with-sum": (dict(normalizer=4.0, reduction="sum"), ValueError,
                                "normalizer is only valid with reduction='mean'"),
    }


BAD_CASES = list(bad_row_tensors("cpu"))
TAKES = {"kd_loss": ("labels", "weight", "normalizer"), "KDLoss": ("labels", "weight", "normalizer"),
         "sparse_kd_loss": ("labels", "weight", "normalizer"),
         "fused_linear_kd_loss": ("labels", "weight", "normalizer"), "slam_loss": ("weight",)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, case", [(n, c) for n in TAKES for c in BAD_CASES
                                        if c.split("-")[0] in TAKES[n]])
def test_bad_labels_weight_normalizer_are_named(name, case, device):
    kw, error, match = bad_row_tensors(device)[case]
    if "labels" in kw and name != "sparse_kd_loss":
        kw = dict(kw, hard_weight=0.5)  # the labels are read, not only compared
    _, call = OPS[name]((4,), device, **kw)
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kd_loss", "sparse_kd_loss", "fused_linear_kd_loss"])
def test_good_normalizers_and_weights_are_accepted(name, device):
    """What the checks must let through: numbers, 0-d tensors of any real dtype (on the
    CPU too: a scalar divides tensors of any device), half-precision weights."""
    results = []
    for kw in (dict(normalizer=4), dict(normalizer=4.0), dict(normalizer=torch.tensor(4)),
               dict(normalizer=torch.tensor(4.0, device=device)),
               dict(normalizer=torch.tensor(4.0))):
        torch.manual_seed(0)
        results.append(OPS[name]((4,), device, **kw)[1]())
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=0)
    torch.manual_seed(0)
    half = OPS[name]((4,), device, weight=torch.ones(4, dtype=torch.float16, device=device))[1]()
    torch.manual_seed(0)
    torch.testing.assert_close(half, OPS[name]((4,), device)[1](), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_tensors_on_another_device_are_named(device):
    other = other_device(device)
    z = torch.randn(4, C, device=device)
    with pytest.raises(ValueError, match="teacher_logits must be on student_logits' device"):
        kd_loss(z, torch.randn(4, C, device=other))
    with pytest.raises(TypeError, match="teacher_logits must be a tensor"):
        kd_loss(z, [[0.0] * C] * 4)
    idx = torch.zeros(4, K, dtype=torch.int64)
    lp = torch.zeros(4, K)
    with pytest.raises(ValueError, match="teacher_indices must be on student_logits' device"):
        sparse_kd_loss(z, idx.to(other), lp.to(device))
    with pytest.raises(ValueError, match="teacher_logprobs must be on student_logits' device"):
        sparse_kd_loss(z, idx.to(device), lp.to(other))


# ---- the TRL drop-ins ------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("lead", [(2, 0), (0, 3)])
def test_trl_generalized_jsd_of_no_tokens_is_zero(lead, reduction):
    z = torch.randn(*lead, C, requires_grad=True)
    for labels in (None, torch.zeros(lead, dtype=torch.int64)):
        loss = generalized_jsd_loss(z, torch.randn(*lead, C), labels=labels, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert z.grad.shape == z.shape


def test_trl_generalized_jsd_of_only_ignored_tokens_is_zero():
    z = torch.randn(2, 3, C, requires_grad=True)
    loss = generalized_jsd_loss(z, torch.randn(2, 3, C), labels=torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert not z.grad.any()


@pytest.mark.parametrize("mask", [torch.ones(2, 0), torch.zeros(2, 3)], ids=["no-tokens", "masked"])
def test_trl_chunked_divergence_of_no_completion_tokens_is_zero(mask):
    hidden = torch.randn(*mask.shape, H, requires_grad=True)
    loss, entropy, n_valid = chunked_divergence_loss(
        hidden, torch.randn(*mask.shape, H), torch.randn(C, H), torch.randn(C, H), mask, 0.5)
    assert (loss.item(), entropy.item(), int(n_valid)) == (0.0, 0.0, 0)
    loss.backward()
    assert hidden.grad.shape == hidden.shape and not hidden.grad.any()


def test_trl_drop_in_empty_reductions_are_named():
    with pytest.raises(ValueError, match="student_logits must have at least one class"):
        generalized_jsd_loss(torch.zeros(2, 3, 0), torch.zeros(2, 3, 0))
    with pytest.raises(ValueError, match="student_weight must have at least one row"):
        chunked_divergence_loss(torch.randn(2, 3, H), torch.randn(2, 3, H), torch.zeros(0, H),
                                torch.zeros(0, H), torch.ones(2, 3), 0.5)
