"""A failed resume leaves a trainer exactly as it was: damaged checkpoints and the check
that compares a trainer's whole state (state dict and RNG states) before and after."""
import copy

import pytest
import torch

from distillkit.trainers.runtime import rng_state


def full_state(trainer):
    """Everything a resume may change: the trainer's state dict (models, optimizers,
    progress, history, ...) and this process's RNG states, copied."""
    return copy.deepcopy({**trainer.state_dict(), "rng": rng_state(trainer.device)})


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.device == b.device and torch.equal(a, b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_resume_fails_cleanly(trainer, path, match, error=ValueError):
    """``trainer.resume(path)`` raises ``error`` naming ``path`` and matching ``match``,
    and the trainer's whole state is what it was."""
    before = full_state(trainer)
    with pytest.raises(error, match=match) as info:
        trainer.resume(str(path))
    assert str(path) in str(info.value)
    assert_same(full_state(trainer), before)


def _first_tensor_key(module_state):
    return next(k for k, v in module_state.items() if isinstance(v, torch.Tensor))


def double_first_tensor(module_state):
    key = _first_tensor_key(module_state)
    module_state[key] = torch.cat([module_state[key], module_state[key]])


def _drop_first(module_state):
    del module_state[_first_tensor_key(module_state)]


def _other_dtype(module_state):
    key = _first_tensor_key(module_state)
    tensor = module_state[key]
    module_state[key] = tensor.float() if tensor.dtype == torch.float64 else tensor.double()


# name: (kind, damage, what the error must say). Kinds: "bytes" maps the file's bytes;
# "replace" maps the loaded state to what is saved instead; "state" edits the loaded state
# in place, given the trainer's progress key.
DAMAGES = {
    "truncated": ("bytes", lambda b: b[:len(b) // 2], "not a readable checkpoint"),
    "empty": ("bytes", lambda b: b"", "not a readable checkpoint"),
    "garbage": ("bytes", lambda b: bytes(range(256)) * 4, "not a readable checkpoint"),
    "first_byte_changed": ("bytes", lambda b: b"Q" + b[1:], "not a readable checkpoint"),
    "not_a_dict": ("replace", lambda state: [1, 2, 3], "holds a list"),
    "old_version": ("state", lambda s, p: s.update(version=1), "version 1 is not 2"),
    "no_version": ("state", lambda s, p: s.pop("version"), "version None is not 2"),
    "other_trainer": ("state", lambda s, p: s.update(trainer="SomeOtherTrainer"),
                      "of a SomeOtherTrainer, not of a"),
    "missing_entry": ("state", lambda s, p: s.pop("history"), r"missing \['history'\]"),
    "unexpected_entry": ("state", lambda s, p: s.update(extra=1), r"unexpected \['extra'\]"),
    "past_the_end": ("state", lambda s, p: s.update({p: 10**6}), "past"),
    "negative_progress": ("state", lambda s, p: s.update({p: -1}), "not a count"),
    "history_not_a_list": ("state", lambda s, p: s.update(history=3), "history is not a list"),
    "other_world_size": ("state", lambda s, p: s.update(rng=s["rng"] * 2),
                         "written by 2 processes; this run has 1"),
    "student_other_shape": ("state", lambda s, p: double_first_tensor(s["student"]),
                            "checkpoint's student '.*' is "),
    "student_missing_tensor": ("state", lambda s, p: _drop_first(s["student"]),
                               "student does not fit this student"),
    "student_other_dtype": ("state", lambda s, p: _other_dtype(s["student"]),
                            r"checkpoint's student '.*' is \(.*\) torch.float\d\d, this run's is"),
    # Passes every check and fails while loading, after the models are loaded: undone.
    "corrupt_rng": ("state", lambda s, p: s.update(rng=[{"python": "x", "numpy": {},
                                                          "torch": torch.zeros(3)}]),
                    "the trainer is unchanged"),
}


def damage_checkpoint(src, dst, damage, progress_key):
    """Write ``src`` damaged by ``DAMAGES[damage]`` to ``dst``; return what the error must say."""
    kind, fn, match = DAMAGES[damage]
    if kind == "bytes":
        dst.write_bytes(fn(src.read_bytes()))
        return match
    state = torch.load(src, weights_only=True)
    if kind == "replace":
        torch.save(fn(state), dst)
        return match
    fn(state, progress_key)
    torch.save(state, dst)
    return match
