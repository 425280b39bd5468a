"""KD-Zero: transforms, Distiller genotypes, loss rejection, search determinism and resume, CLI."""
import copy
import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from distillkit.__main__ import main
from distillkit.data import DictDataset, load_digits_splits, mlp
from distillkit.kdzero import (DISTANCES, TRANSFORMS, WEIGHTS, Distiller, Evaluation,
                               ProxyTask, SearchSpace, Transform, search, transforms)
from distillkit.reference import distance_ref
from distillkit.trainers import KDTrainer

N, C = 5, 6
SHAPES = {2: (N, C), 3: (N, C, 7), 4: (N, C, 4, 4)}
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny MLPs: intra-op threads only add synchronisation, and the search's
    # determinism is promised for a fixed thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- transforms --------------------------------------------------------------

def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)


def _sums_to(dim, total):
    def check(x, y):
        sums = y.sum(dim)
        _close(sums, torch.full_like(sums, total))
    return check


def _unit_norm(dim):
    def check(x, y):
        norms = y.flatten(2).norm(dim=2) if dim == "hw" else y.norm(dim=dim)
        _close(norms, torch.ones_like(norms))
    return check


def _equals(fn):
    return lambda x, y: _close(y, fn(x))


def _multiscale(x, y):
    _close(y[:, :, 0], x.amax((2, 3)))
    _close(y[:, :, 1:5], F.max_pool2d(x, 2, 2).flatten(2))
    _close(y[:, :, 5:], x.flatten(2))  # r = 4 on a 4×4 map is the map itself


def _minmax(x, y):
    _close(y.flatten(1).amin(1), torch.zeros(N))
    _close(y.flatten(1).amax(1), torch.ones(N))


def _batchnorm(x, y):
    dims = (0,) + tuple(range(2, y.dim()))
    _close(y.mean(dims), torch.zeros(C))
    v = x.var(dims, unbiased=False)
    _close(y.var(dims, unbiased=False), v / (v + 1e-5))  # 1 but for BatchNorm's ε


def _gram_batch(x, y):
    f = x.flatten(1)
    _close(y, f @ f.T / f.shape[1])


def _gram_channel(x, y):
    _close(y, y.transpose(1, 2))
    _close(y[0], x[0].flatten(1) @ x[0].flatten(1).T / x[0].flatten(1).shape[1])


def _mask(x, y):
    assert bool(((y == x) | (y == 0)).all())
    assert 0 < int((y == 0).sum()) < y.numel()


# name -> (output shape from the input shape, behaviour check(x, y)).
SAME = lambda s: s  # noqa: E731
BEHAVIOUR = {
    "softmax_t1": (SAME, _equals(lambda x: torch.softmax(x, 1))),
    "softmax_t4": (SAME, _equals(lambda x: torch.softmax(x / 4, 1))),
    "log_softmax_t1": (SAME, lambda x, y: _sums_to(1, 1.0)(x, y.exp())),
    "log_softmax_t4": (SAME, _equals(lambda x: torch.log_softmax(x / 4, 1))),
    "batch_softmax": (SAME, _sums_to(0, 1.0)),
    "l2norm_c": (SAME, _unit_norm(1)),
    "l2norm_n": (SAME, _unit_norm(0)),
    "l2norm_hw": (SAME, _unit_norm("hw")),
    "channel_attention": (lambda s: s[:2], _sums_to(1, C)),
    "spatial_attention": (lambda s: (s[0], torch.Size(s[2:]).numel()),
                          lambda x, y: _sums_to(1, y.shape[1])(x, y)),
    "multiscale_pool": (lambda s: (s[0], s[1], 21), _multiscale),
    "minmax": (SAME, _minmax),
    "batchnorm": (SAME, _batchnorm),
    "gram_batch": (lambda s: (s[0], s[0]), _gram_batch),
    "gram_channel": (lambda s: (s[0], s[1], s[1]), _gram_channel),
    "mask": (SAME, _mask),
    "abs": (SAME, _equals(torch.abs)),
    "pow2": (SAME, _equals(lambda x: x * x)),
    "sigmoid": (SAME, _equals(torch.sigmoid)),
    "tanh": (SAME, _equals(torch.tanh)),
    "exp": (SAME, _equals(torch.exp)),
    "log": (SAME, lambda x, y: _close(y[x > 0], x[x > 0].log())),
}


def test_every_transform_has_a_behaviour_check():
    assert set(BEHAVIOUR) == set(TRANSFORMS)


@pytest.mark.parametrize("name,rank", [(n, r) for n, t in TRANSFORMS.items()
                                       for r in sorted(t.ranks)])
def test_transform_shape_and_behaviour(name, rank):
    t = TRANSFORMS[name]
    s, u = torch.randn(SHAPES[rank]), torch.randn(SHAPES[rank])
    ys, yu = t(s, u, torch.Generator().manual_seed(0))
    expected_shape, check = BEHAVIOUR[name]
    assert ys.shape == yu.shape == torch.Size(expected_shape(s.shape))
    assert ys.dim() == t.output_rank(rank)
    check(s, ys)


@pytest.mark.parametrize("name,rank", [(n, r) for n, t in TRANSFORMS.items()
                                       for r in (2, 3, 4) if r not in t.ranks])
def test_transform_refuses_other_ranks(name, rank):
    with pytest.raises(ValueError, match=f"transform '{name}' accepts ranks"):
        TRANSFORMS[name](torch.randn(SHAPES[rank]), torch.randn(SHAPES[rank]))


@pytest.mark.parametrize("rank", [2, 4])
def test_random_mask_is_shared_by_student_and_teacher(rank):
    s = 1 + torch.rand(SHAPES[rank])  # nowhere zero, so zeros are the mask
    t = -1 - torch.rand(SHAPES[rank])
    ys, yt = TRANSFORMS["mask"](s, t, torch.Generator().manual_seed(3))
    assert torch.equal(ys == 0, yt == 0)
    again, _ = TRANSFORMS["mask"](s, t, torch.Generator().manual_seed(3))
    assert torch.equal(again, ys)
    with pytest.raises(ValueError, match="equal student and teacher shapes"):
        TRANSFORMS["mask"](s, t[:2])


def test_chain_ranks_are_checked():
    assert transforms.chain_rank(["multiscale_pool", "gram_channel", "softmax_t1"], 4) == 3
    with pytest.raises(ValueError, match="transform 1 of the chain, 'l2norm_hw'"):
        transforms.chain_rank(["channel_attention", "l2norm_hw"], 4)
    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        transforms.chain_rank(["nope"], 2)
    with pytest.raises(ValueError, match="already registered"):
        transforms.register(Transform("abs", torch.abs, transforms.ANY, "|x|"))


# ---- the Distiller genotype ----------------------------------------------------

FORMULAS = [
    (Distiller(), "1 · kl_t4(z_s, z_t)"),
    (Distiller(("softmax_t4", "tanh"), "pearson_intra", 10),
     "10 · pearson_intra(φ(z_s), φ(z_t)), φ = tanh ∘ softmax_t4"),
    (Distiller(("batchnorm",), "l2", 0.5, "feature"), "0.5 · l2(φ(f_s), φ(f_t)), φ = batchnorm"),
]


@pytest.mark.parametrize("distiller,formula", FORMULAS)
def test_distiller_formula_and_json_round_trip(distiller, formula):
    assert distiller.formula() == formula
    text = distiller.to_json()
    assert Distiller.from_json(text) == distiller
    assert Distiller.from_json(text).to_json() == text
    assert json.loads(text)["transforms"] == list(distiller.transforms)


def test_distiller_loss_is_weighted_distance_of_transformed_outputs():
    s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    d = Distiller(("softmax_t4", "tanh"), "pearson_intra", 10)
    expected = 10 * distance_ref(torch.tanh(torch.softmax(s / 4, 1)),
                                 torch.tanh(torch.softmax(t / 4, 1)), "pearson", dim=0)
    loss = d(s, t)
    _close(loss, expected)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    kd = Distiller((), "kl_t4", 2)
    _close(kd(s, t), 2 * distance_ref(s, t, "kl", dim=1, temperature=4.0))


@pytest.mark.parametrize("genes,match", [
    (dict(transforms=("nope",)), "unknown transforms"),
    (dict(distance="l3"), "distance must be one of"),
    (dict(weight=0.0), "weight must be a finite number > 0"),
    (dict(weight=float("inf")), "weight must be a finite number > 0"),
])
def test_distiller_rejects_bad_genes(genes, match):
    with pytest.raises(ValueError, match=match):
        Distiller(**genes)


def test_distiller_checks_the_chain_against_its_input():
    with pytest.raises(ValueError, match="'channel_attention', accepts ranks"):
        Distiller(("channel_attention",))(torch.randn(4, 3), torch.randn(4, 3))


@pytest.mark.parametrize("inputs", [(("logits", 2),), (("logits", 2), ("feature", 4))])
def test_search_operators_stay_in_the_space(inputs):
    space = SearchSpace(inputs=inputs)
    rng = random.Random(0)
    members = [space.random(rng) for _ in range(50)]
    children = [space.mutate(rng.choice(members), rng) for _ in range(200)]
    children += [space.crossover(*rng.sample(members, 2), rng) for _ in range(200)]
    assert all(space.valid(d) for d in members + children)
    assert len({d.to_json() for d in children}) > 100


# ---- loss rejection and the search -------------------------------------------

@pytest.fixture(scope="module")
def task():
    splits = load_digits_splits(seed=0)
    torch.manual_seed(0)
    teacher = mlp(64, [32], 10)
    KDTrainer(teacher, splits.train, epochs=3, progress=False).fit()
    x, y = splits.train.tensors["input"], splits.train.tensors["label"]
    val = DictDataset(input=splits.val.tensors["input"][:100],
                      label=splits.val.tensors["label"][:100])
    return ProxyTask(teacher, lambda: mlp(64, [8], 10), DictDataset(input=x[:64], label=y[:64]),
                     val, epochs=1)


@pytest.mark.parametrize("distiller,max_loss,reason", [
    (Distiller(("log",), "l2"), 1e3, "non-finite loss"),  # ln of negative logits: NaN
    (Distiller(("exp", "exp", "exp"), "l2"), 1e3, "non-finite loss"),  # overflows to inf
    (Distiller((), "l2", 100.0), 1.0, "loss out of range"),
])
def test_proxy_task_rejects_bad_losses_before_training(task, distiller, max_loss, reason):
    bounded = copy.copy(task)
    bounded.max_loss = max_loss
    ev = bounded(distiller)
    assert (ev.status, ev.reason, ev.fitness) == ("rejected", reason, None)
    assert isinstance(ev.metrics["first_loss"], (float, str))


def test_proxy_task_rejects_a_raising_loss(task, monkeypatch):
    def boom(x):
        raise RuntimeError("boom")
    monkeypatch.setitem(TRANSFORMS, "boom", Transform("boom", boom, transforms.ANY, "raises"))
    ev = task(Distiller(("boom",)))
    assert (ev.status, ev.reason) == ("rejected", "raised RuntimeError")
    assert ev.metrics["error"] == "boom"


def test_proxy_task_trains_valid_distillers(task):
    kd, feature = task(Distiller()), task(Distiller(("l2norm_c",), "l2", 1.0, "feature"))
    assert kd.ok and feature.ok and 0 < kd.fitness <= 1 and kd.tiebreak < 0
    assert task(Distiller()) == kd  # deterministic
    assert task(None).ok


def test_proxy_fitness_is_the_mean_over_seeds(task):
    runs = []
    for seeds in ((0,), (1,), (0, 1)):
        proxy = copy.copy(task)
        proxy.seeds = seeds
        runs.append(proxy(Distiller()))
    assert runs[2].metrics["val_accuracies"] == [runs[0].fitness, runs[1].fitness]
    assert runs[2].fitness == pytest.approx((runs[0].fitness + runs[1].fitness) / 2)
    assert runs[2].tiebreak == pytest.approx((runs[0].tiebreak + runs[1].tiebreak) / 2)


def _log_lines(path):
    return [json.loads(line) for line in open(path)]


def test_search_rejects_and_counts_bad_candidates(task, tmp_path):
    space = SearchSpace(transforms=("log", "exp", "abs", "softmax_t1"), max_transforms=2)
    log = tmp_path / "log.jsonl"
    result = search(task, space, population=10, rounds=2, seed=1, log=str(log), progress=False)
    lines = _log_lines(log)
    rejected = [r for r in lines if r["status"] == "rejected"]
    assert rejected and result.counts["rejected"] == len(rejected)
    assert sum(result.reasons.values()) == result.counts["rejected"] + result.counts["diverged"]
    assert result.counts["candidates"] == len(lines)
    synonyms = [r for r in lines if r["synonym_of"] is not None]
    assert result.counts["synonyms"] == len(synonyms)
    assert all(r["status"] == "ok" for r in synonyms)
    members = {d.to_json() for d, _ in result.population}
    assert not members & {Distiller.from_dict(r["distiller"]).to_json() for r in rejected}
    assert len(result.population) == 10 and all(e.ok for _, e in result.population)
    assert [e.fitness for _, e in result.population] == sorted(
        (e.fitness for _, e in result.population), reverse=True)


def _blind_to_chains(d):
    """A fitness that ignores the transforms: distillers differing only there are synonyms."""
    fitness = WEIGHTS.index(d.weight) / len(WEIGHTS) + list(DISTANCES).index(d.distance) / 100
    return Evaluation("ok", fitness=fitness, tiebreak=-fitness * (1 + 1e-9 * len(d.transforms)))


def test_search_keeps_synonyms_out_of_the_population(tmp_path):
    log = tmp_path / "log.jsonl"
    result = search(_blind_to_chains, population=10, rounds=20, seed=0, log=str(log),
                    progress=False)
    genes = [(d.distance, d.weight) for d, _ in result.population]
    assert len(set(genes)) == len(genes) == 10
    assert result.counts["synonyms"] == sum(r["synonym_of"] is not None
                                            for r in _log_lines(log)) > 0
    off = search(_blind_to_chains, population=10, rounds=20, seed=0, synonym_tol=None,
                 progress=False)
    assert off.counts["synonyms"] == 0
    assert len({(d.distance, d.weight) for d, _ in off.population}) < 10


SEARCH = dict(population=10, rounds=3, children=2, progress=False)


def _run(task, tmp_path, name, **kwargs):
    log, ckpt = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
    result = search(task, **{**SEARCH, "seed": 7, **kwargs}, log=str(log), checkpoint=str(ckpt))
    return result, log.read_text()


def test_search_is_deterministic_for_a_seed(task, tmp_path):
    a, log_a = _run(task, tmp_path, "a")
    b, log_b = _run(task, tmp_path, "b")
    assert log_a == log_b and a.history == b.history and a.population == b.population
    assert len(log_a.splitlines()) >= 10 + 3 * 3 - 3
    _, log_c = _run(task, tmp_path, "c", seed=8)
    assert log_c != log_a


class _Interrupt:
    """A fitness function that is interrupted (like Ctrl-C) at its ``at``-th call."""

    def __init__(self, task, at):
        self.task, self.at, self.calls = task, at, 0

    def __call__(self, d):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.task(d)


def test_resumed_search_equals_an_uninterrupted_one(task, tmp_path):
    full, full_log = _run(task, tmp_path, "full")
    # Interrupted mid-round 2 (after round 0's ~10 and round 1's ~3 evaluations).
    with pytest.raises(KeyboardInterrupt):
        _run(_Interrupt(task, at=15), tmp_path, "cut")
    assert json.load(open(tmp_path / "cut.json"))["round"] == 1
    resumed, resumed_log = _run(task, tmp_path, "cut", resume=True)
    assert resumed_log == full_log
    assert resumed.population == full.population and resumed.history == full.history
    assert resumed.counts == full.counts
    # A finished shorter run extended to more rounds is the longer run too.
    _run(task, tmp_path, "short", rounds=1)
    longer, longer_log = _run(task, tmp_path, "short", resume=True)
    assert longer_log == full_log and longer.population == full.population


def test_resume_refuses_other_settings(task, tmp_path):
    _run(task, tmp_path, "x", rounds=0)
    with pytest.raises(ValueError, match=r"other settings: \['children'\]"):
        _run(task, tmp_path, "x", children=3, resume=True)


def test_search_needs_a_population_of_ten(task):
    with pytest.raises(ValueError, match="population must be >= 10"):
        search(task, population=9, rounds=0, progress=False)


# ---- the experiment --------------------------------------------------------------

def test_experiment_kdzero_quick_writes_table_and_plot(tmp_path, capsys):
    assert main(["experiment", "kdzero", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = (tmp_path / "results.md").read_text()
    assert results.startswith("Best distiller: `")
    for row in ("| no distillation (CE) |", "| vanilla KD (T = 4) |", "| best of round 0 ",
                "| searched #1 |"):
        assert row in results
    assert (tmp_path / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = Distiller.from_json((tmp_path / "best_distiller.json").read_text())
    assert best.formula() in results
    assert len(_log_lines(tmp_path / "search.jsonl")) >= 10
    assert "searched #1" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "not_json", "missing_key", "wrong_type"])
def test_resume_names_a_damaged_checkpoint(task, tmp_path, damage):
    _run(task, tmp_path, "d", rounds=0)
    path = tmp_path / "d.json"
    text = path.read_text()
    state = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not_json":
        path.write_bytes(b"\x80\x81 not a checkpoint")
    elif damage == "missing_key":
        del state["population"]
        path.write_text(json.dumps(state))
    else:
        state["rng"] = 7
        path.write_text(json.dumps(state))
    log_before = (tmp_path / "d.jsonl").read_text()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a readable search"):
        _run(task, tmp_path, "d", resume=True)
    # Refused before the log is touched.
    assert (tmp_path / "d.jsonl").read_text() == log_before


def test_checkpoint_is_replaced_whole(task, tmp_path):
    _run(task, tmp_path, "w", rounds=1)
    # Written through a temporary sibling and renamed: nothing else is left in the directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.jsonl"]
    assert json.load(open(tmp_path / "w.json"))["round"] == 1
