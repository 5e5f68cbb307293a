"""TaskHeads: every task's head, which estimator each task uses, and one pass over all pairs."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mtl_keras.layers.task_head import TaskHead
from mtl_keras.task_losses import TaskTable, gather_task_logits
from mtl_keras.tasks import TaskSet


def per_pair_matmul(h, kernels, row):
    """`h[p] @ kernels[row[p]]` for every pair p, with a lean backward pass.

    The forward pass gathers each pair's kernel and applies it (a batched
    matrix-vector product). Left to autodiff, the backward pass would run a
    batched outer product per pair through `einsum` and then scatter the
    per-pair kernel gradients; here the kernels' gradient is formed as one
    broadcast product `h[p] g[p]^T` summed into its row by
    `unsorted_segment_sum`, and the gathered kernels are reused for `h`'s
    gradient. Same values as `einsum("pi,pio->po", h, take(kernels, row))`
    and its gradients, to float rounding (`tests/test_task_heads.py`);
    about half the time of the heads' hidden layer at T = 50
    (docs/BENCHMARKS.md).

    Args:
        h: `[P, in]` features.
        kernels: `[rows, in, out]` stacked kernels.
        row: `[P]` int32, each pair's kernel.

    Returns:
        `[P, out]`.
    """
    rows = kernels.shape[0]

    @tf.custom_gradient
    def matmul(h, kernels):
        gathered = tf.gather(kernels, row)
        y = tf.squeeze(tf.matmul(h[:, None, :], gathered), 1)

        def grad(g):
            dh = tf.squeeze(tf.matmul(g[:, None, :], gathered, transpose_b=True), 1)
            dkernels = tf.math.unsorted_segment_sum(h[:, :, None] * g[:, None, :], row, rows)
            return dh, dkernels

        return y, grad

    dtype = keras.backend.result_type(h.dtype, kernels.dtype)
    return matmul(tf.cast(h, dtype), tf.cast(kernels, dtype))


@keras.saving.register_keras_serializable(package="mtl_keras")
class TaskHeads(keras.layers.Layer):
    """The heads of all tasks, grouped by the estimator they use, run in one pass.

    Holds one `TaskHead` per task (`heads[t]`: task t's estimator and output
    layer, the unit users reason about) and the grouping Selective Sharing
    learns: task t uses the estimator of head `estimator_of_task[t]`, its
    *owner*. An owner uses its own estimator; `set_estimator_of_task`
    regroups the tasks and drops, with their variables, the estimators no
    task uses any more. Merges are final: a dropped estimator never comes
    back. Every task keeps its own output layer, since output sizes differ.

    The forward pass sends each (example, task) pair through its own task's
    head, for all pairs at once: the owners' estimator kernels are stacked
    into `[owners, in, out]` tensors, each pair gathers its owner's and a
    batched matrix-vector product applies it; the output layers are
    concatenated into one matmul, from which each pair keeps its task's
    logits. No Python loop over tasks is traced, so the cost grows slowly
    with the task count. The grouping is read when the pass is traced: after
    a regrouping, traced functions must be traced again (`MultiTaskModel`
    does so).

    Dropout belongs to this layer, applied after every estimator layer of
    that pass: the `TaskHead`s are built without dropout of their own,
    which the pass would never run. The layer computes in float32 unless
    given another `dtype`, so the logits stay float32 under a mixed
    precision policy (the heads' variables are float32 either way).

    Args:
        tasks: a `TaskSet`, or a list of `Task`s or their configs; sets each
            head's output size and how its logits are padded (see
            `task_losses.gather_task_logits`).
        hidden_units: widths of every head's estimator (`Dense` layers);
            `()` makes each head a single output layer.
        activation: activation of the estimator layers.
        dropout: dropout rate after each estimator layer.
        kernel_regularizer: optional regularizer of every kernel.
        estimator_of_task: for each task, the index of the head whose
            estimator it uses; identity (no sharing) by default.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        features: `[P, features]` trunk features of each pair.
        task_ids: `[P]` int, each pair's task.
        training: whether dropout is active.

    Returns:
        `[P, max_outputs]` logits of each pair's task; positions past the
        task's `num_outputs` hold `INVALID_LOGIT` (multiclass) or 0.

    Example:

    >>> tasks = TaskSet([Task("a", "multiclass", 5), Task("b", "binary", 1), Task("c", "multiclass", 3)])
    >>> heads = TaskHeads(tasks, hidden_units=(16,))
    >>> heads(np.zeros((4, 8), "float32"), np.array([0, 1, 2, 0])).shape
    (4, 5)
    >>> heads.set_estimator_of_task([0, 0, 2])  # b now uses a's estimator
    [1]
    >>> heads.task_groups
    {0: [0, 1], 2: [2]}
    """

    def __init__(
        self,
        tasks,
        hidden_units=(128,),
        activation="relu",
        dropout=0.0,
        kernel_regularizer=None,
        estimator_of_task=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
        self.table = TaskTable(self.tasks)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = keras.activations.get(activation)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.dropout = float(dropout)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        n = len(self.tasks)
        owners = list(range(n)) if estimator_of_task is None else [int(o) for o in estimator_of_task]
        self._check_owners(owners)
        self._estimator_of_task = tuple(owners)
        self.heads = [
            TaskHead(
                task.num_outputs,
                hidden_units=self.hidden_units,
                activation=self.activation,
                dropout=0.0,
                has_estimator=owners[i] == i,
                kernel_regularizer=self.kernel_regularizer,
                name=f"head_{i}",
            )
            for i, task in enumerate(self.tasks)
        ]
        self.dropout_layer = keras.layers.Dropout(self.dropout) if self.dropout else None

    def build(self, features_shape, task_ids_shape=None):
        for head in self.heads:
            head.build(features_shape)

    # ------------------------------------------------------------ grouping
    @property
    def estimator_of_task(self):
        """For each task, the index of the head whose estimator it uses (a new list)."""
        return list(self._estimator_of_task)

    @property
    def estimator_owners(self):
        """Sorted indices of the heads whose estimators are in use."""
        return sorted(set(self._estimator_of_task))

    @property
    def task_groups(self):
        """The tasks sharing each estimator: `{owner: [task ids]}`."""
        groups = {}
        for t, o in enumerate(self._estimator_of_task):
            groups.setdefault(o, []).append(t)
        return groups

    def _check_owners(self, owners):
        n = len(self.tasks)
        if len(owners) != n:
            raise ValueError(f"estimator_of_task needs one entry per task ({n}), got {len(owners)}.")
        for t, o in enumerate(owners):
            if not 0 <= o < n:
                raise ValueError(f"estimator_of_task[{t}] = {o} is not a task index in [0, {n}).")
            if owners[o] != o:
                raise ValueError(
                    f"estimator_of_task[{t}] = {o}, but task {o} itself uses the estimator of "
                    f"task {owners[o]}: an owner must use its own estimator."
                )

    def set_estimator_of_task(self, estimator_of_task):
        """Regroups the tasks: task t will use the estimator of head `estimator_of_task[t]`.

        Estimators no task uses any more are dropped with their variables; no
        variable is created. A task cannot get back an estimator once it was
        dropped.

        Args:
            estimator_of_task: list with one head index per task.

        Returns:
            The list of head indices whose estimators were dropped.
        """
        owners = [int(o) for o in estimator_of_task]
        self._check_owners(owners)
        for o in sorted(set(owners)):
            if not self.heads[o].has_estimator:
                users = [t for t, u in enumerate(owners) if u == o]
                raise ValueError(
                    f"Tasks {users} cannot use head {o}'s estimator: it was dropped earlier "
                    "(merges are final; group them under a head that still has its estimator)."
                )
        dropped = [i for i in self.estimator_owners if i not in set(owners)]
        for i in dropped:
            self.heads[i].drop_estimator()
        self._estimator_of_task = tuple(owners)
        return dropped

    # ------------------------------------------------------------- forward
    def stacked_estimator_weights(self):
        """The owners' estimator kernels and biases, stacked per estimator layer.

        Returns:
            One `(kernels [owners, in, out], biases [owners, out])` pair per
            estimator layer, rows in `estimator_owners` order.
        """
        owners = [self.heads[o] for o in self.estimator_owners]
        return [
            (
                ops.stack([head.estimator_layers[l].kernel.value for head in owners]),
                ops.stack([head.estimator_layers[l].bias.value for head in owners]),
            )
            for l in range(len(self.hidden_units))
        ]

    def output_weights(self):
        """All output layers side by side: `(kernel [in, sum of num_outputs], bias)`."""
        kernel = ops.concatenate([head.output_layer.kernel.value for head in self.heads], axis=1)
        bias = ops.concatenate([head.output_layer.bias.value for head in self.heads], axis=0)
        return kernel, bias

    def call(self, features, task_ids, training=False):
        h = ops.cast(features, self.compute_dtype)
        task_ids = ops.cast(ops.reshape(task_ids, (-1,)), "int32")
        if self.hidden_units:
            row_of_owner = {o: i for i, o in enumerate(self.estimator_owners)}
            row_of_task = np.array([row_of_owner[o] for o in self._estimator_of_task], "int32")
            row = ops.take(ops.convert_to_tensor(row_of_task), task_ids)
            for kernels, biases in self.stacked_estimator_weights():
                h = per_pair_matmul(h, kernels, row)
                h = self.activation(h + ops.take(biases, row, axis=0))
                if self.dropout_layer is not None:
                    h = self.dropout_layer(h, training=training)
        kernel, bias = self.output_weights()
        return gather_task_logits(ops.matmul(h, kernel) + bias, task_ids, self.table)

    def compute_output_shape(self, features_shape, task_ids_shape=None):
        return (features_shape[0], self.table.max_outputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            tasks=self.tasks.get_config(),
            hidden_units=list(self.hidden_units),
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout,
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            estimator_of_task=self.estimator_of_task,
        )
        return config
