"""Per-task metrics updated for all tasks at once."""

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="mtl_keras")
class PerTaskMean(keras.metrics.Metric):
    """Running weighted mean of a per-example value, kept separately per task.

    One metric object covers every task: an update is two segment sums over
    the batch's task ids, not one update per task, so its cost does not grow
    with the number of tasks. Its variables are summed across replicas.

    Args:
        task_names: names of all tasks, in task-id order.
        metric: the value's name, e.g. `"accuracy"`; results are reported as
            `"<task>/<metric>"` and `"mean_<metric>"`, the unweighted mean
            over the tasks that have seen at least one example.
        active: optional booleans, one per task: tasks that report this
            metric (e.g. only regression tasks report `"mae"`).
        per_task: whether `result()` lists every task or only the mean.

    Example:

    >>> m = PerTaskMean(["a", "b"], "accuracy")
    >>> m.update_state([1.0, 0.0, 1.0], [0, 1, 1])
    >>> {k: float(v) for k, v in m.result().items()}
    {'a/accuracy': 1.0, 'b/accuracy': 0.5, 'mean_accuracy': 0.75}
    """

    def __init__(self, task_names, metric, active=None, per_task=True, name=None, dtype=None):
        super().__init__(name=name or f"per_task_{metric}", dtype=dtype)
        self.task_names = list(task_names)
        self.metric = metric
        self.active = (
            [True] * len(self.task_names) if active is None else [bool(a) for a in active]
        )
        self.per_task = per_task
        n = len(self.task_names)
        self.totals = self.add_variable(shape=(n,), initializer="zeros", name="totals", aggregation="sum")
        self.counts = self.add_variable(shape=(n,), initializer="zeros", name="counts", aggregation="sum")
        self._active_f = np.asarray(self.active, "float32")

    def update_state(self, values, task_ids, sample_weight=None):
        values = ops.cast(ops.reshape(values, (-1,)), "float32")
        task_ids = ops.cast(ops.reshape(task_ids, (-1,)), "int32")
        weights = (
            ops.ones_like(values)
            if sample_weight is None
            else ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        )
        n = len(self.task_names)
        self.totals.assign_add(ops.segment_sum(values * weights, task_ids, num_segments=n))
        self.counts.assign_add(ops.segment_sum(weights, task_ids, num_segments=n))

    def per_task_values(self):
        """`[T]` means (0 for tasks with no examples) and the `[T]` mask of tasks seen."""
        seen = ops.logical_and(self.counts > 0, ops.convert_to_tensor(self._active_f) > 0)
        means = ops.where(seen, self.totals / ops.maximum(self.counts, 1e-12), 0.0)
        return means, seen

    def result(self):
        means, seen = self.per_task_values()
        seen_f = ops.cast(seen, "float32")
        out = {}
        if self.per_task:
            for i, name in enumerate(self.task_names):
                if self.active[i]:
                    out[f"{name}/{self.metric}"] = means[i]
        out[f"mean_{self.metric}"] = ops.sum(means * seen_f) / ops.maximum(ops.sum(seen_f), 1.0)
        return out

    def reset_state(self):
        self.totals.assign(ops.zeros_like(self.totals))
        self.counts.assign(ops.zeros_like(self.counts))

    def get_config(self):
        return {
            "task_names": self.task_names,
            "metric": self.metric,
            "active": self.active,
            "per_task": self.per_task,
            "name": self.name,
            "dtype": self.dtype,
        }
