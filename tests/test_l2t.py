"""The learned optimizer (docs/math.md §9.3), the dynamic loss network and L2T-DLN (docs/math.md §9.4), the experiment.

The LSTM step is the fused op ``distillkit.ops.coordinate_lstm_step``; the oracles here
are ``distillkit.reference.coordinate_lstm_step_ref``, plain autograd, hand-written loops
and finite differences, all in fp64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.__main__ import main
from distillkit.data import DictDataset, mlp
from distillkit.methods.dln import DynamicLossNetwork, imitate
from distillkit.methods.learned_optimizer import (CoordinateLSTM, LearnedOptimizer, Task, UnrollState,
                                          meta_train, module_task, start_unroll,
                                          unroll_meta_gradient)
from distillkit.reference import coordinate_lstm_step_ref
from distillkit.trainers import KDTrainer, L2TDLNTrainer
from resume_checks import assert_resume_fails_cleanly, damage_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(rtol=1e-9, atol=1e-12)


def tiny_task(seed=0, n=16, features=5, hidden=4, classes=3):
    torch.manual_seed(seed)
    model = mlp(features, [hidden], classes).double()
    x = torch.randn(n, features, dtype=torch.float64)
    y = torch.randint(0, classes, (n,))
    return model, x, y


def assert_all_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **(tol or F64))


# ---- the dynamic loss network --------------------------------------------------------

def test_dln_has_5000_bias_free_weights():
    dln = DynamicLossNetwork()
    shapes = [tuple(p.shape) for p in dln.parameters()]
    assert shapes == [(40, 4), (40, 40), (40, 40), (40, 40), (1, 40)]
    assert dln.num_weights() == 5000 == dln.flat_weights().numel()
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in dln.modules())


def test_dln_transform_rows():
    z = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    rows = DynamicLossNetwork.transform(z, y)
    s = torch.sigmoid(z)
    expected = torch.tensor([
        [[s[0, 1], s[0, 0], 1, 0], [0, 0, 0, 0], [s[0, 1], s[0, 2], 1, 0]],
        [[0, 0, 0, 0], [s[1, 0], s[1, 1], 1, 0], [s[1, 0], s[1, 2], 1, 0]],
    ], dtype=torch.float64)
    torch.testing.assert_close(rows, expected, **F64)


def dln_loss_by_hand(weights, z, y, slope=0.01):
    """Row by row, with explicit matrix products: Σ_{n,c} MLP(row_{n,c}) / (N·C)."""
    n_rows, classes = z.shape
    total = torch.zeros((), dtype=z.dtype)
    for n in range(n_rows):
        for c in range(classes):
            if c == y[n]:
                a = torch.zeros(4, dtype=z.dtype)
            else:
                a = torch.stack([torch.sigmoid(z[n, y[n]]), torch.sigmoid(z[n, c]),
                                 torch.ones((), dtype=z.dtype), torch.zeros((), dtype=z.dtype)])
            for w in weights[:-1]:
                a = w @ a
                a = torch.where(a > 0, a, slope * a)
            total = total + (weights[-1] @ a)[0]
    return total / (n_rows * classes)


def test_dln_loss_equals_hand_written_reference():
    dln = DynamicLossNetwork().double()
    z = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([2, 0, 3])
    weights = [p.detach() for p in dln.parameters()]
    torch.testing.assert_close(dln(z, y), dln_loss_by_hand(weights, z, y), **F64)
    # functionally, at another φ: the module's own weights are not used
    phi = torch.randn(5000, dtype=torch.float64) * 0.2
    by_hand = dln_loss_by_hand(list(dln.unflatten(phi).values()), z, y)
    torch.testing.assert_close(dln.functional_loss(phi, z, y), by_hand, **F64)
    assert not torch.allclose(dln(z, y), by_hand)


def test_dln_functional_loss_is_differentiable_in_phi():
    dln = DynamicLossNetwork().double()
    z, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([2, 0, 3])
    phi = dln.flat_weights().requires_grad_(True)
    (grad,) = torch.autograd.grad(dln.functional_loss(phi, z, y), phi)
    dln(z, y).backward()
    torch.testing.assert_close(grad, torch.cat([p.grad.reshape(-1) for p in dln.parameters()]),
                               **F64)


def test_imitate_fits_the_target_loss():
    torch.manual_seed(0)
    dln = DynamicLossNetwork()
    z = torch.randn(64, 10)
    y = torch.randint(0, 10, (64,))
    s = torch.sigmoid(z)
    wrong = torch.ones_like(s).scatter(1, y[:, None], 0.0).bool()
    target = (-torch.log(s.gather(1, y[:, None])) - torch.log1p(-s)).where(wrong, 0).mean()
    with torch.no_grad():
        assert abs(float(dln(z, y) - target)) > 0.2
    assert imitate(dln, steps=300) < 0.02
    with torch.no_grad():
        assert abs(float(dln(z, y) - target)) < 0.05


# ---- the coordinate-wise LSTM and the learned optimizer ------------------------------

def lstm_args(lstm):
    head = (lstm.head.weight, lstm.head.bias) if lstm.head is not None else (None, None)
    return (list(lstm.w_ih), list(lstm.w_hh), list(lstm.bias), *head)


def test_coordinate_lstm_layout_and_init():
    torch.manual_seed(0)
    lstm = CoordinateLSTM((20, 20))
    torch.manual_seed(0)
    cells = [torch.nn.LSTMCell(2, 20), torch.nn.LSTMCell(20, 20)]
    for l, cell in enumerate(cells):
        assert torch.equal(lstm.w_ih[l], cell.weight_ih) and torch.equal(lstm.w_hh[l], cell.weight_hh)
        assert torch.equal(lstm.bias[l], cell.bias_ih + cell.bias_hh)
    assert lstm.head.weight.shape == (1, 20)
    h, c = lstm.init_state(7)
    assert h.shape == c.shape == (7, 40) and not h.any()
    with pytest.raises(ValueError, match="last hidden size"):
        CoordinateLSTM((64, 64), head=False)


def test_learned_optimizer_step_equals_reference_on_flattened_params():
    model, x, y = tiny_task()
    lstm = CoordinateLSTM().double()
    opt = LearnedOptimizer(model.parameters(), lstm)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    h, c = lstm.init_state(theta.numel())
    task = module_task(model, x, y)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        grad = torch.func.grad(task.loss)(theta)
        with torch.no_grad():
            theta, h, c = coordinate_lstm_step_ref(grad, theta, h, c, *lstm_args(lstm),
                                                   preprocess_p=10.0, output_scale=0.1)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(flat, theta, **F64)
    state_h = torch.cat([opt.state[p]["h"] for p in model.parameters()])
    torch.testing.assert_close(state_h, h, **F64)
    assert h.abs().sum() > 0


def test_learned_optimizer_state_dict_round_trip():
    model, x, y = tiny_task()
    opt = LearnedOptimizer(model.parameters(), CoordinateLSTM().double())
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = opt.state_dict()
    twin, _, _ = tiny_task()
    twin.load_state_dict(model.state_dict())
    # a fresh LSTM with other weights: load_state_dict must bring the trained ones
    other = LearnedOptimizer(twin.parameters(), CoordinateLSTM().double())
    other.load_state_dict(state)
    for m, o in ((model, opt), (twin, other)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert_all_close(list(model.parameters()), list(twin.parameters()))
    assert_all_close(list(opt.lstm.parameters()), list(other.lstm.parameters()))


# ---- meta-training -------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [None, 8], ids=["full-batch", "minibatch"])
@pytest.mark.parametrize("head", [True, False], ids=["l2l-head", "no-head"])
def test_reverse_scan_meta_gradient_equals_plain_autograd(head, batch_size):
    torch.manual_seed(1)
    lstm = (CoordinateLSTM() if head else CoordinateLSTM((8, 1), head=False)).double()
    model, x, y = tiny_task()
    runs = {}
    for method in ("reverse", "autograd"):
        # a fresh task per method: a minibatch task's batch order is consumed by use
        task = module_task(model, x, y, batch_size=batch_size, seed=0)
        state = start_unroll(lstm, task)
        runs[method] = []
        for _ in range(2):  # the second unroll starts from a carried, nonzero state
            loss, grads, state = unroll_meta_gradient(lstm, task.loss, state, 5, method=method)
            runs[method].append((loss, grads, state))
    for (loss_r, grads_r, state_r), (loss_a, grads_a, state_a) in zip(runs["reverse"],
                                                                      runs["autograd"]):
        torch.testing.assert_close(loss_r, loss_a, **F64)
        assert_all_close(grads_r, grads_a)
        assert max(float(g.abs().max()) for g in grads_r) > 1e-3
        assert_all_close([state_r.params, state_r.h, state_r.c, state_r.grad],
                         [state_a.params, state_a.h, state_a.c, state_a.grad])
    assert state_r.step == 10


def test_meta_loss_is_the_sum_of_losses_after_each_update():
    lstm = CoordinateLSTM().double()
    model, x, y = tiny_task()
    task = module_task(model, x, y)
    state = start_unroll(lstm, task)
    meta_loss, _, _ = unroll_meta_gradient(lstm, task.loss, state, 4)
    theta, h, c, total = state.params, state.h, state.c, 0.0
    with torch.no_grad():
        for _ in range(4):
            grad = torch.func.grad(task.loss)(theta)
            theta, h, c = lstm.step(grad, theta, h, c)
            total += float(task.loss(theta))
    assert math.isclose(float(meta_loss), total, rel_tol=1e-12)


@pytest.mark.parametrize("method", ["reverse", "autograd"])
def test_truncated_bptt_carries_the_state_detached(method):
    lstm = CoordinateLSTM().double()
    model, x, y = tiny_task()
    task = module_task(model, x, y)
    first = start_unroll(lstm, task)
    _, _, mid = unroll_meta_gradient(lstm, task.loss, first, 3, method=method)
    _, grads, end = unroll_meta_gradient(lstm, task.loss, mid, 3, method=method)
    # carried: two unrolls of 3 = six plain steps
    theta, h, c = first.params, first.h, first.c
    with torch.no_grad():
        for _ in range(6):
            theta, h, c = lstm.step(torch.func.grad(task.loss)(theta), theta, h, c)
    assert_all_close([end.params, end.h, end.c], [theta, h, c])
    # detached: nothing leads back into an earlier unroll ...
    for t in (mid.params, mid.grad, mid.h, mid.c, end.params, end.h, end.c):
        assert t.grad_fn is None and not t.requires_grad
    # ... so the second unroll's meta-gradient is that of a fresh start from the same state
    fresh = UnrollState(*(t.clone() for t in (mid.params, mid.grad, mid.loss, mid.h, mid.c)))
    _, grads_fresh, _ = unroll_meta_gradient(lstm, task.loss, fresh, 3, method="autograd")
    assert_all_close(grads, grads_fresh)
    # and it differs from the gradient of a single unroll of 6 (the truncation is real)
    _, grads_six, _ = unroll_meta_gradient(lstm, task.loss, first, 6, method="autograd")
    _, grads_three, _ = unroll_meta_gradient(lstm, task.loss, first, 3, method="autograd")
    summed = [a + b for a, b in zip(grads_three, grads)]
    assert not all(torch.allclose(a, b) for a, b in zip(summed, grads_six))


def quadratic_task(index, dim=20):
    """f(θ) = ‖Wθ − b‖² / dim with W, b (and θ₀ = 0) drawn from the task's seed."""
    g = torch.Generator().manual_seed(index)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    return Task(torch.zeros(dim, dtype=torch.float64), lambda th: ((w @ th - b) ** 2).sum() / dim)


def test_meta_train_schedule_and_history():
    made = []

    def make_task(i):
        made.append(i)
        return quadratic_task(i)

    lstm = CoordinateLSTM().double()
    before = [p.detach().clone() for p in lstm.parameters()]
    history = meta_train(lstm, make_task, unroll=5, steps_per_task=10, meta_steps=5,
                         progress=False)
    assert made == [0, 1, 2]
    assert [h["task"] for h in history] == [0, 0, 1, 1, 2]
    assert [h["step"] for h in history] == [5, 10, 5, 10, 5]
    assert all(h["skipped"] == 0 and math.isfinite(h["meta_loss"]) for h in history)
    assert all(not torch.equal(a, b) for a, b in zip(before, lstm.parameters()))
    with pytest.raises(ValueError, match="multiple of unroll"):
        meta_train(lstm, make_task, unroll=4, steps_per_task=10, meta_steps=1)


def mean_final_loss(lstm, tasks, steps=20):
    total = 0.0
    for task in tasks:
        state = start_unroll(lstm, task)
        _, _, state = unroll_meta_gradient(lstm, task.loss, state, steps)
        total += float(state.loss)
    return total / len(tasks)


def test_meta_training_improves_the_optimizer_on_held_out_tasks():
    torch.manual_seed(0)
    lstm = CoordinateLSTM().double()
    held_out = [quadratic_task(1000 + i) for i in range(4)]
    before = mean_final_loss(lstm, held_out)
    meta_train(lstm, quadratic_task, unroll=10, steps_per_task=20, meta_steps=60, lr=1e-2,
               progress=False)
    after = mean_final_loss(lstm, held_out)
    assert after < 0.5 * before


# ---- L2T-DLN --------------------------------------------------------------------------

def tiny_l2t(seed=0, dtype=torch.float64, **kwargs):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(40, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(5)
    student = torch.nn.Linear(6, 3).to(dtype)
    settings = dict(unroll=3, batch_size=8, val_batch_size=8, iterations=3, seed=seed,
                    progress=False)
    settings.update(kwargs)
    return L2TDLNTrainer(student, DictDataset(input=x[:24], label=y[:24]),
                         DictDataset(input=x[24:], label=y[24:]), **settings)


def test_hypergradient_matches_finite_differences():
    trainer = tiny_l2t()
    batches = [next(trainer.train_batches) for _ in range(trainer.unroll)]
    val = next(trainer.val_batches)
    start = trainer.student_weights()
    phi = trainer.phi
    grad = trainer.hypergradient(phi, start, batches, val)

    def val_loss(p):
        with torch.enable_grad():
            return float(trainer.unrolled_validation_loss(p, start, batches, val)[0].detach())

    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(3):
        v = torch.randn(phi.shape, generator=g, dtype=phi.dtype)
        fd = (val_loss(phi + eps * v) - val_loss(phi - eps * v)) / (2 * eps)
        assert math.isclose(float(grad @ v), fd, rel_tol=1e-6, abs_tol=1e-10)
    assert grad.abs().max() > 1e-6


def test_one_iteration_moves_phi_by_exactly_the_teachers_update():
    trainer, twin = tiny_l2t(), tiny_l2t()
    phi0, h0, c0 = trainer.phi.clone(), trainer.h.clone(), trainer.c.clone()
    teacher0 = [p.detach().clone() for p in trainer.teacher.parameters()]
    # the same seed gives the twin the same batches, student and DLN
    batches = [next(twin.train_batches) for _ in range(twin.unroll)]
    hyper = twin.hypergradient(twin.phi, twin.student_weights(), batches, next(twin.val_batches))
    n = len(trainer.teacher.w_ih)
    phi1, h1, c1 = coordinate_lstm_step_ref(hyper, phi0, h0, c0, teacher0[:n], teacher0[n:2 * n],
                                            teacher0[2 * n:], preprocess_p=10.0,
                                            output_scale=-1e-3)
    trainer.train_iteration()
    torch.testing.assert_close(trainer.phi, phi1, **F64)
    torch.testing.assert_close(trainer.h, h1, **F64)
    torch.testing.assert_close(trainer.c, c1, **F64)
    torch.testing.assert_close(trainer.dln.flat_weights(), phi1, **F64)
    assert 0 < float((trainer.phi - phi0).abs().max()) <= 1e-3
    # stage 3 trained the teacher: every w_ih and bias moved; w_hh met h = 0, a zero gradient
    moved = [not torch.equal(a, b) for a, b in zip(teacher0, trainer.teacher.parameters())]
    assert moved == [True] * n + [False] * n + [True] * n
    assert trainer.phi.grad_fn is None and trainer.h.grad_fn is None


def test_the_kept_student_is_the_second_unroll_under_the_new_phi():
    trainer, twin = tiny_l2t(), tiny_l2t()
    batches = [next(twin.train_batches) for _ in range(twin.unroll)]
    val = next(twin.val_batches)
    start = twin.student_weights()
    trainer.train_iteration()
    with torch.enable_grad():
        _, w, _ = twin.unrolled_validation_loss(trainer.phi, start, batches, val)
    assert_all_close(list(trainer.student.parameters()), list(w.values()))


def test_l2t_is_deterministic_for_a_seed():
    runs = [tiny_l2t(seed=s, dtype=torch.float32) for s in (3, 3, 4)]
    histories = [r.fit() for r in runs]
    assert histories[0] == histories[1]
    assert torch.equal(runs[0].phi, runs[1].phi)
    assert histories[0] != histories[2]
    assert {"dln_loss", "train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(
        histories[0][0])


def test_l2t_resume_continues_exactly(tmp_path):
    whole = tiny_l2t(iterations=4)
    whole.fit()
    half = tiny_l2t(iterations=4)
    half.fit(stop_iteration=2, checkpoint_path=tmp_path / "run.pt")
    # Another seed: another default DLN, teacher and batch order, all replaced by the resume.
    from_file = tiny_l2t(iterations=4, seed=9)
    from_file.resume(tmp_path / "run.pt")
    assert from_file.iteration == 2
    from_file.fit()
    assert from_file.history == whole.history
    assert torch.equal(from_file.phi, whole.phi)
    state = half.state_dict()
    resumed = tiny_l2t(iterations=4)
    resumed.load_state_dict(state)
    resumed.fit()
    assert resumed.history == whole.history
    assert torch.equal(resumed.phi, whole.phi)


@pytest.fixture(scope="module")
def l2t_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("l2t") / "run.pt"
    tiny_l2t(seed=1, iterations=2).fit(checkpoint_path=path)
    return path


def l2t_with_state():
    """The trainer a resume is tried on, one iteration of two in."""
    trainer = tiny_l2t(iterations=2)
    trainer.fit(stop_iteration=1)
    return trainer


# The protocol's checks are Checkpointed's, tested on every damage in test_trainer.py; here
# one damage of each stage: reading, the generic checks, the models, loading (undone).
@pytest.mark.parametrize("damage", ["truncated", "other_trainer", "past_the_end",
                                    "student_other_shape", "student_other_dtype", "corrupt_rng"])
def test_l2t_failed_resume_leaves_the_trainer_as_it_was(l2t_checkpoint, tmp_path, damage):
    trainer = l2t_with_state()
    path = tmp_path / "damaged.pt"
    assert_resume_fails_cleanly(trainer, path,
                                damage_checkpoint(l2t_checkpoint, path, damage, "iteration"))
    # It goes on exactly as a trainer that never saw the failed resume.
    twin = l2t_with_state()
    trainer.fit()
    twin.fit()
    assert trainer.history == twin.history and torch.equal(trainer.phi, twin.phi)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(phi=s["phi"][:10]), r"phi is \(10,\) torch.float64"),
    (lambda s: s["teacher"].update({k: v[:1] for k, v in list(s["teacher"].items())[:1]}),
     "checkpoint's teacher '.*' is "),
    (lambda s: s["teacher_optimizer"]["param_groups"][0].update(momentum=0.9),
     r"settings \['momentum'\] that this teacher_optimizer \(Adam\) does not"),
    (lambda s: s.update(train_batches=(s["train_batches"][0], [torch.arange(8) + 100])),
     "train_batches order holds .* not batches of 8 of this data's 24 rows"),
    (lambda s: s.update(val_batches=(torch.zeros(3, dtype=torch.uint8), [])),
     r"val_batches generator state is \(3,\) torch.uint8"),
], ids=["phi", "teacher", "teacher-optimizer", "batch-order", "generator"])
def test_l2t_resume_checks_its_own_state(l2t_checkpoint, tmp_path, edit, match):
    state = torch.load(l2t_checkpoint, weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    assert_resume_fails_cleanly(l2t_with_state(), tmp_path / "edited.pt", match)


def test_l2t_does_not_resume_another_trainers_checkpoint(tmp_path):
    x = torch.randn(16, 6, dtype=torch.float64)
    kd = KDTrainer(torch.nn.Linear(6, 3).double(),
                   DictDataset(input=x, label=torch.randint(0, 3, (16,))), epochs=1,
                   progress=False)
    kd.fit(checkpoint_path=tmp_path / "kd.pt")
    assert_resume_fails_cleanly(l2t_with_state(), tmp_path / "kd.pt",
                                "of a KDTrainer, not of a L2TDLNTrainer")


def test_l2t_rejects_data_without_inputs_or_labels():
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    student = torch.nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match="val_data items have no 'label'"):
        L2TDLNTrainer(student, DictDataset(input=x, label=y), DictDataset(input=x))
    with pytest.raises(ValueError, match="train_data items have no 'input'"):
        L2TDLNTrainer(student, DictDataset(x=x, label=y), DictDataset(input=x, label=y))
    with pytest.raises(ValueError, match="eval_data must not be empty"):
        L2TDLNTrainer(student, DictDataset(input=x, label=y), DictDataset(input=x, label=y),
                      eval_data=DictDataset(input=x[:0], label=y[:0]))


# ---- the experiment --------------------------------------------------------------------

def test_experiment_l2t_quick_writes_tables_and_plots(tmp_path, capsys):
    assert main(["experiment", "l2t", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = (tmp_path / "results.md").read_text()
    for row in ("| cross entropy |", "| fixed DLN |", "| L2T-DLN |", "| learned (L2L), meta-seed 1 |",
                "| SGD (lr ", "| Adam (lr "):
        assert row in results
    for png in ("students.png", "optimizer.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "L2T-DLN" in capsys.readouterr().out
