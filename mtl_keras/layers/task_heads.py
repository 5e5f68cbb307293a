"""TaskHeads: every task's head, which estimator each task uses, and one pass over all pairs."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mtl_keras.layers.stacked_dense import RowBlock
from mtl_keras.layers.task_head import TaskHead
from mtl_keras.sparse_rows import distinct_rows, in_xla
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
    and its gradients, to float rounding (`tests/test_layers.py`);
    about half the time of the heads' hidden layer at T = 50
    (docs/BENCHMARKS.md, second round). `TaskHeads` passes the distinct rows of its
    batch, gathered from a stacked variable, so that the variable's
    gradient is a `tf.IndexedSlices` naming each of those rows once.

    Args:
        h: `[P, in]` features.
        kernels: `[rows, in, out]` stacked kernels (rows may be dynamic).
        row: `[P]` int32, each pair's kernel.

    Returns:
        `[P, out]`.
    """
    @tf.custom_gradient
    def matmul(h, kernels):
        gathered = tf.gather(kernels, row)
        y = tf.squeeze(tf.matmul(h[:, None, :], gathered), 1)

        def grad(g):
            dh = tf.squeeze(tf.matmul(g[:, None, :], gathered, transpose_b=True), 1)
            return dh, summed_outer_products(h, g, row, tf.shape(kernels)[0])

        return y, grad

    dtype = keras.backend.result_type(h.dtype, kernels.dtype)
    return matmul(tf.cast(h, dtype), tf.cast(kernels, dtype))


# Above this many padded pairs per pair, summed_outer_products forms the outer
# products one by one instead: the padded matmul's work grows with rows x
# widest row, which a batch dominated by one row makes up to P / 4 times P.
_MAX_PADDING = 32


def summed_outer_products(h, g, row, rows):
    """`sum over p with row[p] == r of outer(h[p], g[p])`, for every r < rows.

    Outside XLA, the pairs are sorted by row and padded into a
    `[rows, widest row, in]` block, and each row's sum is one batched
    matmul: on a batch of 128 pairs over ~50 rows, about 3x faster than
    forming the `[P, in, out]` outer products and summing them into rows
    with `unsorted_segment_sum`, which is what runs under XLA (static
    shapes) and where padding would cost more than `_MAX_PADDING` times
    the pairs.

    Args:
        h: `[P, in]`.
        g: `[P, out]`.
        row: `[P]` int32 in `[0, rows)`.
        rows: number of rows (a scalar; may be a tensor).

    Returns:
        `[rows, in, out]`.
    """
    def one_by_one():
        return tf.math.unsorted_segment_sum(h[:, :, None] * g[:, None, :], row, rows)

    if in_xla():
        return one_by_one()
    pairs = tf.shape(row)[0]
    counts = tf.math.bincount(row, minlength=rows, maxlength=rows)
    widest = tf.reduce_max(tf.concat([counts, [0]], 0))

    def padded():
        order = tf.argsort(row, stable=True)
        sorted_row = tf.gather(row, order)
        position = tf.range(pairs) - tf.gather(tf.cumsum(counts, exclusive=True), sorted_row)
        at = tf.stack([sorted_row, position], axis=1)
        h_blocks = tf.scatter_nd(at, tf.gather(h, order), tf.stack([rows, widest, tf.shape(h)[1]]))
        g_blocks = tf.scatter_nd(at, tf.gather(g, order), tf.stack([rows, widest, tf.shape(g)[1]]))
        return tf.matmul(h_blocks, g_blocks, transpose_a=True)

    return tf.cond(rows * widest <= _MAX_PADDING * tf.maximum(pairs, 1), padded, one_by_one)


@keras.saving.register_keras_serializable(package="mtl_keras")
class TaskHeads(keras.layers.Layer):
    """The heads of all tasks, grouped by the estimator they use, run in one pass.

    Holds one `TaskHead` per task (`heads[t]`: task t's estimator and output
    layer, the unit users reason about) and the grouping Selective Sharing
    learns: task t uses the estimator of head `estimator_of_task[t]`, its
    *owner*. An owner uses its own estimator; `set_estimator_of_task`
    regroups the tasks and drops the estimators no task uses any more.
    Merges are final: a dropped estimator never comes back. Every task keeps
    its own output layer, since output sizes differ.

    The weights of all heads are *stacked*: estimator layer l is one
    `[T, in, out]` kernel and one `[T, out]` bias variable (row t: head
    t's), and the output layers are one `[sum of num_outputs, in]` kernel
    (one row per output unit) and its bias. Each `TaskHead` views its own
    rows (`stacked_dense.Dense`), so `heads[t]` still reads, assigns, saves
    and loads as a layer of its own, and `.keras` files keep the per-head
    layout they always had. A dropped estimator's rows stay in the
    variables, zeroed; `count_params` does not count them.

    The forward pass sends each (example, task) pair through its own task's
    head, for all pairs at once: the rows of the estimators the batch uses
    are gathered, each once, and a batched matrix-vector product applies
    each pair's (`per_pair_matmul`); then one matmul applies the output
    units of the batch's tasks, from which each pair keeps its own task's
    logits. A step thus reads only the rows its batch uses, and their
    gradients are `tf.IndexedSlices` naming those rows: with
    `mtl_keras.LazyAdam` only they are updated, and a step hardly pays for
    the heads its batch does not use (`MultiTaskModel` hands other
    optimizers the gradients dense). Under XLA, which needs static shapes,
    every output unit is applied and each pair gathers its own rows. No
    Python loop over tasks is traced. The grouping is read when the pass is
    traced: after a regrouping, traced functions must be traced again
    (`MultiTaskModel` does so).

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
        kernel_regularizer: optional regularizer of the kernels, applied to
            each stacked kernel variable as a whole (for L1 / L2 the same as
            applying it to every head's kernel and summing).
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
        # Merges are final: once False, a head never gets an estimator back.
        self._has_estimator = [o == i for i, o in enumerate(owners)]
        self.heads = []  # one TaskHead per task, viewing its rows of the stacked weights (made in build)
        # Each head's kernels start as a keras.layers.Dense of its own would:
        # Glorot-uniform, with initializers made here in the order the heads'
        # Dense layers once made theirs, so a seeded model starts from the
        # same weights as before the weights were stacked.
        self._kernel_initializers = [
            ([keras.initializers.GlorotUniform() for _ in self.hidden_units] if self._has_estimator[t] else [],
             keras.initializers.GlorotUniform())
            for t in range(n)
        ]
        self.dropout_layer = keras.layers.Dropout(self.dropout) if self.dropout else None

    def build(self, features_shape, task_ids_shape=None):
        n = len(self.tasks)
        dims = (int(features_shape[-1]),) + self.hidden_units
        # Row t of each estimator variable is head t's layer; a row whose
        # estimator was dropped stays, zeroed, so that shapes (and the
        # optimizer's slots) never change.
        layers = list(zip(dims[:-1], dims[1:]))
        counts = self.table.num_outputs
        kernels = [np.zeros((n, fan_in, units), "float32") for fan_in, units in layers]
        output_kernel = np.zeros((int(counts.sum()), dims[-1]), "float32")
        for t, (estimator, output) in enumerate(self._kernel_initializers):
            for l, initializer in enumerate(estimator):
                kernels[l][t] = np.asarray(initializer(layers[l]))
            start = int(self.table.offsets[t])
            output_kernel[start:start + counts[t]] = np.asarray(output((dims[-1], int(counts[t])))).T
        constant = lambda value: (lambda shape, dtype=None: ops.convert_to_tensor(value, dtype))
        self.estimator_kernels, self.estimator_biases = [], []
        for l, (fan_in, units) in enumerate(layers):
            self.estimator_kernels.append(self.add_weight(
                shape=(n, fan_in, units), initializer=constant(kernels[l]),
                regularizer=self.kernel_regularizer, name=f"estimator_kernel_{l}"))
            self.estimator_biases.append(self.add_weight(shape=(n, units), initializer="zeros",
                                                         name=f"estimator_bias_{l}"))
        # Output layers one row per output unit (task t: rows offsets[t] to
        # offsets[t] + num_outputs[t]), so tasks of any output size stack.
        self.output_kernel = self.add_weight(shape=output_kernel.shape, initializer=constant(output_kernel),
                                             regularizer=self.kernel_regularizer, name="output_kernel")
        self.output_bias = self.add_weight(shape=(int(counts.sum()),), initializer="zeros", name="output_bias")
        self.heads = [self._make_head(t) for t in range(n)]
        self._zero_estimator_rows([t for t in range(n) if not self._has_estimator[t]])
        self.built = True

    def _make_head(self, t):
        """Task t's `TaskHead`, whose layers are views of its rows."""
        dims = self._widths()
        estimator = [
            (RowBlock(kernel, t, t + 1, (fan_in, units)), RowBlock(bias, t, t + 1, (units,)))
            for kernel, bias, fan_in, units in zip(self.estimator_kernels, self.estimator_biases, dims[:-1], dims[1:])
        ] if self._has_estimator[t] else []
        start, count = int(self.table.offsets[t]), int(self.table.num_outputs[t])
        output = (RowBlock(self.output_kernel, start, start + count, (dims[-1], count), transpose=True),
                  RowBlock(self.output_bias, start, start + count, (count,)))
        return TaskHead(count, hidden_units=self.hidden_units, activation=self.activation, dropout=0.0,
                        has_estimator=bool(estimator) or not self.hidden_units,
                        kernel_regularizer=self.kernel_regularizer, rows=(estimator, output), name=f"head_{t}")

    def _widths(self):
        """The features' width, then each estimator layer's (what the output layers read last)."""
        return (int(self.output_kernel.shape[1]),) if not self.hidden_units else (
            int(self.estimator_kernels[0].shape[1]),) + self.hidden_units

    def _zero_estimator_rows(self, tasks):
        if not tasks or not self.hidden_units:
            return
        index = tf.constant(tasks, "int32")
        for variable in self.estimator_kernels + self.estimator_biases:
            zeros = tf.zeros((len(tasks),) + tuple(variable.shape[1:]), variable.dtype)
            variable.value.scatter_update(tf.IndexedSlices(zeros, index))

    def stacked_estimator_variables(self):
        """The estimator variables, kernel then bias of each layer: row t of each is head t's."""
        return [w for kernel, bias in zip(self.estimator_kernels, self.estimator_biases) for w in (kernel, bias)]

    def per_head_shapes(self):
        """The shapes the heads' variables had when each head owned its own (files saved before
        the weights were stacked): per head, its estimator's kernel and bias per layer (if it has
        an estimator), then its output kernel and bias."""
        dims = self._widths()
        shapes = []
        for t, count in enumerate(self.table.num_outputs):
            if self._has_estimator[t] and self.hidden_units:
                for fan_in, units in zip(dims[:-1], dims[1:]):
                    shapes += [(fan_in, units), (units,)]
            shapes += [(dims[-1], int(count)), (int(count),)]
        return shapes

    def stack_per_head(self, values):
        """Arrays laid out as `per_head_shapes` (None: zeros), stacked as this layer's own
        weights are (`self.weights` order): the inverse of the per-head layout."""
        values = iter(values)
        kernels = [np.zeros(v.shape, "float32") for v in self.estimator_kernels]
        biases = [np.zeros(v.shape, "float32") for v in self.estimator_biases]
        out_kernel = np.zeros(self.output_kernel.shape, "float32")
        out_bias = np.zeros(self.output_bias.shape, "float32")
        for t, count in enumerate(self.table.num_outputs):
            if self._has_estimator[t] and self.hidden_units:
                for kernel, bias in zip(kernels, biases):
                    for array in (kernel, bias):
                        value = next(values)
                        if value is not None:
                            array[t] = value
            start = int(self.table.offsets[t])
            value = next(values)
            if value is not None:
                out_kernel[start:start + count] = np.asarray(value).T
            value = next(values)
            if value is not None:
                out_bias[start:start + count] = value
        stacked = {id(v): a for v, a in zip(self.estimator_kernels + self.estimator_biases + [self.output_kernel, self.output_bias],
                                           kernels + biases + [out_kernel, out_bias])}
        return [stacked[id(v)] for v in self.weights]

    def count_params(self):
        """Parameters in use: the rows of estimators no task uses any more are not counted."""
        dropped = len(self.tasks) - len(self.estimator_owners)
        per_estimator = sum(int(np.prod(v.shape[1:])) for v in self.estimator_kernels + self.estimator_biases)
        return int(sum(int(np.prod(v.shape)) for v in self.weights)) - dropped * per_estimator

    def dropped_parameter_count(self):
        """Parameters kept, zeroed, for the estimators dropped by merges (see `count_params`)."""
        return int(sum(int(np.prod(v.shape)) for v in self.weights)) - self.count_params()

    def save_own_variables(self, store):
        # Each head saves its own rows (stacked_dense.Dense), where files
        # have always had them; nothing is saved twice.
        pass

    def load_own_variables(self, store):
        pass

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

        Estimators no task uses any more are dropped: their heads lose their
        estimator layers and their rows of the stacked variables are zeroed
        (the variables keep their shapes; no variable is created or
        removed). A task cannot get back an estimator once it was dropped.

        Args:
            estimator_of_task: list with one head index per task.

        Returns:
            The list of head indices whose estimators were dropped.
        """
        owners = [int(o) for o in estimator_of_task]
        self._check_owners(owners)
        for o in sorted(set(owners)):
            if not self._has_estimator[o]:
                users = [t for t, u in enumerate(owners) if u == o]
                raise ValueError(
                    f"Tasks {users} cannot use head {o}'s estimator: it was dropped earlier "
                    "(merges are final; group them under a head that still has its estimator)."
                )
        dropped = [i for i in self.estimator_owners if i not in set(owners)]
        for i in dropped:
            self._has_estimator[i] = False
            if self.built:
                self.heads[i].drop_estimator()
        if self.built:
            self._zero_estimator_rows(dropped)
        self._estimator_of_task = tuple(owners)
        return dropped

    # ------------------------------------------------------------- forward
    def call(self, features, task_ids, training=False):
        h = ops.cast(features, self.compute_dtype)
        task_ids = ops.cast(ops.reshape(task_ids, (-1,)), "int32")
        if self.hidden_units:
            # The step reads, and its gradient (tf.IndexedSlices) names,
            # only the rows of the owners the batch uses, each once.
            row = ops.take(ops.convert_to_tensor(np.array(self._estimator_of_task, "int32")), task_ids)
            rows, slot = distinct_rows(row)
            for kernels, biases in zip(self.estimator_kernels, self.estimator_biases):
                h = per_pair_matmul(h, ops.take(kernels, rows, axis=0), slot)
                h = self.activation(h + ops.cast(ops.take(ops.take(biases, rows, axis=0), slot, axis=0), h.dtype))
                if self.dropout_layer is not None:
                    h = self.dropout_layer(h, training=training)
        kernel, bias, offsets = self._output_rows(task_ids)
        logits = ops.matmul(h, ops.transpose(ops.cast(kernel, h.dtype))) + ops.cast(bias, h.dtype)
        return gather_task_logits(logits, task_ids, self.table, offsets)

    def _output_rows(self, task_ids):
        """The output units of the batch's tasks, side by side, and each pair's first column among them.

        Under XLA (static shapes) every task's units, as all tasks' output
        layers concatenated.
        """
        if in_xla():
            return self.output_kernel, self.output_bias, None
        tasks, slot = tf.unique(task_ids)
        counts = tf.gather(self.table.num_outputs, tasks)
        units = tf.ragged.range(tf.gather(self.table.offsets, tasks), tf.gather(self.table.offsets, tasks) + counts)
        units = units.flat_values
        first_column = tf.gather(tf.cumsum(counts, exclusive=True), slot)
        return ops.take(self.output_kernel, units, axis=0), ops.take(self.output_bias, units, axis=0), first_column

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
