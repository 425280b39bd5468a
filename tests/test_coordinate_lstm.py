"""coordinate_lstm_step (docs/math.md §8) against stacked nn.LSTMCell + nn.Linear and the reference."""
import math

import pytest
import torch

from distillkit.ops import coordinate_lstm_step
from distillkit.reference import coordinate_lstm_step_ref

from conftest import DEVICES, rounding_bound

# (rtol, atol) declared once per dtype; atol is relative to max(1, max |expected|), as
# weight gradients are sums over all P coordinates.
FWD_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-13)}
GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.float64: (1e-9, 1e-12)}

# (id, hidden sizes, head): L2L's 2x20 + linear head, L2T-DLN's 2->64->64->64->1 without a
# head, and 1 to 4 layers of 20 and 64 around them.
CONFIGS = [
    ("1x20+head", [20], True),
    ("2x20+head", [20, 20], True),
    ("4x20+head", [20, 20, 20, 20], True),
    ("2x64+head", [64, 64], True),
    ("20,1", [20, 1], False),
    ("3x64,1", [64, 64, 64, 1], False),
]
CONFIG = {name: (hidden, head) for name, hidden, head in CONFIGS}
P_FP32 = [1, 7, 1000]
P_FP64 = [1, 7, 33]
STEP = dict(preprocess_p=10.0, output_scale=0.1)


def preprocess(grad, p):
    a = torch.clamp(torch.log(grad.abs() + 1e-8) / p, min=-1.0)
    b = torch.clamp(grad * math.exp(p), -1.0, 1.0)
    return torch.stack([a, b], dim=1)


class Stack(torch.nn.Module):
    """The module formulation: nn.LSTMCell per layer (batch = P) and an nn.Linear head."""

    def __init__(self, hidden, head, dtype, device):
        super().__init__()
        inputs = [2] + hidden[:-1]
        self.hidden = hidden
        self.cells = torch.nn.ModuleList(
            torch.nn.LSTMCell(i, h, dtype=dtype, device=device) for i, h in zip(inputs, hidden))
        self.head = torch.nn.Linear(hidden[-1], 1, dtype=dtype, device=device) if head else None

    def forward(self, grad, params, h, c, preprocess_p, output_scale):
        x = preprocess(grad, preprocess_p)
        hs, cs = [], []
        for cell, h_l, c_l in zip(self.cells, h.split(self.hidden, 1), c.split(self.hidden, 1)):
            x, c_l = cell(x, (h_l, c_l))
            hs.append(x)
            cs.append(c_l)
        out = self.head(x) if self.head is not None else x
        return params + output_scale * out.squeeze(1), torch.cat(hs, 1), torch.cat(cs, 1)

    def weights(self):
        """The op's weight arguments; the bias is b_ih + b_hh, so both get its gradient."""
        return ([c.weight_ih for c in self.cells], [c.weight_hh for c in self.cells],
                [c.bias_ih + c.bias_hh for c in self.cells],
                self.head.weight if self.head is not None else None,
                self.head.bias if self.head is not None else None)

    def fused(self, grad, params, h, c, preprocess_p, output_scale):
        return coordinate_lstm_step(grad, params, h, c, *self.weights(),
                                    preprocess_p=preprocess_p, output_scale=output_scale)


def make_state(P, hidden, dtype, device, grad=None):
    """grad spans 1e-9 .. 10 in magnitude, so both clamps of the preprocessing are hit."""
    if grad is None:
        grad = torch.randn(P, dtype=dtype) * 10 ** torch.empty(P, dtype=dtype).uniform_(-9, 1)
    width = sum(hidden)
    state = (grad, torch.randn(P, dtype=dtype), torch.randn(P, width, dtype=dtype) * 0.5,
             torch.randn(P, width, dtype=dtype))
    return [t.to(device).requires_grad_() for t in state]


def outputs_and_grads(fn, module, state, step):
    outs = fn(*state, **step)
    torch.manual_seed(1)
    cotangents = [torch.randn_like(o) for o in outs]
    wrt = list(state) + list(module.parameters())
    return outs, torch.autograd.grad(outs, wrt, cotangents)


def assert_close(got, want, tol):
    rtol, atol = tol
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(1.0, want.detach().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


def assert_matches(fn, ref, module, state, step, dtype):
    """fn's outputs and gradients (w.r.t. the state and the weights) against ref's."""
    outs, grads = outputs_and_grads(fn, module, state, step)
    want_outs, want_grads = outputs_and_grads(ref, module, state, step)
    for got, want in zip(outs, want_outs):
        assert_close(got, want, FWD_TOL[dtype])
    n_rows = state[0].shape[0]
    for i, (got, want) in enumerate(zip(grads, want_grads)):
        # The weight gradients (after the state's) are sums over the P coordinates: their
        # rounding error grows as sqrt(P) eps (both sides sum in different orders).
        tol = GRAD_TOL[dtype]
        if i >= len(state):
            bound = rounding_bound(dtype, n_rows, c=8.0)
            tol = (max(tol[0], bound), max(tol[1], bound))
        assert_close(got, want, tol)


def check_against_module(P, name, dtype, device, grad=None, step=STEP):
    hidden, head = CONFIG[name]
    module = Stack(hidden, head, dtype, device)
    state = make_state(P, hidden, dtype, device, grad)
    assert_matches(module.fused, module, module, state, step, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIG))
@pytest.mark.parametrize("P", P_FP32)
def test_matches_lstmcell_fp32(device, name, P):
    check_against_module(P, name, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["2x20+head", "4x20+head", "3x64,1"])
@pytest.mark.parametrize("P", P_FP64)
def test_matches_lstmcell_fp64(device, name, P):
    check_against_module(P, name, torch.float64, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["2x20+head", "20,1"])
def test_matches_lstmcell_large(device, name):
    check_against_module(100_000, name, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["2x20+head", "3x64,1"])
@pytest.mark.parametrize("step", [STEP, dict(preprocess_p=3.0, output_scale=-1e-3)], ids=str)
def test_matches_reference(device, dtype, name, step):
    hidden, head = CONFIG[name]
    module = Stack(hidden, head, dtype, device)
    state = make_state(257, hidden, dtype, device)

    def ref(*args, **kw):
        return coordinate_lstm_step_ref(*args, *module.weights(), **kw)

    assert_matches(module.fused, ref, module, state, step, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_preprocessing_edges(device, dtype):
    """Zero (d|g|/dg = 0 there, as torch.abs), tiny and huge gradients, and values exactly
    at the clamp bounds (p = 8 ln 2: e^p = 256, so g = ±1/256 gives g e^p = ±1 and
    log(|g| + eps) / p = -1 for |g| = 1/256 - eps), where torch.clamp passes no gradient."""
    p = 8 * math.log(2)
    values = [0.0, -0.0, 1e-30, -1e-12, 1e-8, 3e-5, -4e-3, 1 / 256, -1 / 256, 1 / 256 - 1e-8,
              0.5, -7.0, 1e10, -3e38, float("inf"), float("-inf")]
    grad = torch.tensor(values, dtype=dtype)
    x = preprocess(grad, p)
    assert (x[:, 0] >= -1).all() and (x[:, 1].abs() <= 1).all()
    finite = torch.isfinite(grad)
    check_against_module(len(values) - 2, "2x20+head", dtype, device, grad=grad[finite],
                         step=dict(preprocess_p=p, output_scale=0.1))
    # Infinite gradients are clamped too: the outputs stay finite.
    hidden, head = CONFIG["2x20+head"]
    module = Stack(hidden, head, dtype, device)
    outs = module.fused(*make_state(len(values), hidden, dtype, device, grad=grad), **STEP)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates(device):
    """A NaN gradient or state gives NaN in its own coordinate's outputs only (as the
    reference), never a silently finite update."""
    hidden, head = CONFIG["3x64,1"]
    module = Stack(hidden, head, torch.float32, device)
    grad, params, h, c = (t.detach() for t in make_state(20, hidden, torch.float32, device))
    grad[3] = math.nan
    h[11, 70] = math.nan
    got = module.fused(grad, params, h, c, **STEP)
    want = module(grad, params, h, c, **STEP)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
    assert got[0][[3, 11]].isnan().all() and not got[0][[0, 19]].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_gradient_input(device):
    """grad = 0 everywhere: a = -1 (|g| has zero gradient at 0), b = 0, whose gradient e^p
    is all that reaches grad."""
    hidden, head = CONFIG["2x20+head"]
    module = Stack(hidden, head, torch.float32, device)
    state = make_state(64, hidden, torch.float32, device, grad=torch.zeros(64))
    x = preprocess(state[0], STEP["preprocess_p"])
    assert (x[:, 0] == -1).all() and (x[:, 1] == 0).all()
    _, grads = outputs_and_grads(module.fused, module, state, STEP)
    _, want = outputs_and_grads(module, module, state, STEP)
    assert torch.isfinite(grads[0]).all()
    assert_close(grads[0], want[0], GRAD_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["2x20+head", "3x64,1"])
def test_deterministic(device, name):
    """Weight gradients: the same bits run to run and with 1 or 2 threads."""
    hidden, head = CONFIG[name]
    module = Stack(hidden, head, torch.float32, device)
    state = make_state(20_000, hidden, torch.float32, device)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            runs.append(outputs_and_grads(module.fused, module, state, STEP))
    finally:
        torch.set_num_threads(threads)
    (outs, grads), others = runs[0], runs[1:]
    for other_outs, other_grads in others:
        assert all(torch.equal(a, b) for a, b in zip(outs, other_outs))
        assert all(torch.equal(a, b) for a, b in zip(grads, other_grads))


@pytest.mark.parametrize("device", DEVICES)
def test_partial_requires_grad(device):
    """Only some inputs require grad; the others get None, and no_grad runs the forward only."""
    hidden, _ = CONFIG["2x20+head"]
    module = Stack(hidden, True, torch.float32, device)
    grad, params, h, c = make_state(10, hidden, torch.float32, device)
    grad, h = grad.detach(), h.detach()
    w_ih, w_hh, bias, hw, hb = module.weights()
    out = coordinate_lstm_step(grad, params, h, c, w_ih, w_hh, [b.detach() for b in bias],
                               hw.detach(), hb.detach(), **STEP)[0]
    g_params, g_c, g_w = torch.autograd.grad(out.sum(), [params, c, w_ih[1]])
    assert torch.equal(g_params, torch.ones_like(params))
    ref = coordinate_lstm_step_ref(grad, params, h, c, w_ih, w_hh, bias, hw, hb, **STEP)[0]
    torch.testing.assert_close(g_c, torch.autograd.grad(ref.sum(), c)[0], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        outs = coordinate_lstm_step(grad, params, h, c, w_ih, w_hh, bias, hw, hb, **STEP)
    assert not any(o.requires_grad for o in outs)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(device):
    hidden, head = CONFIG["2x20+head"]
    module = Stack(hidden, head, torch.float32, device)
    grad, params, h, c = make_state(30, hidden, torch.float32, device)
    big = torch.randn(30, 80, device=device)
    h_nc, c_nc = big[:, ::2], big.t().contiguous().t()[:, 40:]
    weights = module.weights()
    got = coordinate_lstm_step(grad, params[::1], h_nc, c_nc, *weights, **STEP)
    want = coordinate_lstm_step_ref(grad, params, h_nc, c_nc, *weights, **STEP)
    for a, b in zip(got, want):
        assert_close(a, b, FWD_TOL[torch.float32])
    empty = [t[:0] for t in (grad, params, h, c)]
    outs = coordinate_lstm_step(*empty, *weights, **STEP)
    assert [o.shape for o in outs] == [(0,), (0, 40), (0, 40)]
    grads = torch.autograd.grad(sum(o.sum() for o in outs), list(module.parameters()))
    assert not any(g.any() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden,head", [([3, 2], True), ([4, 1], False)], ids=str)
def test_gradcheck(device, hidden, head):
    module = Stack(hidden, head, torch.float64, device)
    # |g| away from 0 and from the clamp bounds (e^-3 with p = 3): the function is smooth there.
    grad = torch.tensor([1e-3, -2e-2, 0.5, -3.0, 40.0], dtype=torch.float64)
    state = make_state(5, hidden, torch.float64, device, grad=grad)
    w_ih, w_hh, bias, hw, hb = module.weights()
    bias = [b.detach().requires_grad_() for b in bias]
    heads = [hw.detach().requires_grad_(), hb.detach().requires_grad_()] if head else []
    L = len(hidden)

    def f(*args):
        g, pa, h, c = args[:4]
        w = args[4:4 + 3 * L]
        hd = args[4 + 3 * L:] or (None, None)
        return coordinate_lstm_step(g, pa, h, c, w[:L], w[L:2 * L], w[2 * L:], *hd,
                                    preprocess_p=3.0, output_scale=0.7)

    inputs = (*state, *[w.detach().requires_grad_() for w in w_ih + w_hh], *bias, *heads)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["2x20+head", "20,1"])
def test_opcheck(device, name):
    hidden, head = CONFIG[name]
    module = Stack(hidden, head, torch.float32, device)
    grad, params, h, c = make_state(9, hidden, torch.float32, device)
    w_ih, w_hh, bias, hw, hb = module.weights()
    bias = [b.detach().requires_grad_() for b in bias]
    args = (grad, params, h, c, w_ih, w_hh, bias, hw, hb, 10.0, 0.1)
    torch.library.opcheck(torch.ops.distillkit.coordinate_lstm_forward, args)
    detached = [t.detach() for t in (grad, h, c)]
    weights = ([w.detach() for w in w_ih], [w.detach() for w in w_hh], [b.detach() for b in bias],
               hw.detach() if head else None, hb.detach() if head else None)
    for gh, gc in [(torch.randn_like(h), torch.randn_like(c)), (None, None)]:
        torch.library.opcheck(torch.ops.distillkit.coordinate_lstm_backward,
                              (torch.randn_like(params), gh, gc, *detached, *weights, 10.0, 0.1))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_unroll(device):
    """A 3-step unroll under torch.compile(fullgraph=True): states carried, loss after each step."""
    hidden, head = CONFIG["2x20+head"]
    module = Stack(hidden, head, torch.float32, device)
    grad, params, h, c = make_state(50, hidden, torch.float32, device)
    weights = module.weights()

    def unroll(grad, params, h, c):
        loss = 0
        for t in range(3):
            params, h, c = coordinate_lstm_step(grad * (t + 1), params, h, c, *weights, **STEP)
            loss = loss + (params * params).sum()
        return loss

    wrt = [grad, params, h, c] + list(module.parameters())
    compiled = torch.compile(unroll, fullgraph=True)
    got = compiled(grad, params, h, c)
    want = unroll(grad, params, h, c)
    assert_close(got, want, FWD_TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(want, wrt)):
        assert_close(a, b, GRAD_TOL[torch.float32])


def _bad(kind):
    """A valid 2x20+head call (as keyword arguments), broken in one way."""
    w_ih = [torch.randn(80, 2), torch.randn(80, 20)]
    w_hh = [torch.randn(80, 20), torch.randn(80, 20)]
    bias = [torch.randn(80), torch.randn(80)]
    args = dict(grad=torch.randn(5), params=torch.randn(5), h=torch.randn(5, 40),
                c=torch.randn(5, 40), w_ih=w_ih, w_hh=w_hh, bias=bias,
                head_weight=torch.randn(1, 20), head_bias=torch.randn(1))
    kw = dict(STEP)
    if kind == "c shape":
        args["c"] = torch.randn(5, 39)
    elif kind == "h rows":
        args["h"] = torch.randn(4, 40)
    elif kind == "params shape":
        args["params"] = torch.randn(6)
    elif kind == "w_ih shape":
        w_ih[0] = torch.randn(80, 3)
    elif kind == "w_hh shape":
        w_hh[1] = torch.randn(80, 21)
    elif kind == "bias shape":
        bias[1] = torch.randn(81)
    elif kind == "list lengths":
        args["w_hh"] = w_hh[:1]
    elif kind == "no layers":
        args.update(w_ih=[], w_hh=[], bias=[])
    elif kind in ("p nan", "p inf", "p zero", "p negative"):
        kw["preprocess_p"] = {"p nan": math.nan, "p inf": math.inf, "p zero": 0.0,
                              "p negative": -1.0}[kind]
    elif kind == "fp16":
        args = {k: ([t.half() for t in v] if isinstance(v, list) else v.half())
                for k, v in args.items()}
    elif kind == "dtype mismatch":
        w_ih[0] = w_ih[0].double()
    elif kind == "head_weight alone":
        args["head_bias"] = None
    elif kind == "head_weight shape":
        args["head_weight"] = torch.randn(1, 19)
    elif kind == "no head, last hidden 20":
        args.update(head_weight=None, head_bias=None)
    return args, kw


@pytest.mark.parametrize("kind,message", [
    ("c shape", r"c must be \(P, sum of hidden sizes\) = \(5, 40\)"),
    ("h rows", r"h must be \(P, sum of hidden sizes\)"),
    ("params shape", "params must have the shape of grad"),
    ("w_ih shape", r"w_ih\[0\] must be \(80, 2\)"),
    ("w_hh shape", r"w_hh\[1\] must be \(4H, H\)"),
    ("bias shape", r"bias\[1\] must be \(80,\)"),
    ("list lengths", "w_ih, w_hh and bias must hold one tensor per layer"),
    ("no layers", "w_ih must hold 1 to 8 layers"),
    ("p nan", "preprocess_p must be finite and > 0"),
    ("p inf", "preprocess_p must be finite and > 0"),
    ("p zero", "preprocess_p must be finite and > 0"),
    ("p negative", "preprocess_p must be finite and > 0"),
    ("fp16", "grad must be fp32 or fp64"),
    ("dtype mismatch", r"w_ih\[0\] must have the dtype of grad"),
    ("head_weight alone", "head_weight and head_bias must be given together"),
    ("head_weight shape", r"head_weight must be \(1, 20\)"),
    ("no head, last hidden 20", "without a head the last layer's hidden size must be 1"),
])
def test_bad_input(kind, message):
    args, kw = _bad(kind)
    with pytest.raises(ValueError, match=message):
        coordinate_lstm_step(**args, **kw)


def test_bad_backward_input():
    args, _ = _bad("none")
    weights = [args[k] for k in ("w_ih", "w_hh", "bias", "head_weight", "head_bias")]
    g, h, c = args["grad"], args["h"], args["c"]
    with pytest.raises(ValueError, match="grad_h_out must have the shape of h"):
        torch.ops.distillkit.coordinate_lstm_backward(torch.randn(5), torch.randn(5, 39), None,
                                                      g, h, c, *weights, 10.0, 0.1)
    with pytest.raises(ValueError, match="grad_params_out must have the shape of grad"):
        torch.ops.distillkit.coordinate_lstm_backward(torch.randn(4), None, None,
                                                      g, h, c, *weights, 10.0, 0.1)
