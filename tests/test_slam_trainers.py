"""SLaMTrainer and WeightedDistillationTrainer on digits, the weight schedule, resume, DDP, the experiment.

The students train on an unlabeled pool that a teacher trained on 200 labelled
examples (test accuracy about 0.92) has labelled; V is the digits validation split.
A student that learns nothing scores about 0.1.
"""
import os

import pytest
import torch

from conftest import DEVICES, spawn_ranks
from distillkit.__main__ import main
from distillkit.data import DictDataset, WithTensors, load_digits_splits, mlp
from distillkit.losses.functional import slam_loss
from distillkit.ops.reference import kd_loss_ref
from distillkit.methods.slam import SLaMEstimator, flip_point
from distillkit.trainers import KDTrainer, SLaMTrainer, WeightedDistillationTrainer
from distillkit.trainers.pool import predict_logits
from distillkit.methods.weighting import estimate_weights
from test_distributed import WORLD

LABELLED = 200
LEARNED_ACCURACY = 0.8
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits(seed=0)


@pytest.fixture(scope="module")
def pool(splits):
    """The training split after the teacher's labelled examples, without labels."""
    return DictDataset(input=splits.train.tensors["input"][LABELLED:])


@pytest.fixture(scope="module")
def pool_labels(splits):
    return splits.train.tensors["label"][LABELLED:]


@pytest.fixture(scope="module")
def teacher(splits):
    torch.manual_seed(0)
    model = mlp(splits.num_features, [64], splits.num_classes)
    labelled = DictDataset(input=splits.train.tensors["input"][:LABELLED],
                           label=splits.train.tensors["label"][:LABELLED])
    KDTrainer(model, labelled, epochs=40, batch_size=32, progress=False).fit()
    return model


def student(splits, seed=1):
    torch.manual_seed(seed)
    return mlp(splits.num_features, [32], splits.num_classes)


def adam(lr=3e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def teacher_right(teacher, pool, pool_labels):
    # The trainers move the shared teacher to their device; bring it back.
    return predict_logits(teacher.cpu(), pool, "cpu").argmax(1) == pool_labels


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(normalized=True, hard=True,
          estimator=SLaMEstimator(per_bin_k=True, normalized=True)),
     dict(temperature=2.0)],
    ids=["soft", "hard-normalized-binned", "T2"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_slam_student_learns_from_pool(splits, pool, pool_labels, teacher, settings, device):
    trainer = SLaMTrainer(student(splits), pool, teacher=teacher, val_data=splits.val,
                          eval_data=splits.val, optimizer=adam(), epochs=6, device=device,
                          progress=False, **settings)
    history = trainer.fit()
    assert trainer.evaluate(splits.test)["accuracy"] > LEARNED_ACCURACY
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # α and k come from the estimator fitted on V, and α is lower where the teacher is wrong.
    alpha, k = trainer.estimator.transform(trainer.teacher_probs)
    assert torch.equal(trainer.alpha, alpha) and torch.equal(trainer.k, k)
    right = teacher_right(teacher, pool, pool_labels)
    assert trainer.alpha[~right].mean() < trainer.alpha[right].mean() - 0.1
    # The default guard keeps every α above its mix's flip point.
    assert bool((trainer.alpha.double() > flip_point(trainer.k, trainer.normalized)).all())


def test_slam_trainer_minimises_slam_loss(splits, pool, teacher):
    trainer = SLaMTrainer(student(splits), pool, teacher=teacher, val_data=splits.val,
                          temperature=3.0, normalized=True, progress=False)
    batch = next(iter(trainer.loader))
    logits = trainer.student(batch["input"])
    t = torch.softmax(teacher(batch["input"]) / 3.0, 1)
    torch.testing.assert_close(batch["teacher_probs"], t)
    torch.testing.assert_close(trainer.compute_loss(batch),
                               slam_loss(logits, t, batch["alpha"], batch["k"], normalized=True))


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_student_learns_from_pool(splits, pool, pool_labels, teacher, device):
    trainer = WeightedDistillationTrainer(student(splits), pool, teacher=teacher,
                                          val_data=splits.val, eval_data=splits.val,
                                          optimizer=adam(), epochs=10, device=device,
                                          progress=False)
    trainer.fit()
    assert trainer.evaluate(splits.test)["accuracy"] > LEARNED_ACCURACY
    right = teacher_right(teacher, pool, pool_labels)
    assert trainer.weights[~right].mean() < trainer.weights[right].mean() - 0.2


@pytest.mark.parametrize("normalize", ["sum", "batch"])
def test_weighted_loss_normalization(splits, pool, teacher, normalize):
    trainer = WeightedDistillationTrainer(student(splits), pool, teacher=teacher,
                                          val_data=splits.val, epochs=2, normalize=normalize,
                                          progress=False)
    batch = next(iter(trainer.loader))
    g = torch.Generator().manual_seed(0)
    weight = torch.rand(len(batch["weight"]), generator=g) * 0.3
    rows = kd_loss_ref(trainer.student(batch["input"]), batch["teacher_logits"],
                       reduction="none")
    expected = (weight * rows).sum() / (weight.sum() if normalize == "sum" else len(weight))
    torch.testing.assert_close(trainer.compute_loss({**batch, "weight": weight}), expected)
    # A batch weighted 0 throughout contributes 0, not NaN.
    zero = trainer.compute_loss({**batch, "weight": torch.zeros_like(weight)})
    assert zero.item() == 0.0


class RecordingTrainer(WeightedDistillationTrainer):
    """Records, per estimate, the epoch, the weights and what estimate_weights gives independently."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.estimates = []
        self.params_after_start = {}

    def refresh_weights(self):
        with torch.no_grad():
            self.student.eval()
            f = torch.softmax(self.student(self.train_data.base.tensors["input"]), 1)
            f_val = torch.softmax(self.student(self.val_data.tensors["input"]), 1)
        expected = estimate_weights(torch.softmax(self.teacher_logits_pool, 1), f,
                                    self.val_teacher_probs, f_val, self.val_labels)
        self.estimates.append((self.epoch, super().refresh_weights().clone(), expected))
        return self.weights

    def on_epoch_start(self):
        super().on_epoch_start()
        self.params_after_start[self.epoch] = params(self.student)


@pytest.mark.parametrize("retrain", [False, True])
def test_weights_are_estimated_on_schedule(splits, pool, teacher, retrain):
    small_pool = DictDataset(input=pool.tensors["input"][:256])
    initial = params(student(splits))
    trainer = RecordingTrainer(student(splits), small_pool, teacher=teacher, val_data=splits.val,
                               epochs=7, first_epochs=2, refresh_every=2, retrain=retrain,
                               optimizer=adam(), progress=False)
    trainer.fit()
    assert [e for e, _, _ in trainer.estimates] == [2, 4, 6]
    for _, got, expected in trainer.estimates:
        torch.testing.assert_close(got, expected)
    # The weights follow the student, so refreshes change them.
    assert not torch.equal(trainer.estimates[0][1], trainer.estimates[-1][1])
    assert not torch.equal(trainer.estimates[0][1], torch.ones(256))
    # retrain: the weighted student starts again from the initialization.
    reset = all(torch.equal(a, b) for a, b in zip(trainer.params_after_start[2], initial))
    assert reset == retrain


def test_weighted_resume_equals_uninterrupted_run(splits, pool, teacher, tmp_path):
    small_pool = DictDataset(input=pool.tensors["input"][:256])

    def make(seed=1):
        return WeightedDistillationTrainer(student(splits, seed), small_pool, teacher=teacher,
                                           val_data=splits.val, eval_data=splits.val, epochs=4,
                                           first_epochs=2, optimizer=adam(), progress=False)

    whole = make()
    whole.fit()
    path = tmp_path / "weighted.pt"
    make().fit(stop_epoch=1, checkpoint_path=path)
    # A different initialization: the reset at epoch 2 must use the checkpoint's.
    resumed = make(seed=2)
    resumed.resume(path)
    resumed.fit()
    assert resumed.history == whole.history
    assert torch.equal(resumed.weights, whole.weights)
    assert_params_equal(params(resumed.student), params(whole.student))


@pytest.mark.parametrize(
    "cls, make, match",
    [
        (WeightedDistillationTrainer, lambda s: dict(epochs=4, first_epochs=4),
         r"first_epochs must be in \[1"),
        (WeightedDistillationTrainer, lambda s: dict(epochs=1), r"first_epochs must be in \[1"),
        (WeightedDistillationTrainer, lambda s: dict(refresh_every=0),
         "refresh_every must be >= 1"),
        (WeightedDistillationTrainer, lambda s: dict(rule="clip"), "rule must be one of"),
        (WeightedDistillationTrainer, lambda s: dict(normalize="mean"), "normalize must be one of"),
        (WeightedDistillationTrainer, lambda s: dict(distortion="x"), "distortion must be one of"),
        (SLaMTrainer, lambda s: dict(normalized=True, estimator=SLaMEstimator()),
         "estimator.normalized .* must equal normalized"),
        (WeightedDistillationTrainer, lambda s: dict(loss=None), "loss .* does not apply"),
        (SLaMTrainer, lambda s: dict(temperature=0.0), "temperature must be a positive"),
        (SLaMTrainer, lambda s: dict(loss=None), "loss .* does not apply"),
        (SLaMTrainer, lambda s: dict(teacher=None), "teacher must be given"),
        (SLaMTrainer, lambda s: dict(val_data=DictDataset(input=s.val.tensors["input"])),
         "val_data items have no 'label'"),
        (SLaMTrainer, lambda s: dict(val_data=DictDataset(input=s.val.tensors["input"][:0])),
         "val_data must not be empty"),
    ],
    ids=["first_epochs", "one-epoch", "refresh_every", "rule", "normalize", "distortion", "estimator-mix", "weighted-loss", "temperature",
         "slam-loss", "no-teacher", "unlabelled-val", "empty-val"],
)
def test_bad_config_raises(splits, pool, teacher, cls, make, match):
    kwargs = dict(teacher=teacher, val_data=splits.val, progress=False)
    kwargs.update(make(splits))
    with pytest.raises(ValueError, match=match):
        cls(student(splits), pool, **kwargs)


def test_with_tensors_rejects_ragged_or_clashing_tensors(pool):
    with pytest.raises(ValueError, match="must have len"):
        WithTensors(pool, extra=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\['input'\] are already keys"):
        WithTensors(pool, input=torch.zeros(len(pool)))


def test_experiment_quick_writes_table_and_plot(tmp_path):
    out = tmp_path / "unlabeled"
    assert main(["experiment", "unlabeled", "--quick", "--no-progress", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert ("| pool | labelled n | teacher | vanilla KD | weighted (Σw) | weighted (B) | SLaM | "
            "SLaM normalized | SLaM + α guard | hard SLaM |") in table
    assert "| 25 | " in table
    assert (out / "unlabeled.png").read_bytes().startswith(b"\x89PNG")
    assert len((out / "results.csv").read_text().splitlines()) == 2


# ---- DDP: SLaMTrainer with 2 gloo processes equals one process ----------------

GLOBAL_BATCH = 32
DDP_POOL = 640  # 20 global batches, none ragged


def make_slam_trainer(teacher_path, batch_size):
    splits = load_digits_splits(seed=0)
    teacher = mlp(splits.num_features, [64], splits.num_classes)
    teacher.load_state_dict(torch.load(teacher_path))
    pool = DictDataset(input=splits.train.tensors["input"][LABELLED:LABELLED + DDP_POOL])
    return SLaMTrainer(student(splits), pool, teacher=teacher, val_data=splits.val,
                       eval_data=splits.val,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                       epochs=2, batch_size=batch_size, seed=3, progress=False)


def slam_ddp_worker(rank, world, out_dir):
    trainer = make_slam_trainer(os.path.join(out_dir, "teacher.pt"), GLOBAL_BATCH // world)
    trainer.fit()
    torch.save({"params": params(trainer.student), "history": trainer.history},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_slam_ddp_matches_single_process(teacher, tmp_path):
    torch.save(teacher.cpu().state_dict(), tmp_path / "teacher.pt")
    spawn_ranks(slam_ddp_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = make_slam_trainer(tmp_path / "teacher.pt", GLOBAL_BATCH)
    single.fit()

    assert_params_equal(ranks[0]["params"], ranks[1]["params"])
    for a, b in zip(ranks[0]["params"], single.student.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(ranks[0]["history"], single.history):
        assert got["eval_accuracy"] == want["eval_accuracy"]
        assert abs(got["train_loss"] - want["train_loss"]) <= 1e-5 * abs(want["train_loss"])
