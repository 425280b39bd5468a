"""KDTrainer on digits: it learns, resumes bit-exactly, reduces to plain CE, rejects bad configs
and data; for every trainer on the runtime (KD, SLaM, weighted, LM) a failed resume (a damaged
checkpoint, another run's or another trainer's) leaves it exactly as it was."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from conftest import DEVICES
from resume_checks import (DAMAGES, assert_resume_fails_cleanly, assert_same,
                           damage_checkpoint, double_first_tensor, full_state)
from distillkit.data import DictDataset, load_digits_splits, mlp
from distillkit.data.models import PAD, ByteTransformer, byte_sequences
from distillkit.trainers import (KDConfig, KDTrainer, LMDistillationTrainer, SLaMTrainer,
                                 WeightedDistillationTrainer)
from distillkit.trainers import runtime

# A student that learns nothing scores ~0.1; the teacher scores ~0.97.
LEARNED_ACCURACY = 0.9
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits(seed=0)


@pytest.fixture(scope="module")
def teacher(splits):
    torch.manual_seed(0)
    model = mlp(splits.num_features, [128], splits.num_classes)
    KDTrainer(model, splits.train, epochs=15, progress=False).fit()
    return model


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def student(splits, dropout=0.0, seed=1):
    torch.manual_seed(seed)
    return mlp(splits.num_features, [32], splits.num_classes, dropout=dropout)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))


def test_digits_splits_are_deterministic_and_standardized():
    a, b = load_digits_splits(seed=3), load_digits_splits(seed=3)
    assert torch.equal(a.train.tensors["input"], b.train.tensors["input"])
    other = load_digits_splits(seed=4)
    assert not torch.equal(a.test.tensors["label"], other.test.tensors["label"])
    assert (len(a.train), len(a.val), len(a.test)) == (1077, 270, 450)
    x = a.train.tensors["input"]
    assert x.mean(0).abs().max() < 1e-5
    # Pixels constant in training (the corners) are only centred.
    assert set(x.std(0, unbiased=False).round(decimals=4).tolist()) <= {0.0, 1.0}


def test_teacher_learns(splits, teacher):
    trainer = KDTrainer(teacher, splits.train, epochs=1, progress=False)
    assert trainer.evaluate(splits.test)["accuracy"] > 0.95


@pytest.mark.parametrize(
    "config",
    [
        KDConfig(temperature=4.0),
        KDConfig(temperature=2.0, divergence="reverse_kl"),
        KDConfig(temperature=2.0, divergence="jsd", beta=0.5),
        KDConfig(temperature=1.0, scale_by_t2=False),
    ],
    ids=["forward_kl-T4", "reverse_kl-T2", "jsd-T2", "forward_kl-T1-unscaled"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_student_learns_from_teacher_alone(splits, teacher, config, device):
    # No labels in the training data: everything the student knows comes through
    # kd_loss, so a loss with a wrong sign, a lost gradient or a mixed-up
    # teacher/student order stays near chance.
    unlabeled = DictDataset(input=splits.train.tensors["input"])
    trainer = KDTrainer(student(splits), unlabeled, teacher=teacher, loss=config,
                        eval_data=splits.val, optimizer=sgd(), epochs=8, device=device,
                        progress=False)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert trainer.evaluate(splits.test)["accuracy"] > LEARNED_ACCURACY
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def manual_ce_run(model, data, epochs, batch_size, seed, optimizer):
    """The loop KDTrainer documents for teacher=None, written out by hand."""
    x, y = data.tensors["input"], data.tensors["label"]
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + epoch))
        for rows in order.split(batch_size):
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def test_no_teacher_is_plain_cross_entropy_training(splits):
    trained, manual = student(splits), student(splits)
    KDTrainer(trained, splits.train, optimizer=sgd(), epochs=3, batch_size=50, seed=7,
              progress=False).fit()
    manual_ce_run(manual, splits.train, 3, 50, 7, sgd()(manual.parameters()))
    assert_params_equal(trained, manual)


def test_hard_weight_one_is_cross_entropy(splits, teacher):
    # kd_loss's hard term at hard_weight=1 is the same cross entropy, to rounding.
    kd, ce = student(splits), student(splits)
    KDTrainer(kd, splits.train, teacher=teacher, loss=KDConfig(hard_weight=1.0),
              optimizer=sgd(), epochs=2, progress=False).fit()
    KDTrainer(ce, splits.train, optimizer=sgd(), epochs=2, progress=False).fit()
    for a, b in zip(params(kd), params(ce)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_per_example_weights_reach_the_loss(splits, teacher):
    n = len(splits.train)
    ones = splits.train.with_tensors(weight=torch.ones(n))
    zeros = splits.train.with_tensors(weight=torch.zeros(n))
    plain, weighted, frozen = student(splits), student(splits), student(splits)
    start = params(frozen)
    for model, data in [(plain, splits.train), (weighted, ones), (frozen, zeros)]:
        KDTrainer(model, data, teacher=teacher, loss=KDConfig(temperature=2.0),
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.1), epochs=1, progress=False).fit()
    assert_params_equal(plain, weighted)
    assert all(torch.equal(a, b) for a, b in zip(start, params(frozen)))


def kd_trainer(splits, teacher, model, device, seed=5):
    # Dropout makes the run consume the device's RNG, so resuming must restore it.
    return KDTrainer(model, splits.train, teacher=teacher,
                     loss=KDConfig(temperature=3.0, hard_weight=0.3), eval_data=splits.val,
                     optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
                     epochs=4, batch_size=64, device=device, seed=seed, progress=False)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_equals_uninterrupted_run(splits, teacher, tmp_path, device):
    path = tmp_path / "run.pt"
    whole = kd_trainer(splits, teacher, student(splits, dropout=0.3), device)
    whole.fit()

    first = kd_trainer(splits, teacher, student(splits, dropout=0.3), device)
    first.fit(stop_epoch=2, checkpoint_path=path)
    after_save = (torch.rand(3), np.random.random(), random.random())

    # Scramble everything a fresh process would have differently.
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    second = kd_trainer(splits, teacher, student(splits, dropout=0.3, seed=2), device, seed=11)
    second.resume(path)
    assert torch.equal(torch.rand(3), after_save[0])
    assert (np.random.random(), random.random()) == after_save[1:]
    second.resume(path)  # again: the draws above moved the RNGs on
    assert second.epoch == 2 and second.history == first.history
    second.fit()

    assert second.history == whole.history
    assert_params_equal(second.student, whole.student)
    assert all(
        torch.equal(a, b)
        for s, w in zip(second.optimizer.state.values(), whole.optimizer.state.values())
        for a, b in zip(s.values(), w.values())
    )


def test_resume_rejects_checkpoint_past_epochs(splits, tmp_path):
    path = tmp_path / "run.pt"
    trainer = KDTrainer(student(splits), splits.train, epochs=2, progress=False)
    trainer.fit(checkpoint_path=path)
    shorter = KDTrainer(student(splits), splits.train, epochs=1, progress=False)
    with pytest.raises(ValueError, match="past epochs=1"):
        shorter.resume(path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s, t: dict(epochs=0), "epochs must be >= 1"),
        (lambda s, t: dict(batch_size=0), "batch_size must be >= 1"),
        (lambda s, t: dict(train_data=Subset(s.train, [])), "train_data must not be empty"),
        (lambda s, t: dict(loss=KDConfig(temperature=2.0)), "needs a teacher"),
        (lambda s, t: dict(optimizer=torch.optim.SGD(t.parameters(), lr=0.1)),
         "optimizer must be built over exactly student.parameters"),
        (lambda s, t: dict(train_data=DictDataset(input=s.train.tensors["input"])),
         r"train_data items have no 'label' \(they have 'input'"),
        (lambda s, t: dict(train_data=DictDataset(input=s.train.tensors["input"]), teacher=t,
                           loss=KDConfig(hard_weight=0.5)), "train_data items have no 'label'"),
        (lambda s, t: dict(train_data=DictDataset(x=s.train.tensors["input"]), teacher=t),
         "train_data items have no 'input'"),
        (lambda s, t: dict(eval_data=DictDataset(input=s.val.tensors["input"])),
         "eval_data items have no 'label'"),
        (lambda s, t: dict(train_data=torch.utils.data.TensorDataset(
            s.train.tensors["input"], s.train.tensors["label"])),
         "train_data items must be dicts of tensors"),
    ],
    ids=["epochs", "batch_size", "empty-data", "loss-without-teacher", "foreign-optimizer",
         "no-label-for-ce", "no-label-for-hard-term", "no-input", "eval-without-label",
         "tuple-items"],
)
def test_bad_trainer_config_raises(splits, teacher, make, match):
    kwargs = dict(train_data=splits.train, progress=False)
    kwargs.update(make(splits, teacher))
    with pytest.raises(ValueError, match=match):
        KDTrainer(student(splits), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(divergence="kl"), "divergence"),
        (dict(beta=1.5), "beta"),
        (dict(hard_weight=-0.1), "hard_weight"),
    ],
)
def test_bad_loss_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDConfig(**kwargs)


def test_bad_fit_arguments_raise(splits):
    trainer = KDTrainer(student(splits), splits.train, epochs=2, progress=False)
    with pytest.raises(ValueError, match="stop_epoch must be in"):
        trainer.fit(stop_epoch=3)
    weighted = splits.train.with_tensors(weight=torch.ones(len(splits.train)))
    with pytest.raises(ValueError, match="'weight' needs a teacher"):
        KDTrainer(student(splits), weighted, progress=False).fit()


def test_dict_dataset_rejects_ragged_tensors():
    with pytest.raises(ValueError, match="equal first dimensions"):
        DictDataset(input=torch.zeros(3, 2), label=torch.zeros(4))


# ---- a failed resume leaves the trainer exactly as it was ------------------------------

def small_kd(splits, hidden=32, seed=1, optimizer=None):
    """A KD run on 128 digits with a dropout student (so it draws on the RNG)."""
    torch.manual_seed(0)
    teacher = mlp(splits.num_features, [16], splits.num_classes)
    model = mlp(splits.num_features, [hidden], splits.num_classes, dropout=0.2)
    x, y = splits.train.tensors["input"][:128], splits.train.tensors["label"][:128]
    return KDTrainer(model, DictDataset(input=x, label=y), teacher=teacher,
                     optimizer=optimizer or (lambda p: torch.optim.Adam(p, lr=1e-3)),
                     epochs=3, batch_size=32, seed=seed, progress=False)


def trained_kd(splits):
    """The trainer a resume is tried on, with state of its own (two epochs trained)."""
    trainer = small_kd(splits)
    trainer.fit(stop_epoch=2)
    return trainer


@pytest.fixture(scope="module")
def kd_checkpoint(splits, tmp_path_factory):
    path = tmp_path_factory.mktemp("kd") / "run.pt"
    small_kd(splits, seed=3).fit(stop_epoch=1, checkpoint_path=path)
    return path


def assert_continues_like_an_untouched_twin(trainer, splits):
    """What a failed resume left behind trains on exactly as a trainer that never saw it."""
    trainer.fit()
    twin = trained_kd(splits)
    twin.fit()
    assert trainer.history == twin.history
    assert_params_equal(trainer.student, twin.student)


@pytest.mark.parametrize("damage", DAMAGES)
def test_failed_resume_leaves_the_trainer_as_it_was(splits, kd_checkpoint, tmp_path, damage):
    trainer = trained_kd(splits)
    path = tmp_path / "damaged.pt"
    assert_resume_fails_cleanly(trainer, path,
                                damage_checkpoint(kd_checkpoint, path, damage, "epoch"))
    assert_continues_like_an_untouched_twin(trainer, splits)


@pytest.mark.parametrize("other, match", [
    (lambda splits: small_kd(splits, hidden=16), r"student '0\.weight' is \(16, 64\)"),
    (lambda splits: small_kd(splits, optimizer=sgd()), "another optimizer"),
    (lambda splits: weighted_run(splits), "of a WeightedDistillationTrainer, not of a KDTrainer"),
], ids=["another-architecture", "another-optimizer", "another-trainer"])
def test_resume_from_another_run_is_refused(splits, tmp_path, other, match):
    path = tmp_path / "other.pt"
    other(splits).fit(stop_epoch=1, checkpoint_path=path)
    trainer = trained_kd(splits)
    assert_resume_fails_cleanly(trainer, path, match)
    assert_continues_like_an_untouched_twin(trainer, splits)


def weighted_run(splits):
    """Weighted distillation with the same student, teacher and optimizer as small_kd."""
    kd = small_kd(splits)
    return WeightedDistillationTrainer(kd.student, kd.train_data, teacher=kd.teacher,
                                       val_data=Subset(splits.val, range(64)), epochs=3,
                                       first_epochs=1, batch_size=32, progress=False)


def test_resume_from_a_missing_file_names_it(splits, tmp_path):
    trainer = trained_kd(splits)
    assert_resume_fails_cleanly(trainer, tmp_path / "nothing.pt", "No such file",
                                error=FileNotFoundError)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(weights=s["weights"][:10]), r"weights is \(10,\) torch.float32, this "
                                                     r"run's is \(128,\) torch.float32"),
    (lambda s: s.update(initial_state=None), "has no initial state"),
    (lambda s: double_first_tensor(s["initial_state"]["student"]),
     r"initial student '0\.weight' is \(64, 64\)"),
], ids=["weights", "no-initial-state", "initial-student"])
def test_weighted_failed_resume_leaves_the_trainer_as_it_was(splits, tmp_path, edit, match):
    path = tmp_path / "run.pt"
    weighted_run(splits).fit(stop_epoch=2, checkpoint_path=path)
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    trainer = weighted_run(splits)
    trainer.fit(stop_epoch=1)
    assert_resume_fails_cleanly(trainer, path, match)


def test_kd_checkpoint_does_not_resume_weighted_distillation(splits, kd_checkpoint):
    assert_resume_fails_cleanly(weighted_run(splits), kd_checkpoint,
                                "of a KDTrainer, not of a WeightedDistillationTrainer")


@pytest.mark.parametrize("where, match", [
    (lambda tmp: tmp / "missing" / "run.pt", "does not exist"),
    (lambda tmp: tmp, "is a directory"),
], ids=["no-directory", "a-directory"])
def test_unsavable_checkpoint_path_fails_before_training(splits, tmp_path, where, match):
    trainer = small_kd(splits)
    before = params(trainer.student)
    with pytest.raises(ValueError, match=match):
        trainer.fit(checkpoint_path=str(where(tmp_path)))
    assert trainer.epoch == 0 and all(torch.equal(a, b) for a, b in
                                      zip(before, params(trainer.student)))


def test_checkpoint_of_an_older_torch_without_a_newer_setting_resumes(splits, kd_checkpoint,
                                                                      tmp_path):
    # An optimizer setting added by a later torch is missing from older files; the
    # optimizer's load_state_dict gives it its default.
    state = torch.load(kd_checkpoint, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.pop("decoupled_weight_decay", None)
        group.pop("amsgrad")
    torch.save(state, tmp_path / "old.pt")
    trainer = trained_kd(splits)
    trainer.resume(str(tmp_path / "old.pt"))
    assert trainer.epoch == 1 and trainer.optimizer.param_groups[0]["amsgrad"] is False


def test_interrupted_resume_is_undone(splits, kd_checkpoint, monkeypatch):
    real, calls = runtime.set_rng_state, []

    def interrupted_once(state, device):
        calls.append(1)
        if len(calls) == 1:  # Ctrl-C after the models are loaded; the undo then succeeds
            raise KeyboardInterrupt
        real(state, device)

    monkeypatch.setattr(runtime, "set_rng_state", interrupted_once)
    trainer = trained_kd(splits)
    before = full_state(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.resume(str(kd_checkpoint))
    assert_same(full_state(trainer), before)


def slam_run(splits):
    """SLaM with the same student, teacher and optimizer as small_kd."""
    kd = small_kd(splits)
    return SLaMTrainer(kd.student, kd.train_data, teacher=kd.teacher,
                       val_data=Subset(splits.val, range(64)), epochs=3, batch_size=32,
                       progress=False)


# small_kd's teacher is untrained: SLaM's estimator rightly warns that it is mostly wrong.
@pytest.mark.filterwarnings("ignore:.*below the flip point")
def test_kd_and_slam_checkpoints_do_not_cross(splits, kd_checkpoint, tmp_path):
    # The same student, optimizer and entries: only the trainer class tells them apart.
    assert_resume_fails_cleanly(slam_run(splits), kd_checkpoint,
                                "of a KDTrainer, not of a SLaMTrainer")
    slam_run(splits).fit(stop_epoch=1, checkpoint_path=tmp_path / "slam.pt")
    assert_resume_fails_cleanly(trained_kd(splits), tmp_path / "slam.pt",
                                "of a SLaMTrainer, not of a KDTrainer")


# ---- the LM trainer (steps, a scheduler, a metrics window) on the same protocol ---------

def small_lm(seed=3, batch_size=4):
    texts = ["".join("abcdefgh "[(i * 7 + j * 3) % 9] for j in range(3 + i % 9))
             for i in range(24)]
    torch.manual_seed(1)
    student = ByteTransformer(dim=16, layers=1, heads=2, max_len=16, dropout=0.2)
    torch.manual_seed(0)
    teacher = ByteTransformer(dim=16, layers=1, heads=2, max_len=16)
    return LMDistillationTrainer(
        student, DictDataset(tokens=byte_sequences(texts, 16)), teacher=teacher,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        steps=4, batch_size=batch_size, eval_every=1, seed=seed, pad_id=PAD, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "other_trainer", "student_other_shape",
                                    "corrupt_rng"])
def test_lm_failed_resume_leaves_the_trainer_as_it_was(tmp_path, damage):
    small_lm(seed=5).fit(stop_step=2, checkpoint_path=tmp_path / "run.pt")
    trainer = small_lm()
    trainer.fit(stop_step=1)
    path = tmp_path / "damaged.pt"
    assert_resume_fails_cleanly(trainer, path,
                                damage_checkpoint(tmp_path / "run.pt", path, damage, "step"))
    assert trainer.scheduler.get_last_lr() == [3e-3 * 0.5]


def test_lm_resume_with_another_global_batch_is_refused(tmp_path):
    small_lm().fit(stop_step=1, checkpoint_path=tmp_path / "run.pt")
    assert_resume_fails_cleanly(small_lm(batch_size=8), tmp_path / "run.pt", "global batch")
