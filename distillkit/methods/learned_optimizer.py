"""A coordinate-wise LSTM optimizer and its meta-training (docs/math.md §8, §9.3).

"Learning to learn by gradient descent by gradient descent" (Andrychowicz et al.,
2016): one small LSTM, its weights shared by all P coordinates of a parameter
vector θ, reads each coordinate's gradient and proposes that coordinate's update.
Per coordinate and step, with g the gradient:

    x  = (max(log(|g| + 1e-8) / p, −1), clamp(g·e^p, −1, 1))       preprocessing, p = 10
    (h_l, c_l) = LSTMCell_l(x_l, (h_l, c_l)),  x_{l+1} = h_l       L stacked cells
    out = w_o · h_L + b_o   (or h_L itself, H_L = 1, without a head)
    θ ← θ + s · out                                                s = output_scale

* :class:`CoordinateLSTM` holds the weights and runs one step over all coordinates
  through the fused op :func:`distillkit.ops.coordinate_lstm_step` (CPU and CUDA kernels).
* :class:`LearnedOptimizer` is a ``torch.optim.Optimizer`` that applies it to every
  parameter of a model, flattened into one coordinate vector.
* :func:`meta_train` trains the LSTM with Adam on the meta-objective Σ_{t=1..K} f(θ_t)
  of unrolls of K steps (truncated BPTT), with the meta-gradient computed by the
  reverse scan of docs/math.md §9.3 (:func:`unroll_meta_gradient`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from distillkit.data import BatchCycler
from distillkit.ops import coordinate_lstm_step

__all__ = ["CoordinateLSTM", "LearnedOptimizer", "Task", "UnrollState",
           "module_task", "start_unroll", "unroll_meta_gradient", "meta_train"]

METHODS = ("reverse", "autograd")


class CoordinateLSTM(nn.Module):
    """The weights of L stacked LSTM cells shared by every coordinate (docs/math.md §8).

    Args:
        hidden_sizes: H_1 … H_L. L2L's optimizer is (20, 20) with a head; the
            L2T-DLN teacher is (64, 64, 64, 1) without one.
        head: a linear head ``out = h_L @ head.weight.T + head.bias`` (1 output);
            without it the update is h_L itself, which needs H_L = 1.
        preprocess_p: p of the gradient preprocessing (> 0).
        output_scale: s in θ ← θ + s·out (0.1 for L2L, −1e-3 for L2T-DLN).

    Layer l has ``w_ih[l]`` (4H_l, in_l) with in_0 = 2, ``w_hh[l]`` (4H_l, H_l) and one
    combined bias ``bias[l]`` (4H_l,) = b_ih + b_hh, in PyTorch's gate order (i, f, g, o).
    Initialization is ``nn.LSTMCell``'s (every weight and both biases uniform in
    ±1/√H_l, the two biases summed) and ``nn.Linear``'s for the head, drawn from
    torch's global RNG. States are packed: h and c are (P, ΣH), layer l's columns
    after those of the layers below.
    """

    def __init__(self, hidden_sizes: Sequence[int] = (20, 20), *, head: bool = True,
                 preprocess_p: float = 10.0, output_scale: float = 0.1):
        super().__init__()
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be one or more sizes >= 1 (got {hidden_sizes})")
        if not head and hidden_sizes[-1] != 1:
            raise ValueError("without a head the last hidden size is the update and must be 1 "
                             f"(got hidden_sizes={hidden_sizes})")
        if not (math.isfinite(preprocess_p) and preprocess_p > 0):
            raise ValueError(f"preprocess_p must be finite and > 0 (got {preprocess_p})")
        if not math.isfinite(output_scale):
            raise ValueError(f"output_scale must be finite (got {output_scale})")
        self.hidden_sizes = hidden_sizes
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        self.w_ih, self.w_hh, self.bias = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        width = 2
        for size in hidden_sizes:
            cell = nn.LSTMCell(width, size)
            self.w_ih.append(nn.Parameter(cell.weight_ih.detach().clone()))
            self.w_hh.append(nn.Parameter(cell.weight_hh.detach().clone()))
            self.bias.append(nn.Parameter((cell.bias_ih + cell.bias_hh).detach().clone()))
            width = size
        self.head = nn.Linear(width, 1) if head else None

    @property
    def state_size(self) -> int:
        """ΣH: the width of the packed states h and c."""
        return sum(self.hidden_sizes)

    def init_state(self, num_coordinates: int, device=None,
                   dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """Zero states (h, c), each (P, ΣH); device and dtype default to the weights'."""
        ref = self.w_hh[0]
        shape = (num_coordinates, self.state_size)
        kwargs = dict(device=device or ref.device, dtype=dtype or ref.dtype)
        return torch.zeros(shape, **kwargs), torch.zeros(shape, **kwargs)

    def step(self, grad: Tensor, params: Tensor, h: Tensor, c: Tensor
             ) -> Tuple[Tensor, Tensor, Tensor]:
        """One update of all P coordinates: (params_out (P,), h_out, c_out (P, ΣH)).

        ``grad`` and ``params`` are (P,); autograd flows to the weights, h, c, params
        and grad (detach ``grad`` for the usual stop-gradient of L2L).
        """
        head_weight = self.head.weight if self.head is not None else None
        head_bias = self.head.bias if self.head is not None else None
        return coordinate_lstm_step(grad, params, h, c, list(self.w_ih), list(self.w_hh),
                                    list(self.bias), head_weight, head_bias,
                                    preprocess_p=self.preprocess_p,
                                    output_scale=self.output_scale)

    forward = step

    def extra_repr(self) -> str:
        return (f"hidden_sizes={self.hidden_sizes}, head={self.head is not None}, "
                f"preprocess_p={self.preprocess_p}, output_scale={self.output_scale}")


class LearnedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose update rule is a :class:`CoordinateLSTM`.

    All parameters (of all groups) that have a ``.grad`` are flattened, in
    ``param_groups`` order, into one coordinate vector θ (P,) with gradient g (P,);
    :meth:`step` applies ``θ, h, c ← lstm.step(g, θ, h, c)`` without autograd and
    writes θ back. Each parameter keeps its slice of the LSTM state as
    ``state[p]["h"]``, ``state[p]["c"]`` (numel(p), ΣH) (zeros at its first step),
    so :meth:`state_dict` / :meth:`load_state_dict` carry it like any optimizer
    state; the LSTM's weights travel in the same dict under ``"lstm"``. The LSTM
    runs in its own dtype (parameters and gradients are cast to it and back); its
    weights are not changed by this optimizer (see :func:`meta_train`).

    Args:
        params: parameters or parameter groups, as for any optimizer.
        lstm: a trained :class:`CoordinateLSTM`; default a fresh L2L one
            (``hidden_sizes`` with a linear head, ``preprocess_p``, ``output_scale``).
    """

    def __init__(self, params, lstm: Optional[CoordinateLSTM] = None, *,
                 hidden_sizes: Sequence[int] = (20, 20), preprocess_p: float = 10.0,
                 output_scale: float = 0.1):
        super().__init__(params, {})
        self.lstm = lstm if lstm is not None else CoordinateLSTM(
            hidden_sizes, head=True, preprocess_p=preprocess_p, output_scale=output_scale)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        weight = self.lstm.w_hh[0]
        as_lstm = dict(device=weight.device, dtype=weight.dtype)
        for p in params:
            if "h" not in self.state[p]:
                self.state[p]["h"], self.state[p]["c"] = self.lstm.init_state(p.numel(), **as_lstm)
        theta = torch.cat([p.reshape(-1).to(**as_lstm) for p in params])
        grad = torch.cat([p.grad.reshape(-1).to(**as_lstm) for p in params])
        h = torch.cat([self.state[p]["h"].to(**as_lstm) for p in params])
        c = torch.cat([self.state[p]["c"].to(**as_lstm) for p in params])
        theta, h, c = self.lstm.step(grad, theta, h, c)
        sizes = [p.numel() for p in params]
        for p, new, h_p, c_p in zip(params, theta.split(sizes), h.split(sizes), c.split(sizes)):
            p.copy_(new.view_as(p))
            self.state[p]["h"], self.state[p]["c"] = h_p, c_p
        return loss

    def state_dict(self) -> Dict:
        state = super().state_dict()
        state["lstm"] = self.lstm.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict) -> None:
        state_dict = dict(state_dict)
        lstm = state_dict.pop("lstm", None)
        super().load_state_dict(state_dict)
        if lstm is not None:
            self.lstm.load_state_dict(lstm)


# ---- meta-training ------------------------------------------------------------------

@dataclass
class Task:
    """An optimizee: its initial flat parameters θ₀ (P,) and its loss f(θ) → scalar."""

    params: Tensor
    loss: Callable[[Tensor], Tensor]


def module_task(model: nn.Module, inputs: Tensor, labels: Tensor, *,
                batch_size: Optional[int] = None, seed: int = 0) -> Task:
    """The cross entropy of ``model`` on (inputs, labels) as a function of its flattened
    parameters (``named_parameters`` order); θ₀ = the model's current parameters.

    Full-batch by default (a deterministic f). With ``batch_size``, every call of the
    loss evaluates the next minibatch of an order reshuffled each epoch (generator
    seeded with ``seed``; a last short batch is dropped): the stochastic f_t of L2L.
    :func:`unroll_meta_gradient` calls the loss exactly once per step (at θ_t, for both
    f(θ_t) and the next step's input ∇f(θ_t)), so both methods see the same batches.
    """
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    sizes = [math.prod(s) for s in shapes]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batches = BatchCycler(inputs, labels, batch_size, seed) if batch_size is not None else None

    def loss(theta: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        x, y = next(batches) if batches is not None else (inputs, labels)
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return Task(theta0, loss)


@dataclass
class UnrollState:
    """Where an optimizee run stands between unrolls; every tensor is detached.

    ``params`` θ_t (P,), ``grad`` = ∇f(θ_t) (the next step's input), ``loss`` = f(θ_t),
    ``h``, ``c`` (P, ΣH) the LSTM state, ``step`` = t.
    """

    params: Tensor
    grad: Tensor
    loss: Tensor
    h: Tensor
    c: Tensor
    step: int = 0


def _loss_and_grad(loss_fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tuple[Tensor, Tensor]:
    """f(θ) and ∇f(θ), both detached."""
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        loss = loss_fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def start_unroll(lstm: CoordinateLSTM, task: Task) -> UnrollState:
    """θ₀ (cast to the LSTM's dtype and device), f(θ₀), ∇f(θ₀) and zero LSTM states."""
    weight = lstm.w_hh[0]
    theta = task.params.detach().to(device=weight.device, dtype=weight.dtype)
    loss, grad = _loss_and_grad(task.loss, theta)
    h, c = lstm.init_state(theta.numel())
    return UnrollState(theta, grad, loss, h, c)


def unroll_meta_gradient(lstm: CoordinateLSTM, loss_fn: Callable[[Tensor], Tensor],
                         state: UnrollState, unroll: int, *, method: str = "reverse"
                         ) -> Tuple[Tensor, List[Tensor], UnrollState]:
    """Unroll K = ``unroll`` LSTM steps from ``state``; return the meta-loss, its gradient
    w.r.t. ``lstm.parameters()`` (in that order) and the state after the unroll.

    From (θ₀, g₀ = ∇f(θ₀), h₀, c₀), for t = 1..K: (θ_t, h_t, c_t) = step(g_{t−1}, θ_{t−1},
    h_{t−1}, c_{t−1}) and g_t = ∇f(θ_t), detached (the stop-gradient of L2L). The
    meta-loss is Σ_{t=1..K} f(θ_t). The state coming in is a constant (truncated BPTT)
    and the one going out is detached, ready for the next unroll.

    ``method="reverse"``: the forward pass runs without autograd and keeps only the
    step inputs (g_{t−1}, h_{t−1}, c_{t−1}) and the raw gradients g_t. Because the fed
    gradients are detached, θ_t reaches the meta-loss only through θ_{t+1} = θ_t + …
    (identity Jacobian) and f(θ_t), so its adjoint is θ̄_t = Σ_{k≥t} g_k. The scan
    runs t = K..1: re-run step t under autograd from its saved inputs and pull
    (θ̄_t, h̄_t, c̄_t) back with ``torch.autograd.grad`` to the weights' gradient and
    (h̄_{t−1}, c̄_{t−1}); h̄_K = c̄_K = 0. No graph over the optimizee exists; memory is
    the K saved (g, h, c) plus one step's graph. The step's θ input is not saved: a
    zero vector stands in, since ∂θ_t/∂θ_{t−1} = I and the weights' gradient does
    not depend on it.

    ``method="autograd"``: the same quantity with one graph through the whole unroll
    (the optimizee's forward passes included) and one ``backward``: the oracle.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (got {method!r})")
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1 (got {unroll})")
    weights = list(lstm.parameters())
    if method == "autograd":
        return _meta_gradient_autograd(lstm, loss_fn, state, unroll, weights)

    theta, grad, h, c = state.params, state.grad, state.h, state.c
    saved: List[Tuple[Tensor, Tensor, Tensor]] = []
    raw: List[Tensor] = []
    meta_loss = torch.zeros((), dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        for _ in range(unroll):
            saved.append((grad, h, c))
            theta, h, c = lstm.step(grad, theta, h, c)
            loss, grad = _loss_and_grad(loss_fn, theta)
            raw.append(grad)
            meta_loss += loss
    out_state = UnrollState(theta, grad, loss, h, c, state.step + unroll)

    meta_grads = [torch.zeros_like(w) for w in weights]
    adj_theta = torch.zeros_like(theta)
    adj_h, adj_c = torch.zeros_like(h), torch.zeros_like(c)
    for t in reversed(range(unroll)):
        adj_theta = adj_theta + raw[t]
        g_in, h_in, c_in = saved[t]
        # The state entering the unroll is a constant: no adjoint for it.
        carry = t > 0
        with torch.enable_grad():
            h_in = h_in.detach().requires_grad_(carry)
            c_in = c_in.detach().requires_grad_(carry)
            outputs = lstm.step(g_in, torch.zeros_like(g_in), h_in, c_in)
            inputs = weights + ([h_in, c_in] if carry else [])
            pulled = torch.autograd.grad(outputs, inputs, (adj_theta, adj_h, adj_c),
                                         allow_unused=True)
        for acc, g_w in zip(meta_grads, pulled[:len(weights)]):
            if g_w is not None:
                acc += g_w
        if carry:
            adj_h, adj_c = pulled[len(weights):]
    return meta_loss, meta_grads, out_state


def _meta_gradient_autograd(lstm, loss_fn, state, unroll, weights):
    theta, grad, h, c = state.params, state.grad, state.h, state.c
    meta_loss = torch.zeros((), dtype=theta.dtype, device=theta.device)
    with torch.enable_grad():
        for _ in range(unroll):
            theta, h, c = lstm.step(grad.detach(), theta, h, c)
            loss = loss_fn(theta)
            (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
            meta_loss = meta_loss + loss
        meta_grads = torch.autograd.grad(meta_loss, weights, allow_unused=True)
    meta_grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, meta_grads)]
    out_state = UnrollState(theta.detach(), grad.detach(), loss.detach(), h.detach(),
                            c.detach(), state.step + unroll)
    return meta_loss.detach(), meta_grads, out_state


def meta_train(lstm: CoordinateLSTM, make_task: Callable[[int], Task], *, unroll: int = 20,
               steps_per_task: int = 100, meta_steps: int = 100, lr: float = 1e-3,
               method: str = "reverse", max_grad_norm: Optional[float] = None,
               progress: bool = True) -> List[Dict[str, float]]:
    """Meta-train ``lstm`` in place with Adam(``lr``) on truncated unrolls; return the history.

    Task i = ``make_task(i)`` (i = 0, 1, …: the caller makes it deterministic) is
    optimized by the LSTM for ``steps_per_task`` steps from zero LSTM states, in
    unrolls of ``unroll`` steps; each unroll gives one meta-gradient
    (:func:`unroll_meta_gradient` with ``method``) of Σ_{t=1..K} f(θ_t) and one Adam
    step, so the next unroll of the same task continues with the updated LSTM (the
    state carried over, detached). ``meta_steps`` counts Adam steps. An unroll whose
    meta-loss or meta-gradient is not finite (a diverged optimizee) makes no update
    and ends its task. ``max_grad_norm`` clips the meta-gradient's global norm.

    Each history entry: ``meta_step`` (1-based), ``task``, ``step`` (optimizee steps
    done in the task after the unroll), ``meta_loss`` = Σ_t f(θ_t) / K (the mean loss
    over the unroll), ``final_loss`` = f(θ_K), ``skipped`` (1.0 for a non-finite unroll).
    """
    if steps_per_task < unroll or steps_per_task % unroll:
        raise ValueError(f"steps_per_task must be a positive multiple of unroll "
                         f"(got {steps_per_task} and {unroll})")
    if meta_steps < 0:
        raise ValueError(f"meta_steps must be >= 0 (got {meta_steps})")
    weights = list(lstm.parameters())
    optimizer = torch.optim.Adam(weights, lr=lr)
    history: List[Dict[str, float]] = []
    task_index, task, state = -1, None, None
    with tqdm(total=meta_steps, disable=not progress, unit="meta-step", leave=False,
              dynamic_ncols=True) as bar:
        for meta_step in range(1, meta_steps + 1):
            if state is None or state.step >= steps_per_task:
                task_index += 1
                task = make_task(task_index)
                state = start_unroll(lstm, task)
            meta_loss, grads, new_state = unroll_meta_gradient(lstm, task.loss, state, unroll,
                                                               method=method)
            finite = bool(torch.isfinite(meta_loss)) and all(bool(torch.isfinite(g).all())
                                                             for g in grads)
            if finite:
                for w, g in zip(weights, grads):
                    w.grad = g
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(weights, max_grad_norm)
                optimizer.step()
                state = new_state
            history.append({"meta_step": meta_step, "task": task_index, "step": new_state.step,
                            "meta_loss": float(meta_loss) / unroll,
                            "final_loss": float(new_state.loss), "skipped": float(not finite)})
            if not finite:
                state = None
            bar.update()
            bar.set_postfix(task=task_index, meta_loss=f"{history[-1]['meta_loss']:.4g}")
    return history
