"""Batch norm's moving statistics, re-estimated for the weights a `fit()` ends with.

**The problem.** In training, batch norm normalises with each batch's own
mean and variance; in evaluation it uses moving averages that training
updates as `moving = momentum * moving + (1 - momentum) * batch` (Keras'
default momentum 0.99). After k steps the averages still hold `momentum**k`
of their initial values (0 and 1): 58% after the ~54 steps of
`apps/train_omniglot.py --tasks 5 --epochs 3`, whose every alphabet then
tests at chance. The rest of the average is spread over batches seen under
older weights, ~100 steps back at 0.99, which lags behind any run whose
weights still move.

**The fix.** `recalibrate_batch_norm` replaces each layer's moving mean and
variance by the exact average, over N training batches run through the
trunk in training mode with the *final* weights, of the batch mean and
batch variance the layer computes (what SWA's `bn_update` does; the same
per-batch statistics Keras' moving averages average, so a converged moving
average is reproduced, not replaced by another estimator). The routed trunk
sees each example with its own task (`MultiTaskModel.make_pairs`, as in the
train step), so every routed layer's statistics are those training
normalised with. N defaults to `(1 + momentum) / (1 - momentum)` batches
(199 at 0.99, 19 at 0.9), at most one epoch: the exact mean of N batches
has the variance `1 / N` of one batch's, which is the stationary variance
`(1 - momentum) / (1 + momentum)` of the moving average it replaces. So
the re-estimate is never noisier than a moving average that has fully
converged, and it has neither its initial values nor its lag.

Why not derive the momentum from the number of steps instead (a cumulative
average early, `momentum` later)? That removes the initial values but not
the lag: after a short run the average would still weight the first
steps' statistics, computed under weights that training has since changed
the most, as much as the last ones'. Re-estimating with the final weights
is exact whatever the run's length, and costs one forward pass of the
trunk over N batches (no backward pass, no heads): for the default
50-alphabet run (12 epochs of 178 batches) one forward pass over one
epoch, by estimate (not timed) about a third of an epoch's steps, ~3% of
the run.

**When `MultiTaskModel.fit` runs it** (on by default;
`fit(..., recalibrate_batch_norm=False)` or
`model.recalibrate_batch_norm = False` turns it off):

- before the validation of the last epoch (the last of `epochs`, or the
  one after which a callback stopped training), so that epoch's `val_*`
  logs, which callbacks (KerasTuner's objective, checkpoints,
  `BackupAndRestore`, TensorBoard) and the History record, are those of the
  model `fit` returns;
- otherwise at the end of `fit`, when the trunk's weights (or the
  optimizer's step) changed since the last re-estimate: no validation at
  the last epoch, `EarlyStopping` restoring its best weights, an optimizer
  with `use_ema` swapping in its averaged weights.

It runs after the last training step, so training itself (weights,
optimizer state, data order, the model's task sampling) is exactly what it
would be without it; only the moving statistics, which training never
reads, and the evaluations that follow differ. The training data are read
once more for it: a `tf.data` pipeline that reshuffles each iteration
gives a later `fit` on the same dataset object another order than it
would have had.

Under `tf.distribute` the N batches are split over the replicas as in
`fit`; each replica's statistics are those its layer normalised with (the
global batch's with synchronized batch norm, see `backbones.conv_backbone`,
else its own share's), and the average is over batches and replicas, the
same on every replica and worker. Selective Sharing's regrouping changes
only the heads, which hold no batch norm; the function that runs the trunk
is traced anew at every re-estimate, so it never runs a stale graph.

Example:

>>> model.fit(train, validation_data=val, epochs=3)   # re-estimated at the end
>>> recalibrate_batch_norm(model, train)              # or by hand, e.g. after a custom loop
"""

import contextlib
import inspect
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.callbacks import non_finite_weights

_FIT_SIGNATURE = inspect.signature(keras.Model.fit)


def synchronized_by_default():
    """Whether a batch-norm layer built now should be synchronized: under a strategy of more than one replica.

    Per-replica statistics would make R replicas train otherwise than one
    device on the same global batch (each replica normalising its share);
    synchronized, every replica normalises with the global batch's mean and
    variance (one all-reduce per layer and step). With one replica Keras'
    synchronized path computes the variance as `E[x^2] - E[x]^2` instead of
    `tf.nn.moments`' two passes, so single-device models keep the plain
    layer and the numbers they had.
    """
    return tf.distribute.get_strategy().num_replicas_in_sync > 1


def batch_norm_layers(model):
    """The `BatchNormalization` layers of `model` whose moving statistics training updates.

    A layer that is frozen (`trainable=False`), has momentum >= 1 (its
    statistics never move) or uses batch renormalization (other statistics)
    keeps its statistics as they are.
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
        and layer.built
        and layer.trainable
        and not layer.renorm
        and float(layer.momentum) < 1.0
    ]


def recalibration_steps(layers):
    """Default number of batches: `ceil((1 + momentum) / (1 - momentum))` of the slowest layer (see module doc)."""
    # - 1e-9: in floating point (1 + 0.9) / (1 - 0.9) is 19.000000000000004.
    return max(math.ceil((1.0 + float(l.momentum)) / (1.0 - float(l.momentum)) - 1e-9) for l in layers)


def _trunk(model):
    return getattr(model, "backbone", model)


def recalibrate_batch_norm(model, data, steps=None):
    """Sets every batch-norm layer's moving statistics to exact averages over training batches.

    Args:
        model: a `MultiTaskModel` (its trunk's layers are re-estimated, each
            example routed through its own task) or any Keras model whose
            call takes the batches' inputs.
        data: a `tf.data.Dataset` of training batches `(x, y)` or
            `(x, y, sample_weight)` as `fit` takes them (globally batched
            under a distribution strategy).
        steps: batches to average over; default `recalibration_steps`, at
            most one pass over `data`.

    Returns:
        The number of batches averaged over (0: nothing to do, see the
        warnings: no batch-norm layer, non-finite weights, empty data).
    """
    layers = batch_norm_layers(_trunk(model))
    if not layers:
        return 0
    if non_finite_weights(_trunk(model).trainable_weights):
        # Statistics of non-finite weights mean nothing; leave them for the
        # caller that stops on the NaN to report.
        warnings.warn("Batch-norm statistics not re-estimated: the model's weights are not finite.", stacklevel=2)
        return 0
    steps = int(steps or recalibration_steps(layers))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    strategy = model.distribute_strategy
    momenta = [layer.momentum for layer in layers]
    saved = [(np.asarray(l.moving_mean), np.asarray(l.moving_variance)) for l in layers]
    seed_generator = getattr(model, "seed_generator", None)
    seed_state = None if seed_generator is None else np.asarray(seed_generator.state)

    def replica_step(batch):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        if hasattr(model, "make_pairs") and y is None:
            # Inputs without labels (`serving_statistics`): each example
            # through its own task's view of the trunk.
            task_ids = tf.reshape(tf.cast(x["task"], tf.int32), [-1]) if model.routed else None
            model._features(model._image_inputs(x), task_ids, True)
        elif hasattr(model, "make_pairs"):
            pairs = model.make_pairs(x, y, sample_weight, training=True)
            model._pairs_features(pairs.images, pairs.rows, pairs.task_ids, training=True)
        else:
            model(x, training=True)
        # With momentum 0 each layer's moving statistics are now exactly
        # this batch's; the reads are ordered after the layers' assignments
        # (automatic control dependencies on the same variables).
        return [tf.identity(v.value) for l in layers for v in (l.moving_mean, l.moving_variance)]

    @tf.function
    def step(batch):
        values = strategy.run(replica_step, args=(batch,))
        return [strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for v in values]

    sums, count = None, 0
    try:
        for layer in layers:
            # Read when `step` is traced, so this fresh function alone sees it.
            layer.momentum = 0.0
        for batch in strategy.experimental_distribute_dataset(data.take(steps)):
            values = [np.asarray(v, dtype=np.float64) for v in step(batch)]
            sums = values if sums is None else [s + v for s, v in zip(sums, values)]
            count += 1
    except BaseException:
        _assign(layers, saved)
        raise
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        if seed_state is not None:
            # Task sampling of the several-tasks-per-example layout drew
            # from it: training after this goes on as if it had not run.
            seed_generator.state.assign(seed_state)
    if count == 0:
        _assign(layers, saved)
        warnings.warn("Batch-norm statistics not re-estimated: the training data gave no batch.", stacklevel=2)
        return 0
    _assign(layers, [(sums[2 * i] / count, sums[2 * i + 1] / count) for i in range(len(layers))])
    return count


@contextlib.contextmanager
def serving_statistics(model, inputs, batch_size=128, seed=0):
    """Within the block, the trunk's batch norm serves with statistics re-estimated on `inputs`.

    For reading a model in inference mode in the middle of training (e.g.
    Selective Sharing's evidence at an early epoch end), when the moving
    averages may not serve yet (momentum 0.99 needs hundreds of steps): the
    moving statistics are set by `recalibrate_batch_norm` over `inputs`,
    and put back as they were when the block ends, so training and its
    logs go on exactly as without it.

    Args:
        model: a `MultiTaskModel`.
        inputs: images, or a dict with `"image"` (and `"task"`; without it,
            each image of a routed trunk goes through a task drawn at
            random with `seed`).
        batch_size: images per batch of the re-estimate.
        seed: the random tasks' seed.

    Yields:
        The number of batches the statistics were averaged over (0: the
        trunk has no batch norm to re-estimate).
    """
    layers = batch_norm_layers(_trunk(model))
    if not layers:
        yield 0
        return
    images = inputs["image"] if isinstance(inputs, dict) else inputs
    n = len(images)
    tasks = inputs.get("task") if isinstance(inputs, dict) else None
    if tasks is None:
        tasks = np.random.default_rng(seed).integers(0, len(model.tasks), n)
    x = {"image": np.asarray(images), "task": np.asarray(tasks, dtype="int32").reshape(-1)}
    data = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    saved = [(np.asarray(l.moving_mean), np.asarray(l.moving_variance)) for l in layers]
    try:
        yield recalibrate_batch_norm(model, data, steps=-(-n // batch_size))
    finally:
        _assign(layers, saved)


def _assign(layers, statistics):
    for layer, (mean, variance) in zip(layers, statistics):
        layer.moving_mean.assign(np.asarray(mean, dtype=layer.moving_mean.dtype))
        layer.moving_variance.assign(np.asarray(variance, dtype=layer.moving_variance.dtype))


def _training_dataset(arguments, strategy):
    """The training batches `fit` was given, as a dataset (None when they cannot be read again)."""
    x = arguments["x"]
    if isinstance(x, tf.data.Dataset):
        return x
    arrays = tuple(a for a in (x, arguments["y"], arguments["sample_weight"]) if a is not None)
    leaves = tf.nest.flatten(arrays)
    if not leaves or not all(isinstance(a, (np.ndarray, tf.Tensor)) or keras.ops.is_tensor(a) for a in leaves):
        return None  # a generator or PyDataset: one pass may be all there is
    arrays = tf.nest.map_structure(np.asarray, arrays)
    n = len(tf.nest.flatten(arrays)[0])
    if arguments["validation_split"]:
        # Keras' own split: the last `validation_split` of the arrays validates.
        n = int(math.floor(n * (1.0 - arguments["validation_split"])))
    batch_size = int(arguments["batch_size"] or 32)
    order = np.arange(n)
    if arguments["shuffle"]:
        # A fixed seed: the global random state training draws from is left alone.
        order = np.random.default_rng(0).permutation(n)
    arrays = tf.nest.map_structure(lambda a: a[order], arrays)
    # Every batch weighs the same in the average (as in the moving average),
    # so a short last batch would count like a full one; under a strategy it
    # could also leave a replica without examples.
    drop = n >= batch_size or strategy.num_replicas_in_sync > 1
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size, drop_remainder=drop)


class _EpochTracker(keras.callbacks.Callback):
    def __init__(self, session):
        super().__init__()
        self.session = session

    def on_epoch_begin(self, epoch, logs=None):
        self.session.epoch = epoch


class FitRecalibration:
    """The re-estimates of one `MultiTaskModel.fit` call (see the module doc for when they run)."""

    def __init__(self, model, data, epochs, steps=None):
        self.model = model
        self.data = data
        self.epochs = epochs
        self.steps = steps
        self.epoch = None
        self.batches = 0
        self.snapshot = self._weights()

    def _weights(self):
        return [np.array(w) for w in _trunk(self.model).trainable_weights] + [int(self.model.optimizer.iterations.numpy())]

    def _changed(self):
        now = self._weights()
        return any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(now, self.snapshot))

    def run(self):
        self.batches = recalibrate_batch_norm(self.model, self.data, self.steps)
        self.snapshot = self._weights()

    def before_validation(self):
        if self.model.stop_training or self.epoch == self.epochs - 1:
            self.run()

    def after_fit(self):
        if self._changed():
            self.run()


def fit(model, super_fit, args, kwargs, steps=None, data=None):
    """`super_fit(*args, **kwargs)` (Keras' fit) with the re-estimates; returns its History.

    `data` is the dataset to re-estimate on (default: fit's training data).
    """
    if getattr(model, "optimizer", None) is None or not batch_norm_layers(_trunk(model)):
        # Nothing to re-estimate, or not compiled: Keras' own fit() says so.
        return super_fit(*args, **kwargs)
    bound = _FIT_SIGNATURE.bind(model, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    if data is None:
        data = _training_dataset(arguments, model.distribute_strategy)
    if data is None:
        warnings.warn(
            "Batch-norm statistics are not re-estimated after fit() on a generator or PyDataset (it may not be "
            "readable twice); pass a tf.data.Dataset or arrays, or call "
            "mtl_keras.batch_norm.recalibrate_batch_norm(model, dataset) after fit().",
            stacklevel=3,
        )
        return super_fit(*args, **kwargs)
    if arguments["steps_per_epoch"]:
        steps = min(steps or recalibration_steps(batch_norm_layers(_trunk(model))), int(arguments["steps_per_epoch"]))
    session = FitRecalibration(model, data, arguments["epochs"], steps)
    callbacks = arguments["callbacks"]
    tracker = _EpochTracker(session)
    if isinstance(callbacks, keras.callbacks.CallbackList):
        tracker.set_model(model)
        callbacks.callbacks.insert(0, tracker)
    else:
        arguments["callbacks"] = [tracker] + list(callbacks or [])
    model._batch_norm_fit = session
    try:
        history = super_fit(*bound.args[1:], **bound.kwargs)
    finally:
        model._batch_norm_fit = None
    session.after_fit()
    return history
