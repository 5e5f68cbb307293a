"""Task descriptions: what each task predicts and how it is scored.

A `Task` is plain configuration; everything the model needs per task (output
size, loss, metrics, weight) follows from it. A `TaskSet` is the ordered
collection a model is built for: the position of a task in the set is its
integer *task id*, the value examples carry in their `task` input.
"""

import dataclasses
from typing import Iterable, Sequence

KINDS = ("multiclass", "binary", "regression")

# Losses the model evaluates for every (example, task) pair in one vectorised
# pass; a task picks one of those valid for its kind.
LOSSES = {
    "multiclass": ("sparse_categorical_crossentropy",),
    "binary": ("binary_crossentropy",),
    "regression": ("mse", "mae", "huber"),
}
DEFAULT_LOSS = {
    "multiclass": "sparse_categorical_crossentropy",
    "binary": "binary_crossentropy",
    "regression": "mse",
}
METRICS = {
    "multiclass": ("accuracy",),
    "binary": ("accuracy",),
    "regression": ("mae", "mse"),
}
DEFAULT_METRICS = {
    "multiclass": ("accuracy",),
    "binary": ("accuracy",),
    "regression": ("mae",),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Args:
        name: unique name, used in logs (`"<name>/accuracy"`), reports and
            serving signatures. Letters, digits, `_`, `-`, `.`, `(`, `)`.
        kind: `"multiclass"` (integer label in `[0, num_outputs)`),
            `"binary"` (label 0 or 1, one logit) or `"regression"`
            (real-valued target of `num_outputs` values).
        num_outputs: number of classes (multiclass), 1 (binary), or the
            target width (regression).
        loss: one of `LOSSES[kind]`; defaults to cross-entropy for
            classification and `"mse"` for regression.
        metrics: names from `METRICS[kind]`; default accuracy for
            classification, `"mae"` for regression.
        weight: this task's weight in the training objective.

    Example:

    >>> Task("Latin", "multiclass", 26)
    Task(name='Latin', kind='multiclass', num_outputs=26, ...)
    """

    name: str
    kind: str = "multiclass"
    num_outputs: int = 2
    loss: str | None = None
    metrics: tuple = ()
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task name must be a non-empty string, got {self.name!r}.")
        bad = sorted(set(c for c in self.name if not (c.isalnum() or c in "_-.()")))
        if bad:
            raise ValueError(
                f"Task name {self.name!r} contains {''.join(bad)!r}; use letters, digits "
                "and _-.() only (names become metric keys and serving signature names)."
            )
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind {self.kind!r} is not one of {KINDS}.")
        n = self.num_outputs
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"Task {self.name!r}: num_outputs must be a positive int, got {n!r}.")
        if self.kind == "multiclass" and n < 2:
            raise ValueError(
                f"Task {self.name!r}: a multiclass task needs num_outputs >= 2 classes, got {n}; "
                "use kind='binary' for a yes/no task."
            )
        if self.kind == "binary" and n != 1:
            raise ValueError(
                f"Task {self.name!r}: a binary task has exactly one logit (num_outputs=1), got {n}."
            )
        loss = self.loss or DEFAULT_LOSS[self.kind]
        if loss not in LOSSES[self.kind]:
            raise ValueError(
                f"Task {self.name!r}: loss {loss!r} is not available for kind {self.kind!r}; "
                f"choose one of {LOSSES[self.kind]}."
            )
        object.__setattr__(self, "loss", loss)
        metrics = tuple(self.metrics) or DEFAULT_METRICS[self.kind]
        for m in metrics:
            if m not in METRICS[self.kind]:
                raise ValueError(
                    f"Task {self.name!r}: metric {m!r} is not available for kind {self.kind!r}; "
                    f"choose from {METRICS[self.kind]}."
                )
        object.__setattr__(self, "metrics", metrics)
        if not (float(self.weight) >= 0.0):
            raise ValueError(f"Task {self.name!r}: weight must be >= 0, got {self.weight!r}.")
        object.__setattr__(self, "weight", float(self.weight))

    @property
    def label_width(self):
        """How many target values one example carries for this task."""
        return self.num_outputs if self.kind == "regression" else 1

    def get_config(self):
        return dataclasses.asdict(self) | {"metrics": list(self.metrics)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["metrics"] = tuple(config.get("metrics", ()))
        return cls(**config)


class TaskSet(Sequence):
    """An ordered, name-unique collection of tasks; a task's index is its id.

    Args:
        tasks: `Task` objects, or their config dicts.

    Example:

    >>> tasks = TaskSet([Task("a", "multiclass", 10), Task("b", "binary", 1)])
    >>> tasks.index("b"), tasks.max_outputs
    (1, 10)
    """

    def __init__(self, tasks: Iterable):
        items = []
        for t in tasks:
            items.append(t if isinstance(t, Task) else Task.from_config(t))
        if not items:
            raise ValueError("A TaskSet needs at least one task.")
        names = [t.name for t in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Task names must be unique; repeated: {dupes}.")
        self._tasks = tuple(items)
        self._index = {t.name: i for i, t in enumerate(items)}

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._tasks[self.index(key)]
        return self._tasks[key]

    def __len__(self):
        return len(self._tasks)

    def __eq__(self, other):
        return isinstance(other, TaskSet) and self._tasks == other._tasks

    def __repr__(self):
        return f"TaskSet({len(self)} tasks: {', '.join(self.names[:5])}{', ...' if len(self) > 5 else ''})"

    def index(self, name):
        """The id of the task called `name`."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"No task named {name!r}; tasks are {list(self.names)}.") from None

    @property
    def names(self):
        return tuple(t.name for t in self._tasks)

    @property
    def max_outputs(self):
        """Width of the padded output every task's logits fit into."""
        return max(t.num_outputs for t in self._tasks)

    @property
    def label_width(self):
        """Width of the padded target tensor (1 unless a regression task has more)."""
        return max(t.label_width for t in self._tasks)

    def get_config(self):
        return [t.get_config() for t in self._tasks]

    @classmethod
    def from_config(cls, config):
        return cls(config)
