"""Evolutionary search over distillers (KD-Zero, docs/math.md §9.5).

The search keeps a population of evaluated distillers, ranked by fitness. Round 0
fills it with random members (redrawing rejected ones). Every later round makes
``children`` offspring, each from two parents drawn from the top half (crossover
with probability 1/2, then mutation with probability 1/2; an offspring identical to
a member is redrawn), plus one fresh random member; the new members that pass are
ranked with the old ones and the worst are dropped to keep the size. A passing
candidate that trains the student a member trains (a *synonym*: ``cosine`` with and
without ``l2norm_c`` before it, which cosine cannot see; ``50 · l2`` and
``10 · cosine`` of L2-normalized logits) is not added: synonyms would fill the
population with one distiller under many names. A synonym is recognized by its
evaluation: the same fitness and a tiebreak (a validation loss) within
``synonym_tol`` (relative) of the member's, which rounding-level differences in
training meet and different distillers in practice do not.

The fitness function is injected (:class:`~distillkit.methods.kdzero.proxy.ProxyTask` trains a
student briefly); it returns an :class:`Evaluation` whose status says whether the
candidate was rejected before training (loss rejection) or diverged in training.
Such candidates never join the population; they are counted and logged.

Determinism and resumption: all choices come from one ``random.Random(seed)``, and
fitnesses are cached by genotype, so a run is a function of the seed and the fitness
function. After every round the state (population, RNG state, cache, counts,
history, the log's length) is written to a JSON checkpoint; a resumed run truncates
the log to that length and continues with exactly the choices, log lines and result
of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from tqdm.auto import tqdm

from distillkit.methods.kdzero.distiller import DISTANCES, WEIGHTS, Distiller
from distillkit.methods.kdzero.transforms import TRANSFORMS
from distillkit.trainers.runtime import write_atomically

__all__ = ["SearchSpace", "Evaluation", "SearchResult", "search"]

_CHECKPOINT_VERSION = 1
# Draws allowed to find an offspring that is not already a member.
_NOVELTY_TRIES = 20
# Draws allowed per member while filling the first population.
_INIT_DRAWS_PER_MEMBER = 50


@dataclass(frozen=True)
class SearchSpace:
    """The genes a search may draw.

    Args:
        inputs: ``(output name, rank)`` pairs: the network outputs a distiller may
            distil and their ranks (e.g. ``(("logits", 2), ("feature", 4))``).
        transforms: transform names that chains may use.
        distances: distance names.
        weights: the discrete weight set.
        max_transforms: longest chain (chains have 0 … max_transforms steps).
    """

    inputs: Tuple[Tuple[str, int], ...] = (("logits", 2),)
    transforms: Tuple[str, ...] = tuple(TRANSFORMS)
    distances: Tuple[str, ...] = tuple(DISTANCES)
    weights: Tuple[float, ...] = WEIGHTS
    max_transforms: int = 3

    def __post_init__(self):
        for name in ("inputs", "transforms", "distances", "weights"):
            value = tuple(tuple(v) if name == "inputs" else v for v in getattr(self, name))
            if not value:
                raise ValueError(f"SearchSpace.{name} must not be empty")
            object.__setattr__(self, name, value)
        unknown = set(self.transforms) - set(TRANSFORMS) | set(self.distances) - set(DISTANCES)
        if unknown:
            raise ValueError(
                f"SearchSpace names unknown transforms or distances: {sorted(unknown)}")
        if self.max_transforms < 0:
            raise ValueError(f"max_transforms must be >= 0 (got {self.max_transforms})")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (what a checkpoint stores and compares)."""
        return json.loads(json.dumps(asdict(self)))

    def _rank(self, output: str) -> int:
        return dict(self.inputs)[output]

    def valid(self, d: Distiller) -> bool:
        """Whether ``d`` lies in this space (genes drawn from it, a chain that fits its
        input and repeats no idempotent transform back to back)."""
        if (d.output not in dict(self.inputs) or d.distance not in self.distances
                or d.weight not in self.weights or len(d.transforms) > self.max_transforms
                or not set(d.transforms) <= set(self.transforms)):
            return False
        return self._fits(d, self._rank(d.output))

    def _random_chain(self, rank: int, rng: random.Random) -> Tuple[str, ...]:
        """A chain of uniform length whose every step takes what the step before returns
        (shorter if no transform of the space takes the rank reached)."""
        chain: List[str] = []
        for _ in range(rng.randint(0, self.max_transforms)):
            options = [t for t in self.transforms if TRANSFORMS[t].accepts(rank)
                       and not (chain and _repeats(chain[-1], t))]
            if not options:
                break
            chain.append(rng.choice(options))
            rank = TRANSFORMS[chain[-1]].output_rank(rank)
        return tuple(chain)

    def random(self, rng: random.Random) -> Distiller:
        """A distiller with every gene drawn uniformly."""
        output, rank = rng.choice(self.inputs)
        return Distiller(self._random_chain(rank, rng), rng.choice(self.distances),
                         rng.choice(self.weights), output)

    def mutate(self, d: Distiller, rng: random.Random) -> Distiller:
        """Change one gene: insert / delete / replace a transform, the distance, the
        weight (one step up or down the weight list), or the output (with a new chain)."""
        genes = (["transforms"] * (self.max_transforms > 0) + ["distance", "weight"]
                 + ["output"] * (len(self.inputs) > 1))
        gene = rng.choice(genes)
        if gene == "distance":
            return _replace(d, distance=rng.choice([x for x in self.distances if x != d.distance]
                                                   or self.distances))
        if gene == "weight":
            i = self.weights.index(d.weight) if d.weight in self.weights else 0
            j = min(max(i + rng.choice((-1, 1)), 0), len(self.weights) - 1)
            return _replace(d, weight=self.weights[j])
        if gene == "output":
            output, rank = rng.choice([x for x in self.inputs if x[0] != d.output])
            return _replace(d, output=output, transforms=self._random_chain(rank, rng))
        rank = self._rank(d.output)
        for _ in range(_NOVELTY_TRIES):
            chain = list(d.transforms)
            edits = (["insert"] * (len(chain) < self.max_transforms)
                     + ["delete", "replace"] * (len(chain) > 0))
            edit = rng.choice(edits)
            i = rng.randrange(len(chain) + (edit == "insert"))
            if edit == "delete":
                del chain[i]
            elif edit == "insert":
                chain.insert(i, rng.choice(self.transforms))
            else:
                chain[i] = rng.choice(self.transforms)
            child = _replace(d, transforms=tuple(chain))
            if self._fits(child, rank):
                return child
        return d

    def crossover(self, a: Distiller, b: Distiller, rng: random.Random) -> Distiller:
        """Each gene from either parent; when both distil the same output, the chain is a
        one-point crossover ``a[:i] + b[j:]`` (if it fits, else one parent's chain)."""
        first = a if rng.random() < 0.5 else b
        chain = first.transforms
        if a.output == b.output:
            i = rng.randint(0, len(a.transforms))
            j = rng.randint(0, len(b.transforms))
            cut = a.transforms[:i] + b.transforms[j:]
            if len(cut) <= self.max_transforms and self._fits(_replace(a, transforms=cut),
                                                               self._rank(a.output)):
                chain = cut
        return Distiller(chain, rng.choice((a, b)).distance, rng.choice((a, b)).weight,
                         first.output)

    @staticmethod
    def _fits(d: Distiller, rank: int) -> bool:
        """Whether ``d``'s chain takes rank ``rank`` and repeats no idempotent step."""
        if any(_repeats(a, b) for a, b in zip(d.transforms, d.transforms[1:])):
            return False
        try:
            d.check_rank(rank)
        except ValueError:
            return False
        return True


def _repeats(before: str, after: str) -> bool:
    return before == after and TRANSFORMS[after].idempotent


def _replace(d: Distiller, **genes) -> Distiller:
    return Distiller(**{**d.to_dict(), **genes})


@dataclass(frozen=True)
class Evaluation:
    """What a fitness function says about one candidate.

    Attributes:
        status: ``"ok"`` (trained; ``fitness`` set), ``"rejected"`` (failed the
            first-batch loss check, not trained) or ``"diverged"`` (non-finite loss in
            training).
        fitness: higher is better (e.g. validation accuracy).
        tiebreak: orders equal fitnesses, higher first (e.g. minus the validation loss).
        reason: why it was rejected or diverged (a short category, for counting).
        metrics: anything else worth logging (JSON-serializable).
    """

    status: str
    fitness: Optional[float] = None
    tiebreak: float = 0.0
    reason: str = ""
    metrics: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def rank_key(self) -> Tuple[float, float]:
        return (-self.fitness, -self.tiebreak)


@dataclass
class SearchResult:
    """The outcome of :func:`search`.

    Attributes:
        population: ``(distiller, evaluation)`` pairs, best first.
        history: per round: ``round``, ``best`` and ``mean`` population fitness,
            ``best_distiller`` (as a dict), and ``fitnesses`` of the round's new passing
            candidates.
        counts: ``candidates`` (log lines), ``evaluated`` (fitness-function calls; the
            rest came from the cache), ``ok``, ``rejected``, ``diverged``, ``synonyms``
            (passing candidates not added, see below).
        reasons: rejection and divergence reasons, counted.
    """

    population: List[Tuple[Distiller, Evaluation]]
    history: List[Dict[str, Any]]
    counts: Dict[str, int]
    reasons: Dict[str, int]

    @property
    def best(self) -> Distiller:
        return self.population[0][0]

    @property
    def best_evaluation(self) -> Evaluation:
        return self.population[0][1]


def _resume(run: "_Run", checkpoint: str) -> None:
    """Load ``checkpoint`` into the fresh ``run``; a file that is not a whole checkpoint of
    this version (truncated, edited, another program's) is a ValueError naming it."""
    try:
        with open(checkpoint, "rb") as f:
            state = json.loads(f.read())
        run.load(state)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{checkpoint}: not a readable search checkpoint "
                         f"({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"{checkpoint}: {e}") from e


class _Run:
    """The mutable state of one search, its checkpoint and its log."""

    def __init__(self, evaluate, space: SearchSpace, config: Dict[str, Any], seed: int,
                 synonym_tol: Optional[float], log: Optional[str], checkpoint: Optional[str]):
        self.evaluate, self.space, self.config = evaluate, space, config
        self.synonym_tol = synonym_tol
        self.log_path, self.checkpoint_path = log, checkpoint
        self.rng = random.Random(seed)
        self.round = -1  # the last completed round
        self.population: List[Tuple[Distiller, Evaluation]] = []
        self.cache: Dict[str, Evaluation] = {}
        self.history: List[Dict[str, Any]] = []
        self.counts = Counter(candidates=0, evaluated=0, ok=0, rejected=0, diverged=0,
                              synonyms=0)
        self.reasons: Counter = Counter()
        self.log_offset = 0
        self.round_fitnesses: List[float] = []

    # ---- checkpoint ----

    def state(self) -> Dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "version": _CHECKPOINT_VERSION, "config": self.config, "round": self.round,
            "rng": [version, list(internal), gauss],
            "population": [{"distiller": d.to_dict(), "evaluation": asdict(e)}
                           for d, e in self.population],
            "cache": {k: asdict(e) for k, e in self.cache.items()},
            "history": self.history, "counts": dict(self.counts), "reasons": dict(self.reasons),
            "log_offset": self.log_offset,
        }

    def load(self, state: Dict[str, Any]) -> None:
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"search checkpoint version {state.get('version')} is not "
                             f"{_CHECKPOINT_VERSION}")
        differ = sorted(k for k in set(state["config"]) | set(self.config)
                        if state["config"].get(k) != self.config.get(k))
        if differ:
            raise ValueError(
                f"the checkpoint was written by a search with other settings: {differ}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.round = state["round"]
        self.population = [(Distiller.from_dict(p["distiller"]), Evaluation(**p["evaluation"]))
                           for p in state["population"]]
        self.cache = {k: Evaluation(**e) for k, e in state["cache"].items()}
        self.history = state["history"]
        self.counts = Counter(state["counts"])
        self.reasons = Counter(state["reasons"])
        self.log_offset = state["log_offset"]

    def save(self) -> None:
        if self.checkpoint_path is None:
            return
        data = json.dumps(self.state()).encode()
        write_atomically(self.checkpoint_path, lambda f: f.write(data))

    # ---- candidates ----

    def assess(self, d: Distiller, origin: str) -> bool:
        """Evaluate ``d`` (or reuse its cached evaluation), count and log it, and add it
        to the population if it passed and is no synonym of a member; return whether it
        was added."""
        key = d.to_json()
        cached = key in self.cache
        if not cached:
            self.cache[key] = self.evaluate(d)
            self.counts["evaluated"] += 1
        ev = self.cache[key]
        self.counts["candidates"] += 1
        self.counts[ev.status] += 1
        synonym_of = None
        if not ev.ok:
            self.reasons[ev.reason] += 1
        else:
            self.round_fitnesses.append(ev.fitness)
            synonym_of = next((m.formula() for m, e in self.population
                               if self.same_student(e, ev)), None)
            self.counts["synonyms"] += synonym_of is not None
        if self.log_path is not None:
            record = {"round": self.round + 1, "candidate": self.counts["candidates"],
                      "origin": origin, "distiller": d.to_dict(), "formula": d.formula(),
                      "cached": cached, **asdict(ev), "synonym_of": synonym_of}
            with open(self.log_path, "ab") as f:
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
                self.log_offset = f.tell()
        if ev.ok and synonym_of is None:
            self.population.append((d, ev))
            return True
        return False

    def same_student(self, a: Evaluation, b: Evaluation) -> bool:
        return (self.synonym_tol is not None and a.fitness == b.fitness
                and abs(a.tiebreak - b.tiebreak) <= self.synonym_tol * max(1.0, abs(a.tiebreak)))

    def members(self) -> set:
        return {d.to_json() for d, _ in self.population}

    def novel(self, make: Callable[[], Tuple[Distiller, str]], taken: set):
        """The first of up to ``_NOVELTY_TRIES`` draws of ``make()`` not in ``taken``."""
        for _ in range(_NOVELTY_TRIES):
            d, origin = make()
            if d.to_json() not in taken:
                return d, origin
        return None

    def offspring(self, parents: List[Distiller]) -> Tuple[Distiller, str]:
        a, b = self.rng.sample(parents, 2)
        ops = []
        child = a
        if self.rng.random() < 0.5:
            child = self.space.crossover(a, b, self.rng)
            ops.append("crossover")
        if self.rng.random() < 0.5:
            child = self.space.mutate(child, self.rng)
            ops.append("mutation")
        return child, "+".join(ops) or "copy"

    def rank(self) -> None:
        # A stable sort: among exact ties the older member stays ahead.
        self.population.sort(key=lambda p: p[1].rank_key())

    def finish_round(self) -> None:
        self.round += 1
        fits = [e.fitness for _, e in self.population]
        self.history.append({
            "round": self.round, "best": fits[0], "mean": sum(fits) / len(fits),
            "best_distiller": self.population[0][0].to_dict(), "fitnesses": self.round_fitnesses,
        })
        self.round_fitnesses = []
        self.save()


def search(
    evaluate: Callable[[Distiller], Evaluation],
    space: SearchSpace = SearchSpace(),
    *,
    population: int = 10,
    rounds: int = 20,
    children: int = 2,
    seed: int = 0,
    synonym_tol: Optional[float] = 1e-6,
    log: Optional[str] = None,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Evolve distillers in ``space`` for ``rounds`` rounds after the initial population.

    Args:
        evaluate: fitness function, ``Distiller -> Evaluation``; must be deterministic for
            the search to be (e.g. :class:`~distillkit.methods.kdzero.proxy.ProxyTask`).
        space: the genes to draw from.
        population: members kept (>= 10, docs/math.md §9.5).
        rounds: rounds after round 0 (the random initial population).
        children: offspring per round; each round also adds one fresh random member.
        seed: seeds every random choice of the search.
        synonym_tol: relative tolerance on the tiebreak under which a passing candidate
            with a member's fitness counts as a synonym and is not added (0: exact
            equality only; ``None``: no synonym detection, for fitness functions without
            a continuous tiebreak, whose ties are not evidence of equal students).
        log: JSON-lines file, one line per candidate (round, origin, genotype, formula,
            the :class:`Evaluation`'s fields, whether it came from the cache, and the
            member it is a synonym of, if any).
            Started afresh unless resuming.
        checkpoint: JSON file rewritten after every round.
        resume: continue from ``checkpoint`` if it exists (with the same settings; only
            ``rounds`` may differ), truncating ``log`` to where the checkpoint left it.
        progress: show a tqdm bar over candidate slots.

    Returns:
        A :class:`SearchResult`. Raises RuntimeError if the first population cannot be
        filled (nearly every random candidate is rejected).
    """
    if population < 10:
        raise ValueError(f"population must be >= 10 (got {population})")
    if rounds < 0 or children < 0:
        raise ValueError(f"rounds and children must be >= 0 (got {rounds} and {children})")
    config = {"space": space.to_dict(), "population": population, "children": children,
              "seed": seed, "synonym_tol": synonym_tol}
    run = _Run(evaluate, space, config, seed, synonym_tol, log, checkpoint)
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        _resume(run, checkpoint)
    if log is not None:
        with open(log, "ab") as f:
            f.truncate(run.log_offset)

    done = min(run.round + 1, 1) * population + max(run.round, 0) * (children + 1)
    bar = tqdm(total=population + rounds * (children + 1), initial=done, unit="candidate",
               disable=not progress, dynamic_ncols=True)
    with bar:
        if run.round < 0:
            draws = 0
            while len(run.population) < population:
                draws += 1
                if draws > _INIT_DRAWS_PER_MEMBER * population:
                    raise RuntimeError(
                        f"could not fill a population of {population}: {draws - 1} random "
                        f"candidates drawn, reasons {dict(run.reasons)}")
                found = run.novel(lambda: (space.random(run.rng), "random"), run.members())
                if found is not None and run.assess(*found):
                    bar.update()
            run.rank()
            run.finish_round()
        while run.round < rounds:
            parents = [d for d, _ in run.population[:len(run.population) // 2]]
            taken = run.members()
            makers = [lambda: run.offspring(parents)] * children
            makers.append(lambda: (space.random(run.rng), "random"))
            for make in makers:
                found = run.novel(make, taken)
                if found is not None:
                    taken.add(found[0].to_json())
                    run.assess(*found)
                bar.update()
            run.rank()
            del run.population[population:]
            run.finish_round()
            bar.set_postfix(best=f"{run.history[-1]['best']:.4f}", rejected=run.counts["rejected"])
    return SearchResult(list(run.population), list(run.history), dict(run.counts),
                        dict(run.reasons))
