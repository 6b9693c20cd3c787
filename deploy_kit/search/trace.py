"""The evaluation budget and the record of every candidate scored, shared by all methods.

Methods only propose candidates; `Trace.evaluate` scores them, counts them against the budget,
keeps the best, and feeds the episode log and the progress bar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from deploy_kit.lut import LayerLUT
from deploy_kit.search.reward import RewardModel, Score

Candidate = dict[str, LayerLUT]


@dataclass(frozen=True)
class Evaluation:
    index: int  # 1-based evaluation number
    candidate: Candidate
    score: Score
    best_reward: float  # best reward so far, including this one
    seconds: float  # since the search started; only in the log, never in result.json

    def log_entry(self) -> dict:
        s = self.score
        return {"evaluation": self.index, "reward": round(s.reward, 6), "kl": round(s.kl, 6), "at": round(s.at, 8),
                "agreement": round(s.agreement, 2), "acc_drop": round(s.acc_drop, 2),
                "best_reward": round(self.best_reward, 6), "seconds": round(self.seconds, 3),
                "layers": {n: [l.t1, l.v1, l.t2, l.v2, l.tmax] for n, l in self.candidate.items()}}


class Trace:
    def __init__(self, reward: RewardModel, budget: int, on_evaluation: Callable[[Evaluation], None] | None = None):
        self.reward, self.budget, self.on_evaluation = reward, budget, on_evaluation
        self.evaluations: list[Evaluation] = []
        self.start = time.perf_counter()

    @property
    def remaining(self) -> int:
        return self.budget - len(self.evaluations)

    @property
    def best(self) -> Evaluation | None:
        return max(self.evaluations, key=lambda e: e.score.reward, default=None)

    def evaluate(self, candidates: list[Candidate]) -> list[Score]:
        """Score up to `remaining` candidates (the rest are dropped: the budget is exact)."""
        candidates = candidates[:self.remaining]
        scores = self.reward.score(candidates) if candidates else []
        best = self.best.score.reward if self.evaluations else float("-inf")
        for cand, score in zip(candidates, scores):
            best = max(best, score.reward)
            ev = Evaluation(len(self.evaluations) + 1, cand, score, best, time.perf_counter() - self.start)
            self.evaluations.append(ev)
            if self.on_evaluation:
                self.on_evaluation(ev)
        return scores

    def top(self, n: int) -> list[Evaluation]:
        """The n best distinct candidates by reward (ties: the earlier evaluation)."""
        seen, out = set(), []
        for ev in sorted(self.evaluations, key=lambda e: (-e.score.reward, e.index)):
            key = tuple(sorted((k, v.t1, v.v1, v.t2, v.v2, v.tmax) for k, v in ev.candidate.items()))
            if key not in seen:
                seen.add(key)
                out.append(ev)
            if len(out) == n:
                break
        return out
