"""The fair tuning protocol as a command: ``normuon tune``.

A comparison of optimizers is only as fair as the tuning behind it: tuned on one seed, a x2 grid
can pick a setting by luck, and when Muon and NorMuon each tune the AdamW lr of their
embeddings, head and gains, a difference between them may come from that lr rather than from
the matrix update. The protocol here:

1. **Data.** The held-out tokens (``2 * train.val_fraction`` of the corpus) are cut in two
   (:func:`~normuon.harness.data.holdout_halves`): every tuning score is read on the first half
   (validation), every reported number on the second (test), which tuning never saw.
2. **Scores.** A tuning point (optimizer, lr, embeddings/head lr) is trained with every seed of
   :attr:`TuneProtocol.tune_seeds` (at least 2) and scored by the mean of their final
   validation losses; a seed that diverges makes the score infinite. On text read many times
   the final loss also counts how far a run has overfit by its end; :attr:`TuneProtocol.score`
   ``"lowest"`` scores each seed by the lowest point of its validation curve instead (the loss
   early stopping would keep).
3. **Searches.** Each search is a grid of ``grid_points`` values x``grid_factor`` apart around
   the preset's value, stepped past an edge (at most ``max_extend`` times each way) while the
   best value lies on it, then refined x``refine_factor`` (sqrt 2) on either side of the best
   (:func:`search_next`).

   - *AdamW*: its one lr.
   - *Muon, NorMuon and the ablations* ("matrix optimizers"): (a) the matrix lr on the x2 grid
     with the embeddings/head/gains lr at the baseline's (Muon's) preset value; (b) that lr on
     a x2 grid with each optimizer at its best matrix lr: the value with the best mean score
     over the judges (Muon and NorMuon) is **shared** by every matrix optimizer, so their
     embeddings, head and gains train alike and a difference comes from the matrix update;
     (c) the matrix lr refined by sqrt 2 at the shared value.
   - *Separate* (:attr:`TuneProtocol.separate_aux`, the freedom an earlier protocol gave): each
     matrix optimizer's own best embeddings/head lr among the values of (b), its matrix lr
     refined there; reported as a second table to show how much that freedom moves results.
   - *A check* (:meth:`TuneProtocol.check`, ``normuon tune --check``) of settings carried over
     from a smaller model (whose lr transfers: :mod:`normuon.harness.transfer`): each lr is
     scored at its carried value and sqrt 2 either side, stepped on by sqrt 2 while the best
     lies on an edge; the embeddings/head lr stays at its carried value (no step b, no
     refinement). Three trained points per optimizer where a full search trains five (AdamW) or
     seven (a matrix optimizer) or more.
4. **Reporting.** The tuned settings are retrained on :attr:`TuneProtocol.final_seeds` (fresh
   seeds) and read on the test half: final loss with 95% confidence intervals, the steps each
   optimizer needs to reach AdamW's and Muon's mean final loss (the saving, with its per-seed
   interval), and Welch's and the paired t-test against Muon (seed k gives every optimizer the
   same initial model and batches).

Every finished training is appended to ``OUT/ledger.jsonl`` (settings, seed, split, final loss
or divergence, validation curve, time): the ledger is the record of every tuning run and what
``--resume`` continues from (copied into a fresh folder with its ``config.json`` it continues
elsewhere, without the run folders). Outputs: ``summary.json`` (settings, every run, the
analysis), ``tune.md`` (the tables) and ``tune.png``. :func:`ladder_report` reads the summaries
of several corpora and model sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import write_json
from .compare import Diverged, _claim_folder, _environment, _need_spec, _Run, _train_all
from .config import OPTIMIZERS
from .data import TokenData
from .report import mean_ci, paired_t_test, steps_to_reach, welch_t_test
from .spec import RunSpec

__all__ = [
    "TuneProtocol",
    "search_next",
    "search_edges",
    "SearchEdge",
    "run_tune",
    "resolve_tune",
    "analyse_finals",
    "tune_tables",
    "write_tune_plot",
    "ladder_report",
    "PAPER_SAVINGS_VS_MUON",
]

#: The optimizer whose preset embeddings/head lr starts the shared search, and the reference of
#: the tests and savings.
BASELINE = "muon"
#: NorMuon's saving in steps against Muon reported by the paper, by parameters: at 124M and 350M
#: Muon needs 6% and 15% more steps to match NorMuon's final loss (1 - 1/1.06, 1 - 1/1.15), at
#: 1.1B NorMuon needs 11.31% fewer steps than Muon to reach AdamW's final loss.
PAPER_SAVINGS_VS_MUON = {124e6: 1 - 1 / 1.06, 350e6: 1 - 1 / 1.15, 1.1e9: 0.1131}


#: The ways a tuning seed can be scored (:attr:`TuneProtocol.score`).
SCORES = ("final", "lowest")


def training_loss(record: dict[str, Any], score: str = "final") -> float:
    """A ledger record's (or a summary tuning run's) loss under ``score``: the final validation
    loss, or the lowest point of its validation curve; inf for a diverged training."""
    if record["diverged"]:
        return math.inf
    if score == "lowest":
        # Summaries keep the lowest point, ledger records the whole curve.
        if "lowest_loss" in record:
            return record["lowest_loss"]
        return min(record["val_losses"])
    return record["final_loss"]


def _value(x: float) -> float:
    """A grid value rounded to 6 significant digits: the same number whichever product made it,
    and the number its folder name shows."""
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class TuneProtocol:
    """The choices of the tuning protocol (module docstring); written into ``config.json``."""

    tune_seeds: tuple[int, ...] = (0, 1)
    """Seeds every tuning point is trained with (at least 2); its score is the mean of their
    validation losses (final or lowest: :attr:`score`)."""
    final_seeds: tuple[int, ...] = (100, 101, 102)
    """Fresh seeds (none of ``tune_seeds``) the tuned settings are retrained with and scored on
    the test half (at least 2, for intervals and tests)."""
    grid_points: int = 3
    """Values of each first grid (odd: centred on the preset's value)."""
    grid_factor: float = 2.0
    """Ratio of neighbouring grid values."""
    refine_factor: float = math.sqrt(2)
    """Ratio of the refinement values to the best grid value (1 turns refinement off)."""
    max_extend: int = 3
    """Grid steps a search may add past each edge while its best value lies on that edge."""
    aux_judges: tuple[str, ...] = ("muon", "normuon")
    """Matrix optimizers whose mean score chooses the shared embeddings/head/gains lr (those of
    them selected; every selected matrix optimizer when none is)."""
    separate_aux: bool = True
    """Also retrain each matrix optimizer at the embeddings/head lr it scores best with alone
    (a second table; needs ``tune_aux``)."""
    tune_aux: bool = True
    """Search the shared embeddings/head/gains lr (step b). False keeps the baseline's
    configured value for every matrix optimizer: a check of settings carried over."""
    score: str = "final"
    """What a tuning seed contributes to its point's score: ``"final"``, its last validation
    loss; ``"lowest"``, the lowest point of its validation curve (read every
    ``train.val_every`` steps): the loss early stopping keeps, for budgets that read the text
    many times, where the final loss ranks how far each setting has overfit by the end. The
    reported test losses are final losses either way, with each curve's lowest point beside."""

    @classmethod
    def check(cls, **changes: Any) -> TuneProtocol:
        """The sqrt 2 check of carried-over settings (module docstring): a 3-point grid sqrt 2
        apart around each configured lr, no refinement, the embeddings/head lr kept."""
        return cls(**{"grid_factor": math.sqrt(2), "refine_factor": 1.0, "tune_aux": False,
                      "separate_aux": False, **changes})  # fmt: skip

    def validate(self) -> None:
        """ValueError naming the field and value of the first bad choice."""
        for name in ("tune_seeds", "final_seeds"):
            seeds = getattr(self, name)
            if len(seeds) < 2 or len(set(seeds)) != len(seeds):
                raise ValueError(f"{name} must be at least 2 distinct seeds, got {list(seeds)}")
            if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
                raise ValueError(f"{name} must be integers >= 0, got {list(seeds)}")
        if set(self.tune_seeds) & set(self.final_seeds):
            raise ValueError(f"final_seeds {list(self.final_seeds)} must be fresh: they share "
                             f"{sorted(set(self.tune_seeds) & set(self.final_seeds))} with "
                             f"tune_seeds")  # fmt: skip
        if not (isinstance(self.grid_points, int) and self.grid_points >= 1
                and self.grid_points % 2 == 1):  # fmt: skip
            raise ValueError(f"grid_points must be an odd integer >= 1, got {self.grid_points!r}")
        if not (math.isfinite(self.grid_factor) and self.grid_factor > 1):
            raise ValueError(f"grid_factor must be a number > 1, got {self.grid_factor!r}")
        if not (math.isfinite(self.refine_factor) and 1 <= self.refine_factor < self.grid_factor):
            raise ValueError(f"refine_factor must be in [1, grid_factor={self.grid_factor:g}), "
                             f"got {self.refine_factor!r}")  # fmt: skip
        if not (isinstance(self.max_extend, int) and self.max_extend >= 0):
            raise ValueError(f"max_extend must be an integer >= 0, got {self.max_extend!r}")
        if self.separate_aux and not self.tune_aux:
            raise ValueError("separate_aux=True needs tune_aux=True: each matrix optimizer's own "
                             "embeddings/head lr is chosen among the values that search tried")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.grid_points == 1 and self.refine_factor == 1:
            raise ValueError("grid_points=1 with refine_factor=1 trains only the configured lr "
                             "and compares it with nothing: a check needs grid_points >= 3")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _best_of(scores: dict[float, float]) -> float:
    """The value of lowest score; ties go to the smaller value (the safer lr)."""
    return min(scores, key=lambda v: (scores[v], v))


def search_next(
    center: float,
    scores: dict[float, float],
    *,
    factor: float,
    points: int,
    max_extend: int,
    refine: float,
) -> tuple[list[float], float | None]:
    """One step of a 1-D search: (values still to score, best value once there are none).

    ``scores``: value -> score (lower is better, inf for a diverged point) of the values scored
    so far. The search is a function of them only, so an interrupted one resumes from its
    ledger. Ties go to the smaller value (the safer lr).
    """

    def at(k: int) -> float:
        return _value(center * factor**k)

    half = points // 2
    grid = [at(k) for k in range(-half, half + 1)]
    missing = [v for v in grid if v not in scores]
    if missing:
        return missing, None
    lattice = {k: at(k) for k in range(-half - max_extend, half + max_extend + 1)
               if at(k) in scores}  # fmt: skip
    best_k = min(lattice, key=lambda k: (scores[lattice[k]], lattice[k]))
    # A one-point grid has no edge to step past: it is refined only. Each side has its own
    # max_extend steps: scored one way a search only ever steps one way, but a ledger rescored
    # another way (TuneProtocol.score) may hold steps up when the new best lies below the grid.
    if points > 1:
        if best_k == max(lattice) and best_k < half + max_extend:
            return [at(best_k + 1)], None
        if best_k == min(lattice) and best_k > -half - max_extend:
            return [at(best_k - 1)], None
    best = lattice[best_k]
    if refine > 1:
        around = [_value(best / refine), _value(best * refine)]
        missing = [v for v in around if v not in scores]
        if missing:
            return missing, None
        best = _best_of({v: scores[v] for v in (best, *around)})
    return [], best


# ------------------------------------------------------------------ the ledger


@dataclass(frozen=True)
class Point:
    """One setting of one optimizer on one split: trained once per seed of that split."""

    optimizer: str
    lr: float
    """The optimizer's lr (Muon, NorMuon, ablations: the matrix lr)."""
    adamw_lr: float | None
    """The embeddings/head/gains AdamW lr of a matrix optimizer; None for AdamW (one lr)."""
    split: str
    """``validation`` (tuning) or ``test`` (reporting)."""

    def folder(self) -> str:
        name = f"lr{self.lr:g}" if self.adamw_lr is None else f"lr{self.lr:g}_aux{self.adamw_lr:g}"
        return f"{self.split}/{self.optimizer}/{name}"

    def key(self, seed: int) -> str:
        return f"{self.folder()}/seed{seed}"


def _point_of(record: dict[str, Any]) -> Point:
    return Point(record["optimizer"], record["lr"], record["adamw_lr"], record["split"])


class _Ledger:
    """``ledger.jsonl``: one JSON line per finished training, appended (and synced) as each one
    finishes; the protocol's memory and what ``--resume`` continues from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.is_file():
            lines = path.read_text().splitlines()
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    point = _point_of(record)
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A line cut by a kill: the training is simply done again.
                    if n == len(lines):
                        continue
                    raise ValueError(f"{path}: line {n} is not a ledger record") from None
                self.records[point.key(record["seed"])] = record

    def get(self, point: Point, seed: int) -> dict[str, Any] | None:
        return self.records.get(point.key(seed))

    def add(self, record: dict[str, Any]) -> None:
        self.records[_point_of(record).key(record["seed"])] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _record(point: Point, seed: int, phase: str, result: Any) -> dict[str, Any]:
    base = {"optimizer": point.optimizer, "lr": point.lr, "adamw_lr": point.adamw_lr,
            "split": point.split, "seed": seed, "phase": phase}  # fmt: skip
    if isinstance(result, Diverged):
        return {**base, "final_loss": None, "diverged": True, "message": result.message}
    return {**base, "final_loss": result.final_val_loss, "diverged": False,
            "steps": result.steps, "val_steps": result.val_steps,
            "val_losses": result.val_losses, "train_time_s": result.train_time_s,
            "tokens_per_s": result.tokens_per_s, "n_params": result.n_params}  # fmt: skip


# ------------------------------------------------------------------ the protocol


class _Tuner:
    """The protocol's phases over one validation spec and one test spec."""

    def __init__(self, spec: RunSpec, final_spec: RunSpec, data: TokenData,
                 final_data: TokenData, protocol: TuneProtocol, out: Path, *, jobs: int,
                 options: dict[str, Any], progress: bool | None, log) -> None:  # fmt: skip
        self.spec, self.final_spec = spec, final_spec
        self.data, self.final_data = data, final_data
        self.protocol, self.out, self.jobs = protocol, out, jobs
        self.options, self.progress, self.log = options, progress, log
        self.ledger = _Ledger(out / "ledger.jsonl")
        self.matrix = [o for o in spec.selected if o != "adamw"]
        self.judges = [j for j in protocol.aux_judges if j in self.matrix] or list(self.matrix)
        start = BASELINE if BASELINE in self.matrix else (self.matrix or [None])[0]
        self.aux0 = None if start is None else _value(spec.optimizers[start].adamw_lr)
        self.aux0_from = start
        self.best_lr: dict[str, float] = {}
        self.shared_aux: float | None = None
        self.own_aux: dict[str, float] = {}
        self.settings: dict[str, dict[str, Point]] = {"shared": {}, "separate": {}}

    # -- scores

    def _seeds(self, split: str) -> tuple[int, ...]:
        return self.protocol.tune_seeds if split == "validation" else self.protocol.final_seeds

    def score(self, point: Point) -> float | None:
        """Mean loss (final or lowest: the protocol's ``score``) over the split's seeds; inf if
        one diverged; None until all ran."""
        losses = []
        for seed in self._seeds(point.split):
            record = self.ledger.get(point, seed)
            if record is None:
                return None
            losses.append(training_loss(record, self.protocol.score))
        return sum(losses) / len(losses)

    def _lr_scores(self, optimizer: str, adamw_lr: float | None) -> dict[float, float]:
        lrs = {r["lr"] for r in self.ledger.records.values()
               if r["split"] == "validation" and r["optimizer"] == optimizer
               and r["adamw_lr"] == adamw_lr}  # fmt: skip
        scores = {lr: self.score(Point(optimizer, lr, adamw_lr, "validation")) for lr in lrs}
        return {lr: s for lr, s in scores.items() if s is not None}

    def _aux_scores(self, optimizer: str) -> dict[float, float]:
        lr = self.best_lr[optimizer]
        values = {r["adamw_lr"] for r in self.ledger.records.values()
                  if r["split"] == "validation" and r["optimizer"] == optimizer
                  and r["lr"] == lr}  # fmt: skip
        scores = {v: self.score(Point(optimizer, lr, v, "validation")) for v in values}
        return {v: s for v, s in scores.items() if s is not None}

    # -- training

    def train(self, points: Iterable[Point], phase: str) -> None:
        """Train every (point, seed) the ledger lacks, ``jobs`` at a time."""
        runs: dict[_Run, Point] = {}
        for point in dict.fromkeys(points):
            base = self.spec if point.split == "validation" else self.final_spec
            changes = {"lr": point.lr}
            if point.adamw_lr is not None:
                changes["adamw_lr"] = point.adamw_lr
            spec = base.with_options(point.optimizer, **changes)
            for seed in self._seeds(point.split):
                if self.ledger.get(point, seed) is None:
                    run_dir = self.out / "runs" / point.folder() / f"seed{seed}"
                    runs[_Run(point.optimizer, seed, spec, run_dir)] = point
        if not runs:
            return
        self.log(f"[{phase}] {len(runs)} trainings ({len({*runs.values()})} settings)")
        # Final trainings read the test half; every other phase tunes on the validation half.
        final = phase == "final"
        data = self.final_data if final else self.data

        def keep(run: _Run, result: Any) -> None:
            self.ledger.add(_record(runs[run], run.seed, phase, result))

        _train_all(list(runs), data, self.options, jobs=self.jobs, resume=True,
                   progress=self.progress, log=lambda line: self.log(f"  {line}"),
                   diverged_ok=True, on_result=keep,
                   held_out="test" if final else "val")  # fmt: skip

    def drive(self, phase: str, requests: Callable[[], list[Point]]) -> None:
        """Train what ``requests`` asks for until it asks for nothing."""
        while need := requests():
            self.train(need, phase)

    # -- phases

    def _lr_requests(self) -> list[Point]:
        p, need = self.protocol, []
        for name in self.spec.selected:
            aux = None if name == "adamw" else self.aux0
            # AdamW's search ends here, refined; a matrix lr is refined after the aux search.
            refine = p.refine_factor if name == "adamw" else 1.0
            missing, best = search_next(
                _value(self.spec.optimizers[name].lr), self._lr_scores(name, aux),
                factor=p.grid_factor, points=p.grid_points, max_extend=p.max_extend,
                refine=refine,
            )  # fmt: skip
            need += [Point(name, lr, aux, "validation") for lr in missing]
            if best is not None:
                self.best_lr[name] = best
        return need

    def _effective_judges(self) -> list[str]:
        """The judges that trained at all in the lr phase: one that diverged at every matrix lr
        would make every shared value's score infinite and leave the choice to the tie rule.
        Without any, every matrix optimizer that trained judges; without those, all do."""
        def trained(name: str) -> bool:
            return any(math.isfinite(v) for v in self._lr_scores(name, self.aux0).values())

        return ([j for j in self.judges if trained(j)]
                or [o for o in self.matrix if trained(o)] or list(self.judges))  # fmt: skip

    def _aux_requests(self) -> list[Point]:
        p = self.protocol
        self.judges = self._effective_judges()
        per = {name: self._aux_scores(name) for name in self.matrix}
        common = set.intersection(*(set(per[j]) for j in self.judges))
        joint = {v: sum(per[j][v] for j in self.judges) / len(self.judges) for v in common}
        missing, best = search_next(self.aux0, joint, factor=p.grid_factor, points=p.grid_points,
                                    max_extend=p.max_extend, refine=1.0)  # fmt: skip
        values = set(missing) | {v for j in self.judges for v in per[j]}
        # Every matrix optimizer is trained at every value the judges were: its own best among
        # them is the separate-aux table's setting.
        need = [Point(name, self.best_lr[name], v, "validation")
                for v in sorted(values) for name in self.matrix if v not in per[name]]  # fmt: skip
        if not need and best is not None:
            self.shared_aux = best
            self.own_aux = {name: _best_of(per[name]) for name in self.matrix}
        return need

    def _refine_requests(self) -> list[Point]:
        p, need = self.protocol, []
        for kind in ("shared", "separate"):
            if kind == "separate" and not p.separate_aux:
                continue
            for name in self.matrix:
                aux = self.shared_aux if kind == "shared" else self.own_aux[name]
                missing, best = search_next(self.best_lr[name], self._lr_scores(name, aux),
                                            factor=p.grid_factor, points=1, max_extend=0,
                                            refine=p.refine_factor)  # fmt: skip
                need += [Point(name, lr, aux, "validation") for lr in missing]
                if best is not None:
                    self.settings[kind][name] = Point(name, best, aux, "test")
        if "adamw" in self.spec.selected:
            # AdamW (no embeddings/head split) joins each table that has matrix optimizers.
            for kind in self.settings:
                if kind == "separate" and not p.separate_aux:
                    continue
                self.settings[kind]["adamw"] = Point("adamw", self.best_lr["adamw"], None, "test")
        return need

    def run(self) -> None:
        self.drive("lr", self._lr_requests)
        if self.matrix and self.protocol.tune_aux:
            self.drive("aux", self._aux_requests)
        elif self.matrix:
            self.shared_aux = self.aux0  # carried over: every matrix optimizer started there
        self.drive("refine", self._refine_requests)
        self.train([pt for kind in self.settings.values() for pt in kind.values()], "final")

    # -- the summary

    def summary(self) -> dict[str, Any]:
        records = list(self.ledger.records.values())
        finals: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for kind, chosen in self.settings.items():
            if not chosen:
                continue
            order = [n for n in self.spec.selected if n in chosen]
            settings[kind] = {
                name: {"lr": chosen[name].lr, "adamw_lr": chosen[name].adamw_lr,
                       "validation_score": self.score(dataclasses.replace(chosen[name],
                                                                          split="validation"))}
                for name in order
            }  # fmt: skip
            finals[kind] = analyse_finals({
                name: [self.ledger.get(chosen[name], s) for s in self.protocol.final_seeds]
                for name in order
            })  # fmt: skip
        done = [r for r in records if not r["diverged"]]
        tokens_per_s: dict[str, list[float]] = {}
        for r in done:
            tokens_per_s.setdefault(r["optimizer"], []).append(r["tokens_per_s"])
        return {
            "preset": self.spec.preset,
            "data": self.final_spec.data,
            "n_params": self.spec.budget.params_all,
            # The shape and each matrix optimizer's update scale: what a learning-rate transfer
            # report (normuon.harness.transfer) compares across summaries.
            "model": {k: getattr(self.spec.model, k) for k in ("n_layer", "d_model", "n_head")},
            "update_scale": {n: self.spec.optimizers[n].update_scale for n in self.spec.selected
                             if n != "adamw"},  # fmt: skip
            "budget": {"steps": self.spec.train.steps, **self.spec.budget.to_json(),
                       "train_tokens": self.data.train.numel(),
                       "passes": self.spec.budget.tokens / self.data.train.numel()},
            "protocol": self.protocol.to_json(),
            "environment": _environment(),
            "jobs": self.jobs,
            "judges": self.judges,
            "aux_start": self.aux0,
            # Each search's centre: the configured lr (a check's carried-over value).
            "lr_start": {n: _value(self.spec.optimizers[n].lr) for n in self.spec.selected},
            "shared_aux": self.shared_aux,
            "own_aux": self.own_aux,
            "settings": settings,
            "finals": finals,
            "tuning_runs": [{**{k: r[k] for k in ("optimizer", "lr", "adamw_lr", "seed", "phase",
                                                   "final_loss", "diverged")},
                             "lowest_loss": None if r["diverged"] else min(r["val_losses"])}
                            for r in records if r["split"] == "validation"],  # fmt: skip
            "trainings": len(records),
            "train_time_s": sum(r.get("train_time_s", 0.0) for r in done),
            "tokens_per_s": {k: sum(v) / len(v) for k, v in tokens_per_s.items()},
        }


# ------------------------------------------------------------------ analysis and tables


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*curves)]


def analyse_finals(runs: dict[str, list[dict[str, Any] | None]]) -> dict[str, Any]:
    """Statistics of retrained settings on the test half: per optimizer the final losses (mean,
    95% interval), the steps its seed-mean curve needs to reach AdamW's and Muon's mean final
    loss against the reference's own (the saving, and its per-seed interval), and the Welch and
    paired t-tests of each optimizer against Muon. ``runs``: optimizer -> ledger records of its
    final seeds (same seeds, same order, for every optimizer)."""
    out: dict[str, Any] = {"optimizers": {}, "vs_muon": {}}
    finals: dict[str, list[float]] = {}
    curves: dict[str, list[list[float]]] = {}
    steps: dict[str, list[int]] = {}
    for name, records in runs.items():
        if any(r is None for r in records):
            raise ValueError(f"{name}: a final seed has not been trained")
        if any(r["diverged"] for r in records):
            out["optimizers"][name] = {"diverged": True,
                                       "seeds": [r["seed"] for r in records]}  # fmt: skip
            continue
        losses = [r["final_loss"] for r in records]
        finals[name] = losses
        curves[name] = [r["val_losses"] for r in records]
        steps[name] = records[0]["val_steps"]
        mean, half = mean_ci(losses)
        out["optimizers"][name] = {"seeds": [r["seed"] for r in records], "losses": losses,
                                   "mean": mean, "ci95": half,
                                   "val_steps": steps[name],
                                   "val_mean": _mean_curve(curves[name])}  # fmt: skip
    for ref in ("adamw", BASELINE):
        if ref not in finals:
            continue
        target = sum(finals[ref]) / len(finals[ref])
        ref_steps = steps_to_reach(steps[ref], _mean_curve(curves[ref]), target)
        for name in finals:
            if name == ref:
                continue
            reached = steps_to_reach(steps[name], _mean_curve(curves[name]), target)
            per_seed = [steps_to_reach(steps[name], c, target) for c in curves[name]]
            entry: dict[str, Any] = {
                "target": target, "steps": reached, "ref_steps": ref_steps,
                "saving": None if reached is None or not ref_steps else 1 - reached / ref_steps,
            }  # fmt: skip
            if ref_steps and all(x is not None for x in per_seed):
                entry["saving_seeds"] = mean_ci([1 - x / ref_steps for x in per_seed])
            out["optimizers"][name][f"vs_{ref}"] = entry
    if BASELINE in finals:
        for name in finals:
            if name not in (BASELINE, "adamw"):
                out["vs_muon"][name] = {
                    "welch": welch_t_test(finals[name], finals[BASELINE]),
                    "paired": paired_t_test(finals[name], finals[BASELINE]),
                }
    return out


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("saving") is None:
        return "not reached"
    text = f"{100 * entry['saving']:+.1f}%"
    ci = entry.get("saving_seeds")
    if ci and math.isfinite(ci[1]):
        text += f" (seeds {100 * ci[0]:+.1f} ± {100 * ci[1]:.1f})"
    return text


def _lr(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(str(x) for x in seeds)


@dataclass(frozen=True)
class SearchEdge:
    """A search of a tuning run whose best value was the lowest or highest value it tried."""

    search: str
    """``"lr"``: an optimizer's x2 lr search (at the starting embeddings/head lr; AdamW's
    refinement included); ``"aux"``: the shared embeddings/head lr's search."""
    optimizer: str | None
    """The optimizer searched (None for ``"aux"``)."""
    value: float
    """The search's best value."""
    side: str
    """``"lowest"`` or ``"highest"``: no value beyond it was tried in that search."""

    def describe(self) -> str:
        what = ("the shared embeddings/head lr search" if self.search == "aux"
                else f"{self.optimizer}'s lr search")  # fmt: skip
        return f"{what} ended on its {self.side} value, {self.value:g}"


def _run_scores(runs: Iterable[dict[str, Any]], optimizer: str, adamw_lr: float | None,
                phase: str | None = None, score: str = "final") -> dict[float, float]:
    """lr -> score of a summary's tuning runs of ``optimizer`` at embeddings/head lr
    ``adamw_lr`` (``phase``: only the runs first trained in that phase, e.g. ``"lr"``, the x2
    search without the sqrt 2 refinement): the mean loss (``score``: final or lowest) over the
    seeds run, inf where one diverged."""
    losses: dict[float, list[float]] = {}
    for r in runs:
        if (r["optimizer"] == optimizer and r["adamw_lr"] == adamw_lr
                and (phase is None or r.get("phase") == phase)):  # fmt: skip
            losses.setdefault(r["lr"], []).append(training_loss(r, score))
    return {lr: sum(v) / len(v) for lr, v in losses.items()}


def _score_rule(summary: dict[str, Any]) -> str:
    """The summary's :attr:`TuneProtocol.score` (older summaries: ``"final"``)."""
    return summary.get("protocol", {}).get("score", "final")


def search_edges(summary: dict[str, Any]) -> list[SearchEdge]:
    """The searches of a :func:`run_tune` summary whose best value lies on their edge.

    Read from the summary's tuning runs (scores: the mean over the tuning seeds, inf where one
    diverged): an optimizer's lr search is its runs at the embeddings/head lr it started from
    (none for AdamW); the embeddings/head search, the values its judges were trained at, the
    chosen one being the shared value. A search with fewer than two values has no edge. These
    are the x2 searches, which step past their grid's edge while their best lies there, at most
    ``max_extend`` times: a best still on the edge may be beaten by a value beyond it. A matrix
    lr's sqrt 2 refinement at the shared embeddings/head lr is a local check around the x2
    search's best (its neighbours beyond were scored, at the starting embeddings/head lr), and
    picks one of its ends about half the time: it is not reported.
    """
    runs = summary.get("tuning_runs", [])
    shared = summary.get("settings", {}).get("shared", {})

    def edge(search: str, name: str | None, best: float, tried: Iterable[float]) -> None:
        tried = set(tried)
        if len(tried) >= 2 and best in (min(tried), max(tried)):
            side = "lowest" if best == min(tried) else "highest"
            edges.append(SearchEdge(search, name, best, side))

    edges: list[SearchEdge] = []
    for name in shared:
        first = _run_scores(runs, name, None if name == "adamw" else summary.get("aux_start"),
                            score=_score_rule(summary))
        if first:
            edge("lr", name, _best_of(first), first)
    judges = set(summary.get("judges") or [])
    shared_aux = summary.get("shared_aux")
    if shared_aux is not None:
        tried = {r["adamw_lr"] for r in runs if r["optimizer"] in judges}
        edge("aux", None, shared_aux, tried - {None})
    return edges


def _marked_lr(value: float | None, edges: Sequence[SearchEdge]) -> str:
    """An lr for a table, marked when a search behind it ended on its edge."""
    return _lr(value) + (" (edge)" if edges else "")


def _grid_name(factor: float) -> str:
    """A grid's ratio as the tables say it: "x2", "sqrt 2", or "x" and the number."""
    return "sqrt 2" if math.isclose(factor, math.sqrt(2)) else f"x{factor:g}"


def _edge_lines(summary: dict[str, Any]) -> list[str]:
    """Sentences for :func:`tune_tables` naming the searches that ended on their edge."""
    edges = search_edges(summary)
    if not edges:
        return []
    protocol = summary.get("protocol", {})
    lines = ["", "Searches that ended on their edge (a value beyond the best was not tried, so it "
                 "may score better): " + "; ".join(e.describe() for e in edges) + "."]
    if protocol.get("grid_points", 3) > 1:
        lines[-1] += (f" A {_grid_name(protocol.get('grid_factor', 2.0))} search takes at most "
                      f"`--max-extend` steps past its grid (this run: "
                      f"{protocol.get('max_extend', '?')}); `--resume` with a larger one "
                      f"continues it.")
    else:
        lines[-1] += " One-point grids never step past their edge: a wider `--grid-points` does."
    return lines


def _repeats_data(budget: dict[str, Any]) -> bool:
    """Whether a training reads its text more than once: past one pass the losses measure how
    each optimizer overfits, not only how fast it optimizes. (Older summaries lack ``passes``.)"""
    return (budget.get("passes") or 0.0) > 1


def _passes(budget: dict[str, Any]) -> str:
    """How many times a training reads its text, said where it is more than once."""
    if not _repeats_data(budget):
        return ""
    passes = budget["passes"]
    return (f"; {passes:.1f} passes over the {budget['train_tokens']:,} training tokens: "
            f"repeated data")


def _is_check(summary: dict[str, Any]) -> bool:
    protocol = summary.get("protocol", {})
    return protocol.get("tune_aux", True) is False and protocol.get("refine_factor") == 1


def _aux_origin(summary: dict[str, Any]) -> str:
    if summary.get("shared_aux") is None:
        return "no matrix optimizer"
    if summary.get("protocol", {}).get("tune_aux", True) is False:
        return "carried over, not searched"
    return f"chosen by {', '.join(summary['judges'])}"


def _check_line(summary: dict[str, Any]) -> str:
    """Per optimizer, whether the lr it was configured with (the carried-over value, the
    centre of its check) held: the best of the check, or where the check moved to."""
    grid = _grid_name(summary["protocol"]["grid_factor"])
    verdicts = []
    for name, st in summary["settings"].get("shared", {}).items():
        aux = None if name == "adamw" else summary.get("aux_start")
        scores = _run_scores(summary["tuning_runs"], name, aux, phase="lr",
                             score=_score_rule(summary))
        centre = summary.get("lr_start", {}).get(name)
        if centre not in scores or st["lr"] not in scores:
            continue
        if math.isinf(scores[st["lr"]]):
            verdict = "diverged at every lr tried"
        elif st["lr"] == centre:
            verdict = "held"
        else:
            # How much better the new value scores says whether the move matters.
            gain = scores[centre] - scores[st["lr"]]
            by = "the carried value diverged" if math.isinf(gain) else f"scoring {gain:.4f} lower"
            verdict = f"moved to {st['lr']:g} (x{st['lr'] / centre:.3g}, {by})"
        verdicts.append(f"{name} {centre:g} {verdict}")
    steps = summary["protocol"]["grid_points"] // 2
    either = "one grid step" if steps == 1 else f"{steps} grid steps"
    return (f"A {grid} check of carried-over settings (`--check`): each lr scored at its "
            f"configured value and {either} either side, the embeddings/head lr kept. "
            + "; ".join(verdicts) + ".")


def tune_tables(summary: dict[str, Any]) -> str:
    """The markdown tables of one :func:`run_tune` summary."""
    budget = summary["budget"]
    lines = [f"**{summary['preset']}** on {summary['data']}: {summary['n_params']:,} parameters, "
             f"{budget['steps']:,} steps, {budget['tokens']:,} tokens "
             f"({budget['achieved_tokens_per_param']:.1f} per parameter{_passes(budget)}); "
             f"tuning seeds ({_seeds(summary['protocol']['tune_seeds'])}), final seeds "
             f"({_seeds(summary['protocol']['final_seeds'])}); shared embeddings/head lr "
             f"{_lr(summary['shared_aux'])} ({_aux_origin(summary)})."]
    rule = _score_rule(summary)
    if rule == "lowest":
        lines[-1] += (" Tuning scored each seed by the lowest point of its validation curve "
                      "(`--score lowest`: the loss early stopping keeps).")
    if _is_check(summary):
        lines += ["", _check_line(summary)]
    # Past one pass the final loss ranks overfitting too, and a lowest-point score tuned for
    # the bottom of each curve: show where each curve bottomed out.
    show_lowest = _repeats_data(budget) or rule == "lowest"
    explained = False  # the lowest-point column, said once
    titles = {"shared": "shared embeddings/head/gains lr (the fair table)",
              "separate": "each matrix optimizer's own embeddings/head/gains lr"}  # fmt: skip
    for kind, analysis in summary["finals"].items():
        settings = summary["settings"][kind]
        if kind == "separate" and settings == summary["settings"].get("shared"):
            lines += ["", "Each matrix optimizer's own best embeddings/head/gains lr is the "
                          "shared one: the separate-tuning table is the same."]  # fmt: skip
            continue
        lowest_header = " lowest during training (step) |" if show_lowest else ""
        lines += ["", f"Final test loss, {titles[kind]}:", "",
                  "| optimizer | lr | emb/head lr | validation score | test loss (mean ± 95% CI) "
                  f"|{lowest_header} saving vs AdamW | saving vs Muon |",
                  "|---|---|---|---|---|" + "---|" * (3 if show_lowest else 2)]  # fmt: skip
        for name, st in settings.items():
            o = analysis["optimizers"][name]
            loss = _final_cell(o)
            lowest = f" {_lowest_cell(o)} |" if show_lowest else ""
            lines.append(
                f"| {name} | {st['lr']:g} | {_lr(st['adamw_lr'])} | "
                f"{st['validation_score']:.4f} | {loss} |{lowest} "
                f"{'—' if name == 'adamw' else _pct(o.get('vs_adamw'))} | "
                f"{'—' if name in ('adamw', BASELINE) else _pct(o.get('vs_muon'))} |"
            )
        if show_lowest and not explained:
            explained = True
            lines += ["", ("On repeated data the final loss also counts how far a run has "
                           "overfit: " if _repeats_data(budget) else "")
                      + "*lowest during training* is the lowest point of the seed-mean test "
                        "curve and the step it comes at; a final loss far above it, from an "
                        "early step, is overfitting, not slow learning."]
        if analysis["vs_muon"]:
            lines += ["", "| vs Muon | test loss difference | Welch t (df) | Welch p | "
                      "paired t (df) | paired p |", "|---|---|---|---|---|---|"]  # fmt: skip
            for name, t in analysis["vs_muon"].items():
                w, pt = t["welch"], t["paired"]
                lines.append(f"| {name} | {w['mean_diff']:+.4f} | {w['t']:.2f} ({w['df']:.1f}) "
                             f"| {w['p']:.3f} | {pt['t']:.2f} ({pt['df']}) | {pt['p']:.3f} |")
    lines += _edge_lines(summary)
    lines += ["", "Every tuning run (validation half; score = mean over the tuning seeds):", "",
              f"| optimizer | lr | emb/head lr | phase | seeds' {rule} losses | score |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for r in summary["tuning_runs"]:
        grouped.setdefault((r["optimizer"], r["lr"], r["adamw_lr"]), []).append(r)
    for (name, lr, aux), rs in sorted(grouped.items(), key=lambda kv: (
            kv[0][0], kv[0][2] or 0.0, kv[0][1])):  # fmt: skip
        losses = [training_loss(r, rule) for r in rs]
        cells = ", ".join("diverged" if math.isinf(x) else f"{x:.4f}" for x in losses)
        lines.append(f"| {name} | {lr:g} | {_lr(aux)} | {rs[0]['phase']} | {cells} | "
                     f"{sum(losses) / len(losses):.4f} |")
    lines += ["", f"{summary['trainings']} trainings, {summary['train_time_s'] / 3600:.2f} "
              f"CPU-thread hours of training (evaluation excluded); tokens/s per run: "
              + ", ".join(f"{k} {v:,.0f}" for k, v in summary["tokens_per_s"].items()) + "."]
    return "\n".join(lines)


def write_tune_plot(summary: dict[str, Any], path: str | Path) -> Path:
    """``tune.png``: validation score against lr per optimizer (at its shared setting's
    embeddings/head lr) and the retrained settings' seed-mean test curves."""
    from .report import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    shared = summary["settings"].get("shared", {})
    for name, st in shared.items():
        scores = _run_scores(summary["tuning_runs"], name, st["adamw_lr"],
                             score=_score_rule(summary))
        xs = sorted(scores)
        ys = [scores[x] for x in xs]
        left.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], marker="o",
                  label=name)  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("lr (matrix lr for Muon/NorMuon)")
    left.set_ylabel(f"validation loss ({_score_rule(summary)}), mean of tuning seeds")
    for name, o in summary["finals"].get("shared", {"optimizers": {}})["optimizers"].items():
        if not o.get("diverged"):
            right.plot(o["val_steps"], o["val_mean"], label=f"{name} ({o['mean']:.3f})")
    right.set_xlabel("step")
    right.set_ylabel("test loss, mean of final seeds")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"normuon tune: {summary['preset']}, {summary['data'].split(',')[0]}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ the command


def run_tune(
    spec: RunSpec,
    final_spec: RunSpec,
    data: TokenData,
    final_data: TokenData,
    protocol: TuneProtocol,
    *,
    out: str | Path,
    jobs: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the protocol (module docstring) and write ``summary.json`` and ``tune.md``.

    ``spec``: resolved with the validation half ``data`` and the tuning seeds; ``final_spec``:
    the same settings with the test half ``final_data`` and the final seeds (:func:`resolve_tune`
    makes both). ``jobs`` trainings run at once in worker processes (one thread each).
    ``resume`` continues from ``out``'s ledger (and any run folder's checkpoint).
    """
    _need_spec(spec, "run_tune")
    protocol.validate()
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if spec.world_size != 1:
        raise ValueError("normuon tune trains many small runs side by side: run it without "
                         "torchrun (use --jobs)")  # fmt: skip
    out = Path(out)
    identity = {"tune": spec.to_json(), "final_data": final_spec.data,
                "optimizers": list(spec.selected), "protocol": protocol.to_json()}  # fmt: skip
    if resume:
        _accept_resumable_changes(out / "config.json", identity)
    _claim_folder(out, identity, resume=resume, overwrite=overwrite)
    start = time.perf_counter()
    # A resumed protocol's wall time adds to that of the sittings before it.
    earlier = _earlier_wall_time(out / "summary.json") if resume else 0.0
    tuner = _Tuner(spec, final_spec, data, final_data, protocol, out, jobs=jobs,
                   options={"device": device, "diagnostics_every": 0}, progress=progress,
                   log=log)  # fmt: skip
    if not protocol.tune_aux:  # a full protocol searches that lr: nothing goes unused
        unused = [f"{n}.adamw_lr={spec.optimizers[n].adamw_lr:g}" for n in tuner.matrix
                  if _value(spec.optimizers[n].adamw_lr) != tuner.aux0]  # fmt: skip
        if unused:
            log(f"note: every matrix optimizer trains at embeddings/head lr {tuner.aux0:g} "
                f"({tuner.aux0_from}.adamw_lr); {', '.join(unused)} is not used")
    tuner.run()
    summary = tuner.summary()
    summary["wall_time_s"] = earlier + time.perf_counter() - start
    summary["tables"] = tune_tables(summary)
    write_json(out / "summary.json", summary)
    (out / "tune.md").write_text(summary["tables"] + "\n")
    return summary


def _earlier_wall_time(path: Path) -> float:
    try:
        return float(json.loads(path.read_text()).get("wall_time_s", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0  # no (readable) summary yet: the ledger has the trainings either way


def saved_score(out: str | Path) -> str | None:
    """The :attr:`TuneProtocol.score` a tune folder ran with (``"final"`` for a folder from
    before the field), or None without a readable ``config.json``: what a ``--resume`` that
    does not name a ``--score`` keeps, so that leaving it out does not rescore the ledger."""
    try:
        saved = json.loads((Path(out) / "config.json").read_text())
        return str(saved["protocol"].get("score", "final"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


#: Protocol fields a resumed protocol may change: every training in the ledger stays valid
#: (other final seeds add trainings; a larger ``max_extend`` lets a search that stopped on its
#: edge go on from the same scores; another ``score`` rescores the ledger's trainings, and its
#: searches go on from the new scores, training only what they then ask for).
RESUMABLE_CHANGES = ("final_seeds", "max_extend", "score")
_PROTOCOL_DEFAULTS = json.loads(json.dumps(TuneProtocol().to_json()))  # lists, as read back


def _accept_resumable_changes(path: Path, identity: dict[str, Any]) -> None:
    """A resumed protocol may change the fields of :data:`RESUMABLE_CHANGES`. If ``path`` (a
    folder's config.json) differs from ``identity`` only there, or lacks protocol fields added
    later that ``identity`` holds at their defaults, it is rewritten. A smaller
    ``max_extend`` is refused: its searches would stop short of values already trained, and
    could choose a worse one while the ledger holds a better."""
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return  # _claim_folder reports it
    before = (saved.get("protocol") or {}).get("max_extend") if isinstance(saved, dict) else None
    after = identity["protocol"]["max_extend"]
    if isinstance(before, int) and after < before:
        raise ValueError(f"--max-extend {after} is smaller than the {before} this folder's "
                         f"searches ran with ({path}): a narrower search could pass over values "
                         f"already trained; resume with --max-extend {before} or more")

    def fixed_part(config: dict[str, Any]) -> Any:
        config = json.loads(json.dumps(config))
        if isinstance(config.get("protocol"), dict):
            # A field added to the protocol since the folder was made ran at its default.
            config["protocol"] = {**_PROTOCOL_DEFAULTS, **config["protocol"]}
            for field in RESUMABLE_CHANGES:
                config["protocol"].pop(field, None)
        return config

    if fixed_part(saved) == fixed_part(identity):
        write_json(path, identity)


def resolve_tune(cfg, data_path, *, optimizers: Sequence[str], protocol: TuneProtocol):
    """(validation spec, test spec, validation data, test data) for :func:`run_tune`: the
    corpus loaded with ``2 * train.val_fraction`` held out, cut in halves; settings validated
    once, the test spec derived from the valid one."""
    from .data import check_length, holdout_halves, load_data
    from .spec import resolve_spec

    protocol.validate()
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    fraction = cfg.train.val_fraction
    if not (isinstance(fraction, float) and 0 < fraction < 0.25):
        raise ValueError(f"train.val_fraction={fraction!r}: tune holds out twice it (validation "
                         f"and test halves), so it must be in (0, 0.25)")  # fmt: skip
    val, test = holdout_halves(load_data(data_path, 2 * fraction))
    check_length(test.val, cfg.train.seq_len, "test")
    spec, val = resolve_spec(cfg, val, optimizers=optimizers, seeds=protocol.tune_seeds)
    final = dataclasses.replace(spec, data=test.source, seeds=tuple(protocol.final_seeds))
    return spec, final, val, test


# ------------------------------------------------------------------ across sizes and corpora


def _corpus(summary: dict[str, Any]) -> str:
    """A short name of a summary's data: ``embedded Shakespeare``, a text file's name."""
    source = summary["data"].split(",")[0].split(" (")[0]
    return Path(source.removeprefix("text file ")).name if source.startswith("text file ") \
        else source


def _fmt_passes(passes: float | None) -> str:
    return "—" if passes is None else f"{passes:.2f}" if passes < 10 else f"{passes:.0f}"


def _final_cell(analysis: dict[str, Any] | None) -> str:
    """An optimizer's final test loss for a table: mean ± 95% CI, "diverged", or "—"."""
    if analysis is None:
        return "—"
    return "diverged" if analysis.get("diverged") else \
        f"{analysis['mean']:.4f} ± {analysis['ci95']:.4f}"


def _lowest_cell(analysis: dict[str, Any] | None) -> str:
    """The lowest point of an optimizer's seed-mean test curve and its step, or "—"."""
    if not analysis or analysis.get("diverged") or not analysis.get("val_mean"):
        return "—"
    curve = analysis["val_mean"]
    at = min(range(len(curve)), key=curve.__getitem__)
    return f"{curve[at]:.4f} ({analysis['val_steps'][at]:,})"


def _trainings_line(summaries: Sequence[dict[str, Any]]) -> str:
    """The trainings and CPU-thread hours behind a table of several summaries."""
    hours = sum(s["train_time_s"] for s in summaries) / 3600
    return (f"{sum(s['trainings'] for s in summaries)} trainings, {hours:.2f} CPU-thread hours "
            f"of training (evaluation excluded).")


def _preset_cell(summary: dict[str, Any]) -> str:
    """A rung's preset for the ladder tables, marked where tuning scored the lowest points (its
    lrs were chosen for early stopping, not for the final loss)."""
    rule = _score_rule(summary)
    return summary["preset"] + ("" if rule == "final" else f" (`--score {rule}`)")


def ladder_report(summaries: Sequence[dict[str, Any]], plot: str | Path | None = None) -> str:
    """Markdown tables across :func:`run_tune` summaries (corpora x model sizes): NorMuon
    against Muon under the shared-aux protocol and under separate tuning, and the tuned lrs per
    size (learning-rate transfer); ``plot``: the saving against parameters beside the paper's
    points (:data:`PAPER_SAVINGS_VS_MUON`)."""
    if not summaries:
        raise ValueError("ladder_report needs at least one summary")
    rows = sorted(summaries, key=lambda s: (_corpus(s), s["n_params"]))
    lines = ["| corpus | preset | params | tokens/param | passes over the text | AdamW | Muon "
             "| NorMuon | NorMuon saving vs Muon | paired p | Welch p "
             "| separate-aux NorMuon − Muon |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in rows:
        fair = s["finals"].get("shared", {"optimizers": {}, "vs_muon": {}})
        cells = []
        for name in ("adamw", "muon", "normuon"):
            cells.append(_final_cell(fair["optimizers"].get(name)))
        test = fair["vs_muon"].get("normuon")
        saving = _pct(fair["optimizers"].get("normuon", {}).get("vs_muon"))
        sep = s["finals"].get("separate", {}).get("vs_muon", {}).get("normuon")
        lines.append(
            f"| {_corpus(s)} | {_preset_cell(s)} | {s['n_params']:,} | "
            f"{s['budget']['achieved_tokens_per_param']:.1f} | "
            f"{_fmt_passes(s['budget'].get('passes'))} | {' | '.join(cells)} | {saving} | "
            f"{'—' if not test else format(test['paired']['p'], '.3f')} | "
            f"{'—' if not test else format(test['welch']['p'], '.3f')} | "
            f"{'—' if not sep else format(sep['welch']['mean_diff'], '+.4f')} |"
        )
    repeated = [s for s in rows if _repeats_data(s["budget"])]
    if repeated:
        lines += ["", "Where a rung reads its text more than once the final loss also counts "
                      "how far each optimizer has overfit: the lowest point of each seed-mean "
                      "test curve (shared protocol) and the step it comes at.", "",
                  "| corpus | preset | passes | steps | AdamW lowest (step) | Muon lowest (step) "
                  "| NorMuon lowest (step) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in repeated:
            fair = s["finals"].get("shared", {"optimizers": {}})["optimizers"]
            cells = [_lowest_cell(fair.get(n)) for n in ("adamw", "muon", "normuon")]
            lines.append(f"| {_corpus(s)} | {_preset_cell(s)} | "
                         f"{_fmt_passes(s['budget']['passes'])} | {s['budget']['steps']:,} | "
                         f"{' | '.join(cells)} |")
    lines += ["", "Tuned learning rates (shared protocol; matrix lr for Muon and NorMuon):", "",
              "| corpus | preset | params | AdamW lr | Muon lr | NorMuon lr | shared emb/head lr |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    any_edge = False
    for s in rows:
        st = s["settings"].get("shared", {})
        edges = search_edges(s)
        any_edge = any_edge or bool(edges)
        lrs = [_marked_lr(st[n]["lr"], [e for e in edges if e.optimizer == n]) if n in st
               else "—" for n in ("adamw", "muon", "normuon")]  # fmt: skip
        aux = _marked_lr(s["shared_aux"], [e for e in edges if e.search == "aux"])
        lines.append(f"| {_corpus(s)} | {_preset_cell(s)} | {s['n_params']:,} | "
                     f"{' | '.join(lrs)} | {aux} |")
    if any_edge:
        lines += ["", "(edge): the x2 search (or sqrt 2 check) behind that value (a matrix lr's: "
                      "at the starting embeddings/head lr) ended on the lowest or highest value "
                      "it tried, its steps past the grid spent, so a better value may lie "
                      "beyond it."]
    # Learning-rate transfer: how far each optimizer's tuned lr moves across the sizes of one
    # corpus (1.0: it stays put; the grid resolution is sqrt 2 = 1.41), among rungs tuned by
    # the same score only.
    for corpus, rule in sorted({(_corpus(s), _score_rule(s)) for s in rows}):
        sized = [s for s in rows if _corpus(s) == corpus and _score_rule(s) == rule]
        if len(sized) < 2:
            continue
        spreads = []
        for name in ("adamw", "muon", "normuon"):
            lrs = [s["settings"]["shared"][name]["lr"] for s in sized
                   if name in s["settings"].get("shared", {})]  # fmt: skip
            if len(lrs) > 1:
                spreads.append(f"{name} {max(lrs) / min(lrs):.2f}x")
        if spreads:
            scored = "" if rule == "final" else f" (`--score {rule}`)"
            lines += ["", f"{corpus}{scored}: tuned lr max/min across {len(sized)} sizes: "
                          + ", ".join(spreads) + "."]
    lines += ["", _trainings_line(rows)]
    if plot:
        _plot_ladder(rows, Path(plot))
    return "\n".join(lines)


def _plot_ladder(rows: Sequence[dict[str, Any]], path: Path) -> None:
    from .report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    missed, labelled = False, 0
    for corpus in sorted({_corpus(s) for s in rows}):
        xs, ys, es, misses, notes = [], [], [], [], []
        for s in rows:
            if _corpus(s) != corpus:
                continue
            entry = (s["finals"].get("shared", {}).get("optimizers", {}).get("normuon", {})
                     .get("vs_muon") or {})  # fmt: skip
            if _repeats_data(s["budget"]):
                notes.append((s["n_params"], f"{s['budget']['passes']:.0f} passes"))
            if entry.get("saving") is None:
                misses.append(s["n_params"])  # NorMuon's curve ends above Muon's final loss
                continue
            xs.append(s["n_params"])
            ys.append(100 * entry["saving"])
            ci = entry.get("saving_seeds")
            es.append(100 * ci[1] if ci and math.isfinite(ci[1]) else 0.0)
        line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4,
                           label=f"this harness, {corpus}")  # fmt: skip
        color = line[0].get_color()
        if misses:
            missed = True
            ax.plot(misses, [0.0] * len(misses), "v", color=color, mfc="none", ms=9)
        for x, text in notes:
            # One row of labels per corpus, so two corpora's labels at one size do not overlap.
            ax.annotate(text, (x, 0.0), textcoords="offset points",
                        xytext=(6, -14 - 9 * labelled), fontsize=7, color=color)  # fmt: skip
        labelled += bool(notes)
    if missed:
        ax.plot([], [], "v", color="gray", mfc="none",
                label="not reached: NorMuon ends above Muon's final loss")  # fmt: skip
    paper = sorted(PAPER_SAVINGS_VS_MUON.items())
    ax.plot([p for p, _ in paper], [100 * v for _, v in paper], "s--", color="black",
            label="the paper (124M, 350M: Muon-rescale; 1.1B: to AdamW's loss)")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log")
    if labelled:
        # Room under the zero line for the rows of pass labels.
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.07 * (high - low) * labelled), high)
    ax.set_xlabel("parameters")
    ax.set_ylabel("NorMuon's saving in steps vs Muon (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("NorMuon vs Muon at Muon's final loss, shared embeddings/head lr")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
