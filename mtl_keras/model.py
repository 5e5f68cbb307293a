"""MultiTaskModel: a shared (optionally routed) trunk, one head per task, one step for all.

Data comes in one of two forms, told apart by whether the inputs carry a
`task` key:

- **One task per example** (e.g. Omniglot: an image belongs to one alphabet):
  `x = {"image": [B, ...], "task": [B] int}`, `y = [B]` (class index, 0/1,
  or a regression value) or `[B, label_width]`. Each example is one
  (example, task) pair; every label must fit its task, and sample weight 0
  leaves an example out.
- **Several labelled tasks per example** (attribute data, e.g. CelebA's 40):
  `x = {"image": [B, ...]}` (or the image tensor itself), `y = [B, T]`, with
  NaN (or a negative class) marking a missing label and an optional
  `sample_weight` of shape `[B, T]`. In training each example is routed
  through `tasks_per_step` of its labelled tasks, sampled per example
  (`task_sampling="per_example"`) or once for the whole batch
  (`"per_batch"`, the authors' schedule with `tasks_per_step=1`); in
  evaluation through all of them.

Either way the step works on a flat batch of P (example, task) pairs: the
trunk runs once per pair when it is routed (its features depend on the task)
and once per example otherwise; every task head is evaluated in one
vectorised pass that picks each pair's own head; losses and metrics of all
tasks come from segment sums over the pairs' task ids. Nothing in the step
loops over tasks in Python, so its cost grows slowly with the task count.

Bad task ids, labels and images are refused before the step computes
anything from them (`mtl_keras.input_checks`), and `fit` stops at the first
non-finite loss (`mtl_keras.guarded_model`).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mtl_keras import batch_norm
from mtl_keras.distribute import all_reduce_sum, in_multi_worker_mode, num_replicas
from mtl_keras.guarded_model import GuardedModel
from mtl_keras.input_checks import check_fraction
from mtl_keras.layers.task_heads import TaskHeads
from mtl_keras.metrics import PerTaskMean
from mtl_keras.optimizers import load_state_of_other_layout, zero_optimizer_rows
from mtl_keras.step import Pairs, StepContext
from mtl_keras.task_losses import TaskTable, pair_losses, pair_metrics, sanitize_labels
from mtl_keras.tasks import TaskSet
from mtl_keras.weighting import get_weighting

TASK_SAMPLING = ("per_example", "per_batch")


@keras.saving.register_keras_serializable(package="mtl_keras")
class MultiTaskModel(GuardedModel):
    """A many-task model: shared trunk, per-task heads, a vectorised train step.

    Args:
        backbone: a `keras.Model` mapping `{"image": ..., "task": ...}` (the
            `task` input only when it routes, see `backbones.conv_backbone`)
            to features `[batch, features]`.
        tasks: a `TaskSet` (or list of `Task`s); task ids index into it.
        head_units: widths of each `TaskHead`'s estimator; the heads are a
            `TaskHeads` layer, `model.task_heads`.
        head_activation: activation of the estimators.
        head_dropout: dropout after each estimator layer.
        head_regularizer: optional kernel regularizer of the heads.
        tasks_per_step: for several-tasks-per-example data, how many of an
            example's tasks each training step routes it through.
        task_sampling: `"per_example"` or `"per_batch"`.
        weighting: a weighting name or `Weighting` (default: equal weights),
            see `mtl_keras.weighting`.
        estimator_of_task: for each task, the index of the head whose
            estimator it uses (identity by default); set by Selective Sharing
            merges and saved with the model.
        label_smoothing: ε in `[0, 1)` of the classification tasks' training
            loss (see `task_losses.pair_losses`); evaluation reports the
            plain loss, so validation losses stay comparable across ε.
        seed: seed of the task sampling.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Example:

    >>> tasks = TaskSet([Task("a", "multiclass", 5), Task("b", "binary", 1)])
    >>> backbone = conv_backbone((28, 28, 1), num_tasks=2, sigma=0.5, seed=0)
    >>> model = MultiTaskModel(backbone, tasks)
    >>> model.compile(optimizer="adam")
    >>> model.fit(dataset, epochs=1)  # ({"image", "task"}, label) batches
    """

    def __init__(
        self,
        backbone,
        tasks,
        head_units=(128,),
        head_activation="relu",
        head_dropout=0.0,
        head_regularizer=None,
        tasks_per_step=1,
        task_sampling="per_example",
        weighting=None,
        estimator_of_task=None,
        label_smoothing=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
        self.table = TaskTable(self.tasks)
        num_tasks = len(self.tasks)
        if not isinstance(tasks_per_step, int) or tasks_per_step < 1:
            raise ValueError(f"tasks_per_step must be a positive int, got {tasks_per_step!r}.")
        if task_sampling not in TASK_SAMPLING:
            raise ValueError(f"task_sampling must be one of {TASK_SAMPLING}, got {task_sampling!r}.")
        check_fraction("head_dropout (the dropout rate after each head estimator layer)", head_dropout,
                       upper_open=True, meaning="0 turns dropout off; 1 would drop every unit.")
        check_fraction("label_smoothing", label_smoothing, upper_open=True,
                       meaning="0 trains on the labels as they are; 1 would ignore them.")
        self.label_smoothing = float(label_smoothing)
        self.tasks_per_step = tasks_per_step
        self.task_sampling = task_sampling
        self.seed = seed

        self.backbone = backbone
        self.backbone_input_names = [t.name for t in backbone.inputs]
        self.routed = "task" in self.backbone_input_names
        feature_dim = backbone.outputs[0].shape[-1]
        if len(backbone.outputs[0].shape) != 2 or feature_dim is None:
            raise ValueError(
                "The backbone must output features of shape [batch, features] with a known "
                f"feature size; got {backbone.outputs[0].shape}. End it with pooling or Flatten."
            )

        # Assigned before the weighting: the optimizer's slots (and so its
        # saved state) follow the order of the trainable variables.
        self.task_heads = TaskHeads(
            self.tasks,
            hidden_units=head_units,
            activation=head_activation,
            dropout=head_dropout,
            kernel_regularizer=head_regularizer,
            estimator_of_task=estimator_of_task,
            name="task_heads",
        )
        self.task_heads.build((None, feature_dim))

        self.weighting = get_weighting(weighting)
        self.weighting.build(num_tasks)

        names = list(self.tasks.names)
        self.task_loss_tracker = PerTaskMean(names, "loss", name="task_loss")
        self.task_metric_trackers = [
            PerTaskMean(names, m, active=self.table.metric_active[m], name=f"task_{m}")
            for m in self.table.metric_names
        ]
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.gradient_observers = []
        self.built = True

    # ------------------------------------------------------------------ heads
    @property
    def heads(self):
        """The `TaskHead` of each task (owned by `task_heads`).

        Also where `.keras` files keep the heads' weights: Keras saves every
        object under the first attribute path it meets walking the model's
        attributes in sorted order, and `heads` sorts before `layers` and
        `task_heads`, so the weights stay at `heads/task_head[_i]/...`, where
        files written before `TaskHeads` existed have them
        (tests/test_legacy_files.py, tests/test_model.py).
        """
        return self.task_heads.heads

    @property
    def estimator_of_task(self):
        """For each task, the index of the head whose estimator it uses."""
        return self.task_heads.estimator_of_task

    @property
    def estimator_owners(self):
        """Sorted indices of the tasks whose heads hold an estimator."""
        return self.task_heads.estimator_owners

    @property
    def task_groups(self):
        """The groups of tasks sharing one estimator: `{owner: [task ids]}`."""
        return self.task_heads.task_groups

    def set_estimator_of_task(self, estimator_of_task):
        """Regroups the heads: task t will use the estimator of head `estimator_of_task[t]`.

        See `TaskHeads.set_estimator_of_task`. The optimizer goes on with
        the surviving estimators' state; the dropped estimators' rows of the
        stacked variables are zeroed, and so is the optimizer's state of
        those rows (`optimizers.zero_optimizer_rows`). Compiled step functions are rebuilt at
        their next use, so this is safe to call from a callback during
        `fit()`.

        Args:
            estimator_of_task: list with one head index per task.

        Returns:
            The list of head indices whose estimators were dropped.
        """
        dropped = self.task_heads.set_estimator_of_task(estimator_of_task)
        if dropped and self.optimizer is not None:
            zero_optimizer_rows(self.optimizer, self.task_heads.stacked_estimator_variables(), dropped)
        if self.train_function is not None:
            # fit() fetches `self.train_function` before every step, so a
            # retrace here takes effect at the next step of the same fit().
            self.make_train_function(force=True)
        self.test_function = None
        self.predict_function = None
        return dropped

    # ----------------------------------------------------------------- forward
    def _image_inputs(self, x):
        if not isinstance(x, dict):
            x = {"image": x}
        return {
            k: ops.convert_to_tensor(v)
            for k, v in x.items()
            if k in self.backbone_input_names and k != "task"
        }

    def _features(self, images, task_ids, training):
        inputs = dict(images)
        if self.routed:
            inputs["task"] = task_ids
        if len(inputs) == 1 and not isinstance(getattr(self.backbone, "_inputs_struct", None), dict):
            # A backbone built on a bare Input (not a dict) takes the tensor.
            inputs = next(iter(inputs.values()))
        return self.backbone(inputs, training=training)

    def task_features(self, inputs, task):
        """The trunk features task `task`'s head sees for every input (inference mode).

        Args:
            inputs: images, or a dict holding `"image"` (a `"task"` entry is
                ignored: `task` says which task's view of the trunk to take).
            task: task index; it matters only for a routed trunk.

        Returns:
            `[B, features]` float32 tensor.
        """
        images = self._image_inputs(inputs)
        if not self.routed:
            return self._features(images, None, False)
        batch = ops.shape(next(iter(images.values())))[0]
        return self._features(images, ops.full((batch,), int(task), dtype="int32"), False)

    def heads_forward(self, features, task_ids, training=False):
        """Each pair's own head applied to its features, all heads in one pass.

        Args:
            features: `[P, features]`.
            task_ids: `[P]` int32.
            training: whether dropout is active.

        Returns:
            `[P, max_outputs]` logits (see `TaskHeads`).
        """
        return self.task_heads(features, task_ids, training=training)

    def call(self, inputs, training=False):
        """Logits `[B, max_outputs]` of each example's task (inputs with a
        `task` key), else `[B, T, max_outputs]` for every task."""
        if self.batch_checks_in_step():
            inputs = self.check_batch(inputs)[0]
        images = self._image_inputs(inputs)
        if isinstance(inputs, dict) and "task" in inputs:
            task_ids = ops.cast(ops.reshape(inputs["task"], (-1,)), "int32")
            features = self._features(images, task_ids, training)
            return self.heads_forward(features, task_ids, training)
        batch = ops.shape(next(iter(images.values())))[0]
        num_tasks = len(self.tasks)
        rows, task_ids = self._all_task_pairs(batch)
        features = self._pairs_features(images, rows, task_ids, training)
        logits = self.heads_forward(features, task_ids, training)
        return ops.reshape(logits, (batch, num_tasks, self.table.max_outputs))

    def _all_task_pairs(self, batch):
        num_tasks = len(self.tasks)
        rows = ops.repeat(ops.arange(batch, dtype="int32"), num_tasks)
        task_ids = ops.tile(ops.arange(num_tasks, dtype="int32"), [batch])
        return rows, task_ids

    def _pairs_features(self, images, rows, task_ids, training):
        """Trunk features of each (example, task) pair."""
        if rows is None:
            return self._features(images, task_ids, training)
        if self.routed:
            repeated = {k: ops.take(v, rows, axis=0) for k, v in images.items()}
            return self._features(repeated, task_ids, training)
        # The trunk does not depend on the task: run it once per example.
        return ops.take(self._features(images, None, training), rows, axis=0)

    # ------------------------------------------------------------------- pairs
    def make_pairs(self, x, y, sample_weight=None, training=False, check=None):
        """Flattens a batch into (example, task) pairs.

        Args:
            check: whether to refuse bad task ids, labels and images first
                (`GuardedModel.check_batch`); default: unless XLA-compiled.

        Returns:
            A `Pairs` (see `mtl_keras.step`).
        """
        if self.batch_checks_in_step(check):
            x, y, sample_weight = self.check_batch(x, y, sample_weight)
        images = self._image_inputs(x)
        table = self.table
        if isinstance(x, dict) and "task" in x:
            task_ids = ops.cast(ops.reshape(x["task"], (-1,)), "int32")
            labels, present = sanitize_labels(y, task_ids, table)
            weights = ops.cast(present, "float32")
            if sample_weight is not None:
                weights = weights * ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
            return Pairs(images=images, rows=None, task_ids=task_ids, labels=labels, weights=weights)

        num_tasks = len(self.tasks)
        y = ops.cast(y, "float32")
        if len(y.shape) != 2 or y.shape[-1] != num_tasks:
            raise ValueError(
                f"Inputs have no 'task' key, so labels must be [batch, {num_tasks}] (one column per "
                f"task, NaN where missing); got shape {y.shape}. For one task per example, add "
                "x['task'] with each example's task id."
            )
        if table.label_width != 1:
            raise ValueError(
                "Several-tasks-per-example data needs one label value per task; a regression "
                "task with num_outputs > 1 must come as one task per example."
            )
        available = ops.isfinite(y)
        is_class = ops.convert_to_tensor(np.logical_not(table.is_regression))[None, :]
        available = ops.logical_and(available, ops.logical_or(ops.logical_not(is_class), y >= 0))
        avail_w = ops.cast(available, "float32")
        if sample_weight is not None:
            avail_w = avail_w * ops.cast(sample_weight, "float32")
        batch = ops.shape(y)[0]
        k = min(self.tasks_per_step, num_tasks) if training else num_tasks
        if k == num_tasks:
            rows, task_ids = self._all_task_pairs(batch)
            labels = ops.reshape(y, (-1,))
            weights = ops.reshape(avail_w, (-1,))
        else:
            # Gumbel top-k: k distinct tasks, uniformly among the labelled ones.
            if self.task_sampling == "per_batch":
                shape, has = (1, num_tasks), ops.any(avail_w > 0, axis=0, keepdims=True)
            else:
                shape, has = (batch, num_tasks), avail_w > 0
            with tf.control_dependencies([y]):  # a refused batch leaves the seed as it was
                u = keras.random.uniform(shape, 1e-9, 1.0, seed=self.seed_generator)
            scores = ops.where(has, -ops.log(-ops.log(u)), -1e9)
            scores = ops.broadcast_to(scores, (batch, num_tasks))
            _, chosen = ops.top_k(scores, k)
            chosen = ops.cast(chosen, "int32")
            rows = ops.repeat(ops.arange(batch, dtype="int32"), k)
            task_ids = ops.reshape(chosen, (-1,))
            labels = ops.reshape(ops.take_along_axis(y, chosen, axis=1), (-1,))
            weights = ops.reshape(ops.take_along_axis(avail_w, chosen, axis=1), (-1,))
        labels, present = sanitize_labels(labels, task_ids, table)
        weights = weights * ops.cast(present, "float32")
        return Pairs(images=images, rows=rows, task_ids=task_ids, labels=labels, weights=weights)

    # ------------------------------------------------------------------ losses
    def task_losses(self, losses, task_ids, weights):
        """Per-task losses of a batch, exact under a distribution strategy.

        Each task's loss is its weighted mean over the pairs of the *global*
        batch: this replica contributes `sum of its pairs' losses / global
        count`, so the replicas' contributions add up to the global mean and,
        as the optimizer sums gradients over replicas, a step on R replicas
        equals one on a single device with the same global batch.

        Returns:
            `(task_losses [T], present [T] bool, global_task_losses [T])`.
        """
        num_tasks = len(self.tasks)
        local_sum = ops.segment_sum(losses * weights, task_ids, num_segments=num_tasks)
        local_count = ops.segment_sum(weights, task_ids, num_segments=num_tasks)
        global_count = all_reduce_sum(local_count)
        shares = local_sum / ops.maximum(global_count, 1e-12)
        global_losses = all_reduce_sum(ops.stop_gradient(shares))
        return shares, global_count > 0, global_losses

    def _step(self, data, training):
        """The objective and the `StepContext` of one batch (train or test)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        pairs = self.make_pairs(x, y, sample_weight, training=training)
        # Features kept apart from the heads: gradient methods take
        # per-task gradients there (see mtl_keras.weighting).
        features = self._pairs_features(pairs.images, pairs.rows, pairs.task_ids, training)
        logits = self.heads_forward(features, pairs.task_ids, training)
        losses = self._pair_losses(logits, pairs, training)
        shares, present, global_losses = self.task_losses(losses, pairs.task_ids, pairs.weights)
        task_weights = ops.convert_to_tensor(self.table.weights)
        objective = self.weighting.combine(shares, present, task_weights, global_losses)
        regularization = None
        if self.losses:
            regularization = ops.sum(self.losses) / num_replicas()
            objective = objective + regularization
        step = StepContext(
            pairs=pairs,
            logits=logits,
            losses=losses,
            features=features,
            task_losses=shares,
            present=present,
            task_weights=task_weights,
            global_task_losses=global_losses,
            regularization=regularization,
            loss_scale=ops.ones((), dtype=objective.dtype),
            iteration=self.optimizer.iterations if training else None,
            num_replicas=num_replicas(),
            backbone=self.backbone,
            features_fn=lambda images, task_ids: self._features(
                images, task_ids if self.routed else None, training
            ),
            task_losses_fn=lambda: self._task_losses_now(pairs, training),
        )
        return objective, step

    def _pair_losses(self, logits, pairs, training):
        return pair_losses(logits, pairs.labels, pairs.task_ids, self.table,
                           label_smoothing=self.label_smoothing if training else 0.0)

    def _task_losses_now(self, pairs, training):
        """Global per-task losses of `pairs` under the current weights (see `StepContext.task_losses_fn`)."""
        # A training-mode forward pass moves batch norm's moving statistics:
        # keep them as the step left them, so this look costs nothing else.
        kept = [(v, tf.identity(v.value)) for layer in batch_norm.batch_norm_layers(self)
                for v in (layer.moving_mean, layer.moving_variance)]
        features = self._pairs_features(pairs.images, pairs.rows, pairs.task_ids, training)
        logits = self.heads_forward(features, pairs.task_ids, training)
        losses = ops.stop_gradient(self._pair_losses(logits, pairs, training))
        global_losses = self.task_losses(losses, pairs.task_ids, pairs.weights)[2]
        with tf.control_dependencies([global_losses]):
            for v, value in kept:
                v.assign(value)
        return ops.convert_to_tensor(global_losses)

    def training_task_losses(self, data):
        """Global per-task losses `[T]` of a batch in training mode, without a gradient.

        The look FAMO's same-batch mode takes after each update (batch
        statistics and dropout as in training; batch norm's moving
        statistics left as they were). `apps/benchmark.py` times it as the
        floor of that mode's cost.

        Args:
            data: a batch as `fit` gets it, `(x, y)` or `(x, y, sample_weight)`.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        pairs = self.make_pairs(x, y, sample_weight, training=True)
        return self._task_losses_now(pairs, training=True)

    def _update_metrics(self, objective, step):
        pairs = step.pairs
        if self._loss_tracker is not None:
            # The tracker averages over replicas; each replica holds a share.
            self._loss_tracker.update_state(objective * num_replicas())
        self.task_loss_tracker.update_state(step.losses, pairs.task_ids, pairs.weights)
        values = pair_metrics(step.logits, pairs.labels, pairs.task_ids, self.table)
        for tracker in self.task_metric_trackers:
            tracker.update_state(values[tracker.metric], pairs.task_ids, pairs.weights)
        logs = self.get_metrics_result()
        if in_multi_worker_mode(self.distribute_strategy):
            # Keras' TF trainer reduces each log with `strategy.reduce("MEAN",
            # v, axis=0)` across workers, which rejects scalars
            # (keras-team/keras#20585); rank-1 logs come back as scalars.
            logs = {k: ops.reshape(v, (1,)) for k, v in logs.items()}
        return logs

    def train_step(self, data):
        weighting = self.weighting
        # Gradient methods use the tape more than once (heads, then per-task trunk gradients).
        with tf.GradientTape(persistent=weighting.needs_task_gradients) as tape:
            objective, step = self._step(data, training=True)
            scaled = self.optimizer.scale_loss(objective)
            loss_scale = ops.stop_gradient(self.optimizer.scale_loss(ops.ones((), dtype=objective.dtype)))
            # On the tape: gradient methods take the regularisation's own gradient.
            regularization = None if step.regularization is None else step.regularization * loss_scale
            step = dataclasses.replace(step, regularization=regularization, loss_scale=loss_scale)
        variables = self.trainable_variables
        grads = weighting.compute_gradients(tape, scaled, variables, step)
        del tape
        if not self._optimizer_takes_row_slices():
            # Keras' optimizers would densify the heads' row gradients once
            # per use inside their update (Adam: twice); do it once here.
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        for observer in self.gradient_observers:
            observer(variables, grads, step)
        self.optimizer.apply(grads, variables)
        weighting.end_train_step(step)
        return self._update_metrics(objective, step)

    def _optimizer_takes_row_slices(self):
        """Whether the optimizer updates row gradients sparsely (`LazyAdam.sparse_updates`)."""
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        return bool(getattr(optimizer, "sparse_updates", False))

    def test_step(self, data):
        objective, step = self._step(data, training=False)
        return self._update_metrics(objective, step)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Every variable exists after __init__ and compile(), so there is
        # nothing to build from data; Keras would still fetch a batch and
        # `strategy.reduce` it, which fails on dict inputs under
        # MultiWorkerMirroredStrategy (keras-team/keras#20329).
        if all(layer.built for layer in self._flatten_layers()) and (
            self.optimizer is None or self.optimizer.built
        ):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # Re-estimate batch norm's moving statistics for the weights fit() ends
    # with (mtl_keras.batch_norm); False keeps Keras' moving averages.
    recalibrate_batch_norm = True
    _batch_norm_fit = None

    def fit(self, *args, recalibrate_batch_norm=None, **kwargs):
        """`keras.Model.fit`, then batch norm's statistics re-estimated on training batches.

        See `mtl_keras.batch_norm`: before the last epoch's validation (or
        at the end), every batch-norm layer of the trunk gets the exact
        average of the batch statistics of N training batches under the
        final weights, so that a run of a few dozen steps evaluates as it
        trained. `recalibrate_batch_norm` (default: the model's attribute of
        that name, True) turns it off for this call, or gives the
        `tf.data.Dataset` to re-estimate on instead of the training data
        (e.g. one pass of it when `fit` reads an endless stream).
        """
        enabled = self.recalibrate_batch_norm if recalibrate_batch_norm is None else recalibrate_batch_norm
        if enabled is False or enabled is None:
            return super().fit(*args, **kwargs)
        data = None if enabled is True else enabled
        return batch_norm.fit(self, super().fit, args, kwargs, data=data)

    def evaluate(self, *args, **kwargs):
        # Keras' fit() validates through evaluate(..., _use_cached_eval_dataset=True).
        if self._batch_norm_fit is not None and kwargs.get("_use_cached_eval_dataset"):
            self._batch_norm_fit.before_validation()
        return super().evaluate(*args, **kwargs)

    def compile(self, optimizer="adam", jit_compile=False, **kwargs):
        """Like `keras.Model.compile`, minus `loss`/`metrics` (they come from the tasks).

        `jit_compile` defaults to False: Keras' `"auto"` silently turns XLA off
        on CPU and under `tf.distribute`; pass True to ask for XLA.
        """
        for key in ("loss", "metrics", "loss_weights", "weighted_metrics"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"MultiTaskModel.compile() takes no {key!r}: losses and metrics come from "
                    "each Task (kind, loss, metrics, weight)."
                )
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
        # Build the optimizer now, in the strategy's scope, on every variable
        # any later regrouping may keep.
        with self.distribute_strategy.scope():
            self.optimizer.build(self.trainable_variables)
        self._load_per_head_optimizer_state_too(self.optimizer)

    def _load_per_head_optimizer_state_too(self, optimizer):
        """Lets `optimizer` load state saved before the heads' weights were stacked.

        Files written until then (0.1.0) hold one slot per head variable;
        the optimizer now has one per stacked variable, and Keras would skip
        (with a warning) state whose variable count differs. The optimizer's
        `load_own_variables` is wrapped to convert such state instead
        (`optimizers.load_state_of_other_layout`, `TaskHeads.stack_per_head`).
        """
        heads = self.task_heads
        variables = list(self.trainable_variables)
        keys = {id(v) for v in heads.trainable_variables}
        at = [i for i, v in enumerate(variables) if id(v) in keys]
        first, last = at[0], at[-1] + 1
        if at != list(range(first, last)):
            return  # the heads' variables are not side by side: no conversion offered
        before, after = variables[:first], variables[last:]
        other_shapes = [tuple(v.shape) for v in before] + heads.per_head_shapes() + [tuple(v.shape) for v in after]
        split = len(before), len(other_shapes) - len(after)

        def to_this_layout(slots):
            middle = slots[split[0]:split[1]]
            stacked = None if all(x is None for x in middle) else heads.stack_per_head(middle)
            return slots[:split[0]] + (stacked or [None] * (last - first)) + slots[split[1]:]

        keras_load = optimizer.load_own_variables

        def load_own_variables(store):
            if len(store.keys()) == len(optimizer.variables) or not load_state_of_other_layout(
                    optimizer, store, other_shapes, to_this_layout):
                keras_load(store)

        optimizer.load_own_variables = load_own_variables

    def compile_from_config(self, config):
        # Keras skips this for models that override compile(); ours takes the
        # same arguments minus the task-derived ones, so restore it.
        config = keras.saving.deserialize_keras_object(config)
        for key in ("loss", "metrics", "loss_weights", "weighted_metrics"):
            config.pop(key, None)
        self.compile(**config)

    # ------------------------------------------------------------------ config
    def count_params(self):
        """Parameters in use: the zeroed rows of estimators dropped by merges are not counted
        (see `TaskHeads.count_params`)."""
        return int(super().count_params()) - self.task_heads.dropped_parameter_count()

    def head_parameter_count(self):
        """Parameters of the heads (estimators and output layers)."""
        return int(self.task_heads.count_params())

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            tasks=self.tasks.get_config(),
            head_units=list(self.task_heads.hidden_units),
            head_activation=keras.activations.serialize(self.task_heads.activation),
            head_dropout=self.task_heads.dropout,
            head_regularizer=keras.regularizers.serialize(self.task_heads.kernel_regularizer),
            tasks_per_step=self.tasks_per_step,
            task_sampling=self.task_sampling,
            weighting=keras.saving.serialize_keras_object(self.weighting),
            estimator_of_task=list(self.estimator_of_task),
            label_smoothing=self.label_smoothing,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"], custom_objects=custom_objects
        )
        config["tasks"] = TaskSet.from_config(config["tasks"])
        config["weighting"] = keras.saving.deserialize_keras_object(
            config["weighting"], custom_objects=custom_objects
        )
        return cls(**config)
