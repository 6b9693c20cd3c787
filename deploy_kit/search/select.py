"""Selection: re-score the best candidates on the validation split, pick one, and only then
measure it on the test split (the research system selected on the test set; DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

from deploy_kit.data import Dataset
from deploy_kit.search.trace import Evaluation
from deploy_kit.teacher import Teacher
from deploy_kit.train import accuracy, predict


@dataclass(frozen=True)
class Rescored:
    evaluation: Evaluation
    val_acc: float
    val_drop: float

    def to_json(self, rank: int) -> dict:
        s = self.evaluation.score
        return {"rank": rank, "evaluation": self.evaluation.index, "reward": round(s.reward, 6),
                "kl": round(s.kl, 6), "at": round(s.at, 8), "val_acc_student": self.val_acc,
                "val_acc_drop": self.val_drop, "layers": {n: l.to_json() for n, l in self.evaluation.candidate.items()}}


@dataclass(frozen=True)
class Selection:
    chosen: Rescored
    ranked: list[Rescored]  # by reward, as re-scored
    val_acc_teacher: float
    note: str  # the research system's `selection` string


def split_accuracy(teacher: Teacher, ds: Dataset, split: str, luts=None) -> float:
    model = teacher.student(luts) if luts else teacher.model
    s = ds.split(split)
    return accuracy(predict(model, s, ds), s.labels)


def select(teacher: Teacher, ds: Dataset, top: list[Evaluation], max_acc_drop: float,
           base: Teacher | None = None) -> Selection:
    """The highest-reward candidate whose validation drop is within `max_acc_drop` points,
    else the most accurate one on validation. Candidates run with `base`'s weights (a fine-tuned
    student being re-searched), default the teacher's; the drop is against the teacher."""
    val_teacher = split_accuracy(teacher, ds, "val")
    ranked = []
    for ev in top:
        acc = split_accuracy(base or teacher, ds, "val", ev.candidate)
        ranked.append(Rescored(ev, acc, round(val_teacher - acc, 2)))
    within = [r for r in ranked if r.val_drop <= max_acc_drop]
    if within:
        chosen = within[0]
        note = f"constrained-best (val drop={chosen.val_drop:.2f}% <= {max_acc_drop}%)"
    else:
        chosen = max(ranked, key=lambda r: r.val_acc)
        note = f"best-accuracy (no candidate met {max_acc_drop}% on val, min val drop={chosen.val_drop:.2f}%)"
    return Selection(chosen, ranked, val_teacher, note)
