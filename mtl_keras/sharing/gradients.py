"""The Selective Sharing signal: each estimator's gradients, collected in the train step.

Each task head receives only its own task's loss, so the gradient of every
head's *estimator* (the identically shaped part of a `TaskHead`, not its own
output layer) is already among the gradients the training step computes for
the optimizer. `GradientCollector` is a `MultiTaskModel.gradient_observers`
entry: the heads' estimators are stacked variables (row t: head t's, see
`TaskHeads`), so inside the traced step it adds each stacked variable's
gradient to an accumulator of the same shape: collecting the signal of T
tasks costs one add of `[T, P]` values per step, with no extra backward pass
and no per-task `GradientTape`.

Accumulators are `tf.Variable`s created once, up front (creating variables in
a retraced `tf.function` is illegal), that are not trainable, not tracked by
the model (they are not saved with it) and are *sync-on-read with SUM
aggregation*: under a `tf.distribute` strategy each replica adds its local
gradients to its own copy and a read outside the replicas returns their sum,
which is the gradient of the global batch (each replica's loss is its share
of the global mean, see `MultiTaskModel.task_losses`).

Rows are indexed by the head that owns the estimator. After a merge
(`model.set_estimator_of_task`) the tasks of a group share their owner's
estimator, so that row holds the group's summed gradient; rows of heads whose
estimator was dropped stay zero. The observer reads the current owners when
the train function is traced, and the model retraces it on every merge.
"""

import math

import numpy as np
import tensorflow as tf


def _estimator_layout(model):
    """Shapes of one estimator's variables (identical for every head)."""
    if not model.task_heads.hidden_units:
        raise ValueError(
            "Selective Sharing needs task heads with an estimator: build the MultiTaskModel "
            "with head_units=(...) non-empty (e.g. head_units=(128,)); with head_units=() a "
            "head is only its task's output layer and there is nothing to share."
        )
    return [tuple(int(d) for d in v.shape[1:]) for v in model.task_heads.stacked_estimator_variables()]


class GradientCollector:
    """Accumulates the gradient of every task estimator, in the model's train step.

    Args:
        model: a built `MultiTaskModel` with estimator units (`head_units`).

    Attributes:
        layout: shapes of one estimator's variables; a row of `read()` is
            their flattened gradients concatenated in this order.
        size: length of a row (`P`, the estimator's parameter count).

    Example:

    >>> collector = GradientCollector(model).attach()
    >>> model.fit(dataset, epochs=1)
    >>> sums, counts, steps = collector.read()  # [T, P], [T], steps
    >>> collector.detach()
    """

    def __init__(self, model):
        self.model = model
        self.num_tasks = len(model.tasks)
        self.layout = _estimator_layout(model)
        self.size = int(sum(math.prod(s) for s in self.layout))
        on_read = tf.VariableSynchronization.ON_READ
        # Created in the model's strategy scope so that each replica owns a
        # copy; never inside a tf.function.
        with model.distribute_strategy.scope():
            # One accumulator per estimator variable ([T, *shape]) rather than
            # one flat [T, P] row: the step then stacks each variable's
            # gradients once and adds them, without concatenating first.
            self._sums = [
                tf.Variable(
                    tf.zeros((self.num_tasks,) + shape), trainable=False, name=f"sharing_gradient_sums_{i}",
                    synchronization=on_read, aggregation=tf.VariableAggregation.SUM,
                )
                for i, shape in enumerate(self.layout)
            ]
            self._counts = tf.Variable(
                tf.zeros((self.num_tasks,)), trainable=False, name="sharing_example_counts",
                synchronization=on_read, aggregation=tf.VariableAggregation.SUM,
            )
            # Every replica runs every step: their mean is the step count.
            self._steps = tf.Variable(
                0.0, trainable=False, name="sharing_steps",
                synchronization=on_read, aggregation=tf.VariableAggregation.MEAN,
            )

    # ------------------------------------------------------------ attachment
    @property
    def attached(self):
        return any(o is self for o in self.model.gradient_observers)

    def attach(self):
        """Registers the collector as a gradient observer of the model (idempotent).

        An already traced train function is rebuilt so that the next step
        collects. Returns `self`.
        """
        if not self.attached:
            self.model.gradient_observers.append(self)
            self._retrace()
        return self

    def detach(self):
        """Stops collecting (the train function is rebuilt without the collector)."""
        if self.attached:
            self.model.gradient_observers[:] = [o for o in self.model.gradient_observers if o is not self]
            self._retrace()
        return self

    def _retrace(self):
        if self.model.train_function is not None:
            self.model.make_train_function(force=True)

    # ------------------------------------------------------------ in the step
    def __call__(self, variables, grads, step):
        """Adds this step's estimator gradients (runs in the traced train step).

        Args:
            variables: the model's trainable variables.
            grads: their gradients, aligned with `variables`.
            step: the step's `mtl_keras.step.StepContext`.
        """
        position = {id(v): i for i, v in enumerate(variables)}
        for variable, accumulator in zip(self.model.task_heads.stacked_estimator_variables(), self._sums):
            # Row o of a stacked variable's gradient is head o's estimator's;
            # rows of dropped estimators are used by no pair, so they add 0.
            g = grads[position[id(variable)]]
            if g is not None:
                accumulator.assign_add(tf.cast(tf.convert_to_tensor(g), "float32"))
        self._counts.assign_add(
            tf.math.unsorted_segment_sum(
                tf.cast(step.pairs.weights, "float32"), step.pairs.task_ids, self.num_tasks
            )
        )
        self._steps.assign_add(1.0)

    # ------------------------------------------------------------ outside it
    def reset(self):
        """Zeroes the accumulators (call outside the train step, e.g. at an epoch start)."""
        for accumulator in self._sums:
            accumulator.assign(tf.zeros_like(accumulator))
        self._counts.assign(tf.zeros_like(self._counts))
        self._steps.assign(0.0)

    def read(self):
        """The accumulated signal, summed over replicas.

        Returns:
            `(sums, counts, steps)`: `sums [T, P]` float64, row `o` the summed
            gradients of head `o`'s estimator (zero for heads whose estimator
            was dropped); `counts [T]` the weighted number of training
            examples each *task* contributed; `steps` the steps accumulated.
        """
        sums = np.concatenate(
            [np.asarray(a.read_value(), dtype=np.float64).reshape(self.num_tasks, -1) for a in self._sums], axis=1
        )
        counts = np.asarray(self._counts.read_value(), dtype=np.float64)
        steps = int(round(float(self._steps.read_value())))
        return sums, counts, steps
