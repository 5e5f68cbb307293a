import io
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from synthetic import per_example_batch


def small_tasks():
    return TaskSet(
        [
            Task("a", "multiclass", 3),
            Task("b", "multiclass", 5),
            Task("c", "binary", 1),
            Task("d", "regression", 2, loss="huber", metrics=("mae", "mse")),
        ]
    )


def small_model(tasks=None, sigma=0.5, **kwargs):
    tasks = tasks or small_tasks()
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=sigma, filters=(8, 8), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def np_losses(logits, y, t):
    """Reference per-example losses, one task at a time in numpy."""
    out = []
    for z, yy, tt in zip(logits, y, t):
        if tt in (0, 1):
            n = 3 if tt == 0 else 5
            p = np.exp(z[:n] - z[:n].max())
            p /= p.sum()
            out.append(-np.log(p[int(yy[0])]))
        elif tt == 2:
            zz, lab = z[0], yy[0]
            out.append(max(zz, 0) - zz * lab + np.log1p(np.exp(-abs(zz))))
        else:
            d = z[:2] - yy[:2]
            a = np.abs(d)
            out.append(np.mean(np.where(a <= 1, 0.5 * d**2, a - 0.5)))
    return np.array(out)


def test_vectorised_heads_equal_each_head_alone():
    model = small_model()
    x, _ = per_example_batch()
    features = model.backbone(x)
    logits = keras.ops.convert_to_numpy(model.heads_forward(features, x["task"]))
    for i, t in enumerate(x["task"]):
        alone = keras.ops.convert_to_numpy(model.heads[t](features[i : i + 1]))[0]
        n = model.tasks[int(t)].num_outputs
        np.testing.assert_allclose(logits[i, :n], alone, atol=1e-5)
        if model.tasks[int(t)].kind == "multiclass":
            assert np.all(logits[i, n:] <= -1e8)


def test_train_step_per_task_losses_match_reference_and_ignore_missing_labels():
    model = small_model()
    x, y = per_example_batch()
    logits = model.predict(x, verbose=0)
    ref = np_losses(logits, y, x["task"])
    # Missing labels: with one task per example, sample weight 0 leaves an
    # example out (a NaN or -1 label is refused, tests/test_input_checks.py);
    # whatever label a left-out example holds.
    y_missing = y.copy()
    y_missing[0, 0] = -1  # task a
    y_missing[3, :] = np.nan  # task d
    keep = np.ones(len(y), bool)
    keep[[0, 3]] = False
    logs = model.test_on_batch(x, y_missing, sample_weight=keep.astype("float32"), return_dict=True)
    t = x["task"]
    per_task = [ref[(t == k) & keep].mean() for k in range(4)]
    for k, name in enumerate("abcd"):
        assert logs[f"{name}/loss"] == pytest.approx(per_task[k], rel=1e-4)
    assert logs["loss"] == pytest.approx(np.mean(per_task), rel=1e-4)
    # Changing a missing label changes nothing.
    y_other = y_missing.copy()
    y_other[0, 0] = -5
    model.reset_metrics()
    logs2 = model.test_on_batch(x, y_other, sample_weight=keep.astype("float32"), return_dict=True)
    assert logs2["a/loss"] == pytest.approx(logs["a/loss"], rel=1e-6)
    assert 0.0 <= logs["mean_accuracy"] <= 1.0 and "d/mse" in logs and "d/mae" in logs


def test_training_task_losses_are_the_batch_losses_in_training_mode_and_move_no_statistics():
    model = small_model()
    x, y = per_example_batch()
    bn = [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    before = [l.moving_mean.numpy().copy() for l in bn]
    losses = keras.ops.convert_to_numpy(model.training_task_losses((x, y)))
    for l, b in zip(bn, before):
        np.testing.assert_array_equal(l.moving_mean.numpy(), b)
    # Training mode: the batch's own statistics, hence the training-mode logits.
    logits = keras.ops.convert_to_numpy(model(x, training=True))
    ref = np_losses(logits, y, x["task"])
    t = x["task"]
    np.testing.assert_allclose(losses, [ref[t == k].mean() for k in range(4)], rtol=1e-4)
    eval_losses = np_losses(model.predict(x, verbose=0), y, t)
    assert not np.allclose(losses, [eval_losses[t == k].mean() for k in range(4)], rtol=1e-3)


def test_task_weight_scales_its_loss_in_the_objective():
    tasks = TaskSet([Task("a", "multiclass", 3, weight=3.0), Task("b", "multiclass", 5, weight=0.0)])
    model = small_model(tasks)
    x, y = per_example_batch(num_tasks=2)
    logs = model.test_on_batch(x, y[:, 0], return_dict=True)
    assert logs["loss"] == pytest.approx(3.0 * logs["a/loss"] / 2, rel=1e-5)


def test_a_task_loss_reaches_only_its_head_and_routed_units():
    model = small_model(sigma=0.0)
    x, y = per_example_batch()
    only_b = x["task"] == 1
    xb = {"image": x["image"][only_b], "task": x["task"][only_b]}
    with tf.GradientTape() as tape:
        objective, _ = model._step((xb, y[only_b, 0]), training=True)
    variables = model.trainable_variables
    grads = dict(zip([v.path for v in variables], tape.gradient(objective, variables)))
    for i, head in enumerate(model.heads):
        for v in head.trainable_variables:
            g = grads[v.path]
            assert (g is not None and np.abs(g).sum() > 0) == (i == 1), v.path
    # With sigma = 0 the first conv's filters that task b does not own get no gradient.
    mask = model.backbone.get_layer("routing_0").masks[1]
    g = grads[model.backbone.get_layer("block0_conv0").kernel.path].numpy()
    assert np.all(g[..., mask == 0] == 0) and np.abs(g[..., mask == 1]).sum() > 0


def test_fit_learns_and_logs_per_task_names():
    model = small_model()
    x, y = per_example_batch(n=64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    hist = model.fit(ds, validation_data=ds, epochs=8, verbose=0)
    h = hist.history
    for key in ("loss", "mean_accuracy", "a/loss", "a/accuracy", "c/accuracy", "d/mae", "val_b/accuracy"):
        assert key in h, key
    assert h["loss"][-1] < h["loss"][0]


def multi_label_batch(n=16, num_tasks=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 2, (n, num_tasks)).astype("float32")
    y[rng.random((n, num_tasks)) < 0.3] = np.nan
    return x, y


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_several_tasks_per_example_eval_uses_every_labelled_task(sigma):
    tasks = TaskSet([Task(f"attr{i}", "binary", 1) for i in range(6)])
    model = small_model(tasks, sigma=sigma)
    x, y = multi_label_batch()
    logits = model.predict({"image": x}, verbose=0)
    assert logits.shape == (16, 6, 1)
    z = logits[..., 0]
    bce = np.maximum(z, 0) - z * np.nan_to_num(y) + np.log1p(np.exp(-np.abs(z)))
    logs = model.test_on_batch({"image": x}, y, return_dict=True)
    for i in range(6):
        labelled = ~np.isnan(y[:, i])
        assert logs[f"attr{i}/loss"] == pytest.approx(bce[labelled, i].mean(), rel=1e-4)


@pytest.mark.parametrize("sampling", ["per_example", "per_batch"])
def test_tasks_per_step_sampling_picks_k_labelled_tasks(sampling):
    tasks = TaskSet([Task(f"attr{i}", "binary", 1) for i in range(6)])
    model = small_model(tasks, sigma=0.5, tasks_per_step=2, task_sampling=sampling)
    x, y = multi_label_batch()
    y[:, 5] = np.nan  # never labelled: never sampled while others are
    pairs = model.make_pairs({"image": x}, y, training=True)
    ids = keras.ops.convert_to_numpy(pairs.task_ids).reshape(16, 2)
    assert not np.any(ids == 5)
    assert all(len(set(r)) == 2 for r in ids)
    if sampling == "per_batch":
        assert all(set(r) == set(ids[0]) for r in ids)
    w = keras.ops.convert_to_numpy(pairs.weights).reshape(16, 2)
    np.testing.assert_array_equal(w > 0, ~np.isnan(np.take_along_axis(y, ids, axis=1)))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0)


def test_regroup_drops_estimators_and_training_continues(tmp_path):
    model = small_model()
    x, y = per_example_batch(n=32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model.fit(ds, epochs=1, verbose=0)
    before = model.count_params()
    dropped = model.set_estimator_of_task([0, 0, 2, 2])
    assert dropped == [1, 3]
    assert model.count_params() < before
    assert model.task_groups == {0: [0, 1], 2: [2, 3]}
    model.fit(ds, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.estimator_of_task == [0, 0, 2, 2]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="dropped earlier"):
        model.set_estimator_of_task([0, 1, 2, 3])
    with pytest.raises(ValueError, match="an owner must use its own estimator"):
        model.set_estimator_of_task([2, 0, 2, 2])


def test_bad_inputs_give_clear_errors():
    model = small_model()
    x, y = per_example_batch()
    y_bad = y.copy()
    y_bad[1, 0] = 7  # task b has 5 classes
    with pytest.raises(tf.errors.InvalidArgumentError, match="number of classes"):
        model.test_on_batch(x, y_bad)
    with pytest.raises(ValueError, match="one column per task"):
        model.test_on_batch({"image": x["image"]}, y)
    with pytest.raises(ValueError, match="takes no 'loss'"):
        model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="tasks_per_step"):
        small_model(tasks_per_step=0)
    with pytest.raises(ValueError, match="unique"):
        TaskSet([Task("a"), Task("a")])
    with pytest.raises(ValueError, match="kind='binary'"):
        Task("x", "multiclass", 1)


def _train_weights(strategy, data, steps=3, nan_labels=False):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        tasks = small_tasks() if not nan_labels else TaskSet(
            [Task("a", "multiclass", 3), Task("b", "binary", 1), Task("c", "regression", 1)]
        )
        backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(8, 8), seed=0, batch_norm=False)
        model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0, tasks_per_step=len(tasks))
        model.compile(optimizer=keras.optimizers.SGD(0.2))
    initial = [w.numpy() for w in model.weights]
    history = model.fit(data, epochs=steps, verbose=0, shuffle=False)
    return initial, [w.numpy() for w in model.weights], history.history


@pytest.mark.parametrize("layout", ["one_task_per_example", "several_tasks_per_example"])
def test_mirrored_two_replicas_match_one_device(layout):
    """Under MirroredStrategy on 2 logical CPUs a step equals the single-device
    step on the same global batch, even when tasks are spread unevenly over
    the replicas (the per-task means use the global count)."""
    rng = np.random.default_rng(1)
    if layout == "one_task_per_example":
        x, y = per_example_batch(n=16, seed=2)
        # Replica 0 gets tasks 0,1 mostly; replica 1 tasks 2,3: uneven counts.
        x["task"] = np.array([0, 0, 0, 1, 1, 0, 1, 2, 2, 3, 3, 3, 2, 3, 3, 3], "int32")
        y = np.zeros((16, 2), "float32")
        y[:, 0] = [0, 1, 2, 4, 3, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
        y[x["task"] == 3] = rng.normal(size=(6, 2))
        y[5, 0] = np.nan  # a missing label: sample weight 0 leaves it out
        weights = np.ones(16, "float32")
        weights[5] = 0.0
        data = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(16)
        nan_labels = False
    else:
        x = {"image": rng.random((16, 8, 8, 1)).astype("float32")}
        y = np.stack(
            [rng.integers(0, 3, 16), rng.integers(0, 2, 16), rng.normal(size=16)], axis=1
        ).astype("float32")
        y[rng.random((16, 3)) < 0.3] = np.nan
        y[:8, 1] = np.nan  # task b only on the second replica's half
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        nan_labels = True
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest should provide two logical CPU devices"
    init1, one, h1 = _train_weights(tf.distribute.get_strategy(), data, nan_labels=nan_labels)
    init2, two, h2 = _train_weights(tf.distribute.MirroredStrategy(devices), data, nan_labels=nan_labels)
    for a, b in zip(init1, init2):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(init1, one)) > 1e-3, "training did not move the weights"
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-4)
    np.testing.assert_allclose(h1["mean_loss"], h2["mean_loss"], rtol=1e-4)


def test_merge_zeroes_dropped_rows_and_their_optimizer_state_and_reload_restores_all(tmp_path):
    import warnings

    model = small_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    x, y = per_example_batch()
    model.fit(x, y, batch_size=12, epochs=2, verbose=0)
    slots = {v.path: v for v in model.optimizer.variables}
    before = model.count_params()
    model.set_estimator_of_task([0, 0, 2, 2])
    assert [v.path for v in model.optimizer.variables] == list(slots)  # no variable comes or goes
    stacked = model.task_heads.stacked_estimator_variables()
    per_estimator = sum(int(np.prod(v.shape[1:])) for v in stacked)
    assert model.count_params() == before - 2 * per_estimator

    def dropped_rows():
        rows = [v.numpy()[[1, 3]] for v in stacked]
        rows += [s.numpy()[[1, 3]] for p, s in slots.items()
                 if "estimator" in p and s.shape == model.task_heads.estimator_kernels[0].shape]
        return rows

    assert all(np.all(r == 0) for r in dropped_rows())
    assert np.any(stacked[0].numpy()[[0, 2]] != 0)
    # Adam updates every row, but a zero row with zero state and no gradient stays zero.
    model.fit(x, y, batch_size=12, epochs=1, verbose=0)
    assert all(np.all(r == 0) for r in dropped_rows())
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Skipping variable loading for optimizer.*")
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.estimator_of_task == [0, 0, 2, 2]
    assert loaded.count_params() == model.count_params()
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Training resumes from the restored state identically.
    model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def _weight_datasets(keras_file):
    """`{path: shape}` of every array in a `.keras` file's weights."""
    found = {}
    with zipfile.ZipFile(keras_file) as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            weights.visititems(lambda name, obj: found.update({name: obj.shape}) if hasattr(obj, "shape") else None)
    return found


def test_keras_file_keeps_the_weight_layout_of_files_saved_before_task_heads(tmp_path):
    legacy = Path(__file__).parent / "fixtures" / "legacy_v0_1"
    model = keras.saving.load_model(legacy / "model.keras")
    model.save(tmp_path / "resaved.keras")
    # The model's arrays at the same paths (heads/task_head_i/...); the
    # optimizer's state is saved for the stacked variables now.
    layout = _weight_datasets(tmp_path / "resaved.keras")
    model_arrays = lambda found: {p: s for p, s in found.items() if not p.startswith("optimizer/")}
    assert model_arrays(layout) == model_arrays(_weight_datasets(legacy / "model.keras"))
    assert "heads/task_head_1/output_layer/vars/0" in layout
    assert not any(p.startswith(("task_heads", "layers/task_heads")) for p in layout)
    reloaded = keras.saving.load_model(tmp_path / "resaved.keras")
    with np.load(legacy / "expected.npz") as expected:
        probe = {"image": expected["image"], "task": expected["task"]}
        np.testing.assert_allclose(np.asarray(reloaded(probe)), expected["logits"], rtol=1e-5, atol=1e-6)
    for a, b in zip(model.optimizer.variables, reloaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
