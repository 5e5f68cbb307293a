"""Bad input is refused with a message naming the problem and the fix, and changes nothing.

One test (or parametrized case) per row of docs/RELIABILITY.md's bad-input
table: settings (sigma, head dropout), task ids, labels, images, data
smaller than a global batch, non-finite losses, and `.keras` files loaded
with `safe_mode=True`. The app's side is in tests/test_app_train_omniglot_errors.py.
"""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskRouting, TaskSet, conv_backbone, routing_masks
from mtl_keras.callbacks import EmptyDataError, NonFiniteLossError, StopOnNonFiniteLoss
from mtl_keras.distribute import get_strategy, prepare_for_replicas
from mtl_keras.input_checks import describe_error, require_one_global_batch
from synthetic import per_example_batch

# Task ids outside [0, 4) of the four small tasks.
IDS_MESSAGE = r"Task ids must be integers in \[0, 4\): the model has 4 tasks"
LABELS_MESSAGE = "Labels that do not fit their task"
IMAGES_MESSAGE = "holds NaN or Inf values"


def small_tasks():
    return TaskSet(
        [
            Task("a", "multiclass", 3),
            Task("b", "multiclass", 5),
            Task("c", "binary", 1),
            Task("d", "regression", 2),
        ]
    )


def small_model(tasks=None, sigma=0.5, jit_compile=False, lr=0.1, **kwargs):
    tasks = tasks or small_tasks()
    keras.utils.set_random_seed(0)
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=sigma, filters=(4, 8), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr), jit_compile=jit_compile)
    return model


@pytest.fixture(scope="module")
def model():
    """One model for every refusal: a refused batch must leave it exactly as it was, so they can share it."""
    return small_model()


@pytest.fixture(scope="module")
def several_model():
    """The same, for several tasks per example (tasks a, b, c)."""
    return small_model(TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1)]))


def weights_of(model):
    return [v.numpy().copy() for v in model.weights]


def assert_unchanged(model, before):
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)


def dataset(x, y, sample_weight=None, batch=12):
    parts = (x, y) if sample_weight is None else (x, y, sample_weight)
    return tf.data.Dataset.from_tensor_slices(parts).batch(batch)


# --------------------------------------------------------------- 1. settings
@pytest.mark.parametrize("sigma", [1.5, -0.1, float("nan"), float("inf"), "0.5", True, None])
def test_sigma_outside_zero_one_or_not_a_number_is_refused_everywhere(sigma):
    pattern = r"sigma \(the sharing ratio\) must be a number in \[0, 1\], got " + repr(sigma).replace("(", r"\(")
    # routing="auto" used to build an unrouted (hard-sharing) trunk for sigma > 1.
    with pytest.raises(ValueError, match=pattern):
        conv_backbone((8, 8, 1), 3, sigma=sigma, filters=(4,))
    with pytest.raises(ValueError, match=pattern):
        TaskRouting(3, sigma)
    with pytest.raises(ValueError, match=pattern):
        routing_masks(8, 3, sigma, seed=0)


def test_sigma_at_the_ends_of_the_range_is_accepted():
    assert "task" not in [t.name for t in conv_backbone((8, 8, 1), 3, sigma=1, filters=(4,)).inputs]
    assert "task" in [t.name for t in conv_backbone((8, 8, 1), 3, sigma=np.float32(0.0), filters=(4,)).inputs]


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1, float("nan"), "0.2"])
def test_head_dropout_outside_zero_one_is_refused_in_the_models_terms(dropout):
    with pytest.raises(ValueError, match=r"head_dropout .* must be a number in \[0, 1\), got"):
        small_model(head_dropout=dropout)


# --------------------------------------------------------------- 2. task ids
@pytest.mark.parametrize("bad_id", [-1, 4, 17, 1.5])
@pytest.mark.parametrize("entry", ["fit", "evaluate", "predict", "call", "train_on_batch"])
def test_task_ids_outside_the_task_range_are_refused(model, entry, bad_id):
    x, y = per_example_batch()
    if isinstance(bad_id, float):
        x["task"] = x["task"].astype("float32")
    x["task"][5] = bad_id
    before = weights_of(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=IDS_MESSAGE) as error:
        if entry == "fit":
            model.fit(dataset(x, y), epochs=1, verbose=0)
        elif entry == "evaluate":
            model.evaluate(dataset(x, y), verbose=0)
        elif entry == "predict":
            model.predict(x, verbose=0)
        elif entry == "call":
            model(x)
        else:
            model.train_on_batch(x, y)
    assert str(bad_id) in describe_error(error.value)
    assert_unchanged(model, before)


def test_task_ids_are_refused_under_a_mirrored_strategy():
    strategy = get_strategy("mirrored")
    with strategy.scope():
        model = small_model()
    x, y = per_example_batch(n=16)
    x["task"][12] = -1  # on the second replica
    with pytest.raises(tf.errors.InvalidArgumentError, match=IDS_MESSAGE):
        model.fit(dataset(x, y, batch=16), epochs=1, verbose=0)


def test_under_xla_the_checks_run_in_the_data_path():
    """XLA drops assertions from the step; the same checks then run on the data."""
    model = small_model(jit_compile=True)
    x, y = per_example_batch()
    history = model.fit(dataset(x, y), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    before = weights_of(model)
    bad = dict(x, task=x["task"].copy())
    bad["task"][2] = 4
    with pytest.raises(tf.errors.InvalidArgumentError, match=IDS_MESSAGE):
        model.fit(dataset(bad, y), epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=IDS_MESSAGE):
        model.predict(bad, verbose=0)  # arrays: checked once, before predict
    y_bad = y.copy()
    y_bad[1, 0] = 2.5  # task b
    with pytest.raises(tf.errors.InvalidArgumentError, match=LABELS_MESSAGE) as error:
        model.evaluate(dataset(x, y_bad), verbose=0)
    assert "task b (id 1) takes an integer class index in [0, 5)" in describe_error(error.value)
    nan_image = dict(x, image=x["image"].copy())
    nan_image["image"][0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=IMAGES_MESSAGE):
        model.fit(x=nan_image, y=y, batch_size=12, epochs=1, verbose=0)
    assert_unchanged(model, before)


# ----------------------------------------------------------------- 3. labels
@pytest.mark.parametrize(
    "row, value, named",
    [
        (0, -1.0, r"task a \(id 0\) takes an integer class index in \[0, 3\)"),
        (0, np.nan, r"task a \(id 0\) takes an integer class index in \[0, 3\)"),
        (0, 1.5, r"task a \(id 0\) takes an integer class index in \[0, 3\)"),
        (1, 5.0, r"task b \(id 1\) takes an integer class index in \[0, 5\)"),
        (2, 2.0, r"task c \(id 2\) takes 0 or 1"),
        (2, -0.5, r"task c \(id 2\) takes 0 or 1"),
        (2, np.nan, r"task c \(id 2\) takes 0 or 1"),
        (3, np.nan, r"task d \(id 3\) takes 2 finite value\(s\)"),
        (3, np.inf, r"task d \(id 3\) takes 2 finite value\(s\)"),
    ],
)
def test_one_task_per_example_labels_that_do_not_fit_their_task_are_refused(model, row, value, named):
    x, y = per_example_batch()
    y = y.copy()
    y[row, 1 if row == 3 else 0] = value  # task d: its second target
    before = weights_of(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=LABELS_MESSAGE) as error:
        model.fit(dataset(x, y), epochs=1, verbose=0)
    message = describe_error(error.value)
    assert "sample_weight 0" in message and "number of classes" in message and "missing" in message
    assert re.search(named, message), message
    # Only the offending task is named.
    assert message.count("(id ") == 1
    assert_unchanged(model, before)


def test_sample_weight_zero_leaves_an_example_out_whatever_its_label(model):
    model.reset_metrics()
    x, y = per_example_batch()
    weights = np.ones(len(y), "float32")
    weights[[0, 3]] = 0.0
    clean = model.test_on_batch(x, y, sample_weight=weights, return_dict=True)
    y_bad = y.copy()
    y_bad[0, 0], y_bad[3, :] = np.nan, np.inf
    model.reset_metrics()
    logs = model.test_on_batch(x, y_bad, sample_weight=weights, return_dict=True)
    assert all(math.isfinite(v) for v in logs.values())
    for key in clean:
        assert logs[key] == pytest.approx(clean[key], rel=1e-6), key


def test_binary_probability_labels_are_accepted(model):
    x, y = per_example_batch()
    y = y.copy()
    y[2, 0] = 0.7  # task c, a soft target
    logs = model.test_on_batch(x, y, return_dict=True)
    assert math.isfinite(logs["c/loss"])


@pytest.mark.parametrize(
    "column, value, named",
    [(0, 1.5, r"task a \(id 0\) takes an integer class index"), (1, 5.0, r"task b \(id 1\)"),
     (2, 1.5, r"task c \(id 2\) takes 0 or 1")],
)
def test_several_tasks_per_example_keep_nan_as_missing_and_refuse_what_fits_no_class(
    several_model, column, value, named
):
    model = several_model
    model.reset_metrics()
    rng = np.random.default_rng(0)
    x = {"image": rng.random((6, 8, 8, 1)).astype("float32")}
    y = np.stack([rng.integers(0, 3, 6), rng.integers(0, 5, 6), rng.integers(0, 2, 6)], 1).astype("float32")
    y[0, 0], y[1, 1] = np.nan, -1.0  # missing: still fine in this layout
    logs = model.test_on_batch(x, y, return_dict=True)
    assert all(math.isfinite(v) for v in logs.values())
    y[2, column] = value
    with pytest.raises(tf.errors.InvalidArgumentError, match=named):
        model.test_on_batch(x, y)


# ----------------------------------------------------------------- 4. images
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["one_task_per_example", "several_tasks_per_example"])
def test_non_finite_images_are_refused(model, several_model, layout, value):
    x, y = per_example_batch()
    if layout == "several_tasks_per_example":
        model = several_model
        x = {"image": x["image"]}
        y = np.stack([np.arange(12) % 3, np.arange(12) % 5, np.arange(12) % 2], 1).astype("float32")
    x["image"][4, 1, 2, 0] = value
    before = weights_of(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=IMAGES_MESSAGE) as error:
        model.fit(dataset(x, y), epochs=1, verbose=0)
    assert "dataset.filter" in describe_error(error.value) and "Number of non-finite values" in str(error.value)
    for call in (lambda: model.evaluate(dataset(x, y), verbose=0), lambda: model.predict(x, verbose=0)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=IMAGES_MESSAGE):
            call()
    assert_unchanged(model, before)


# ----------------------------------------------------- 5. less than one batch
def test_fit_and_evaluate_on_no_batch_are_refused(model):
    x, y = per_example_batch()
    empty = dataset(x, y).take(0)
    with pytest.raises(EmptyDataError, match=r"fit\(\) \(epoch 1\) got no batch.*Check the dataset"):
        model.fit(empty, epochs=2, verbose=0)
    with pytest.raises(EmptyDataError, match=r"evaluate\(\) got no batch"):
        model.evaluate(empty, verbose=0)
    with pytest.raises(EmptyDataError, match=r"validation pass of fit\(\) got no batch"):
        model.fit(dataset(x, y), validation_data=empty, epochs=1, verbose=0)
    assert isinstance(EmptyDataError("x"), ValueError)


def test_training_set_smaller_than_one_global_batch_on_two_replicas_is_refused():
    """prepare_for_replicas drops the only (short) batch: Keras would train on nothing and return."""
    strategy = get_strategy("mirrored")
    with strategy.scope():
        model = small_model()
    x, y = per_example_batch(n=12)
    before = weights_of(model)
    train = prepare_for_replicas(dataset(x, y, batch=16), 16, strategy, training=True)
    with pytest.raises(EmptyDataError, match=r"With 2 replicas, prepare_for_replicas\(\.\.\., training=True\) drops"):
        model.fit(train, epochs=1, verbose=0)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"training data has 12 examples, fewer than one global batch of 16 "
                                         r"\(2 replica\(s\)\).*batch size of at most 12"):
        require_one_global_batch(12, 16, 2)
    with pytest.raises(ValueError, match="training data has 0 examples"):
        require_one_global_batch(0, 16, 1)
    require_one_global_batch(12, 16, 1)  # one replica trains on the short batch
    require_one_global_batch(16, 16, 2)


# ---------------------------------------------------------------- 6. NaN loss
def _exploding_regression(planted_batch, n_batches=3):
    """Tasks a (3 classes) and r (regression, mse); r's label 3e38 squares to inf in `planted_batch`."""
    tasks = TaskSet([Task("a", "multiclass", 3), Task("r", "regression", 1)])
    rng = np.random.default_rng(0)
    n = 8 * n_batches
    x = {"image": rng.random((n, 8, 8, 1)).astype("float32"), "task": (np.arange(n) % 2).astype("int32")}
    y = np.where(x["task"] == 0, np.arange(n) % 3, rng.normal(size=n)).astype("float32")
    y[planted_batch * 8 + 1] = 3e38  # finite, so no input check refuses it
    return small_model(tasks), tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches, self.epochs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(batch)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_a_non_finite_loss_stops_training_and_names_exactly_its_task():
    model, data = _exploding_regression(planted_batch=1)
    later = _Recorder()
    with pytest.raises(NonFiniteLossError) as error:
        model.fit(data, epochs=3, verbose=0, callbacks=[later])
    assert error.value.tasks == ["r"]
    assert (error.value.epoch, error.value.batch) == (0, 1)
    message = str(error.value)
    assert "task(s) 'r' went NaN or infinite in epoch 1, step 2" in message and "'a'" not in message
    assert "Lower the learning rate" in message
    # Raised at once, before a later callback (a backup, say) saw the step or an epoch's end.
    assert later.batches == [0] and later.epochs == []


def test_a_huge_learning_rate_is_stopped_at_its_first_non_finite_loss():
    model = small_model(lr=1e30)
    x, y = per_example_batch(n=48)
    with pytest.raises(NonFiniteLossError, match="went NaN or infinite in epoch 1") as error:
        model.fit(dataset(x, y), epochs=5, verbose=0, callbacks=[_Recorder()])
    assert error.value.tasks and set(error.value.tasks) <= {"a", "b", "c", "d"}


def test_a_weight_gone_nan_behind_finite_losses_stops_the_epoch_and_is_named():
    """A batch norm's moving variance never reaches a training loss: only the weights' scan sees it."""
    model = small_model()
    x, y = per_example_batch(n=48)

    class PlantNaN(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                variance = self.model.get_layer("conv_backbone").get_layer("block1_bn0").moving_variance
                variance.assign(np.where(np.arange(variance.shape[0]) == 3, np.inf, variance.numpy()))

    later = _Recorder()
    with pytest.raises(NonFiniteLossError, match="went NaN or infinite in epoch 1") as error:
        model.fit(dataset(x, y), epochs=2, verbose=0, callbacks=[PlantNaN(), later])
    assert "weight(s) 'block1_bn0/moving_variance' went" in str(error.value) and "block0" not in str(error.value)
    assert error.value.epoch == 0 and error.value.tasks == []
    # Every step's losses were finite, and the epoch's end was refused before a later callback saw it.
    assert later.batches == [0, 1, 2, 3] and later.epochs == []


def test_evaluation_with_a_non_finite_loss_is_refused_and_the_guard_can_be_turned_off():
    model, data = _exploding_regression(planted_batch=0, n_batches=1)
    with pytest.raises(NonFiniteLossError, match=r"The evaluation loss of task\(s\) 'r' is NaN or infinite"):
        model.evaluate(data, verbose=0)
    model.stop_on_non_finite_loss = False
    history = model.fit(data, epochs=1, verbose=0)
    assert not np.isfinite(history.history["r/loss"][0])
    # A StopOnNonFiniteLoss of the caller's own is used instead of a second one.
    model.stop_on_non_finite_loss = True
    with pytest.raises(NonFiniteLossError):
        model.fit(data, epochs=1, verbose=0, callbacks=[StopOnNonFiniteLoss()])


# --------------------------------------------------------------- 7. safe_mode
# Every weighting's .keras round trip loads with safe_mode=True in
# tests/test_weighting.py; this case adds merged heads, dropout, a
# regularizer and independent routing masks, with a stateful weighting.
@pytest.mark.parametrize("weighting", ["uncertainty"])
def test_keras_files_load_with_safe_mode(tmp_path, weighting):
    tasks = small_tasks()
    keras.utils.set_random_seed(0)
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.25, filters=(8, 8), dense_units=(8,),
                             routing_mode="independent", seed=3)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), head_dropout=0.1, head_regularizer="l2",
                           weighting=weighting, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = per_example_batch()
    model.fit(dataset(x, y), epochs=1, verbose=0)
    model.set_estimator_of_task([0, 0, 2, 2])  # merged heads
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.estimator_of_task == [0, 0, 2, 2]
    assert type(loaded.weighting).__name__ == type(model.weighting).__name__
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    loaded.fit(dataset(x, y), epochs=1, verbose=0)  # and trains on


def test_the_legacy_keras_file_loads_with_safe_mode():
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "legacy_v0_1" / "model.keras"
    model = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(model, MultiTaskModel)


# ------------------------------------------------------------------ serving
def test_the_exported_serving_signature_refuses_bad_task_ids_and_nan_pixels(model, tmp_path):
    """Task ids: export.py's own check; NaN pixels: the model's (its call() checks every batch)."""
    from mtl_keras.export import export_for_serving

    served = tf.saved_model.load(str(export_for_serving(model, tmp_path / "saved", task_signatures=False)))
    serve = served.signatures["serving_default"]
    x, _ = per_example_batch()
    out = serve(image=tf.constant(x["image"]), task=tf.constant(x["task"]))
    assert out["predicted_class"].shape == (12,)
    for bad_id, message in ((-1, r"task ids must be in \[0, 4\); got a negative id"),
                            (4, r"task ids must be in \[0, 4\) \(the model has 4 tasks\)")):
        task = x["task"].copy()
        task[3] = bad_id
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(image=tf.constant(x["image"]), task=tf.constant(task))
    image = x["image"].copy()
    image[0, 0, 0, 0] = np.nan
    # The export's own request check (export.py) names the NaN example before the model runs.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"NaN or infinite pixels in examples\] \[0\]"):
        serve(image=tf.constant(image), task=tf.constant(x["task"]))
