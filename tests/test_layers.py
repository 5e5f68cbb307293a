import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import Task, TaskSet
from mtl_keras.layers import ClosedFormBatchNormalization, TaskHead, TaskHeads, TaskRouting, routing_masks
from mtl_keras.layers.task_heads import per_pair_matmul, summed_outer_products

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("channels,tasks", [(64, 8), (64, 50), (16, 3)])
def test_partition_sigma_one_shares_everything(channels, tasks):
    m = routing_masks(channels, tasks, 1.0, seed=0)
    assert m.shape == (tasks, channels)
    assert np.all(m == 1.0)


@pytest.mark.parametrize("channels,tasks", [(64, 8), (64, 50), (16, 3), (10, 10)])
def test_partition_sigma_zero_gives_disjoint_subnetworks(channels, tasks):
    m = routing_masks(channels, tasks, 0.0, seed=3)
    # Every unit has exactly one owner, every task owns floor or ceil of C/T.
    np.testing.assert_array_equal(m.sum(axis=0), np.ones(channels))
    per_task = m.sum(axis=1)
    assert set(per_task) <= {channels // tasks, -(-channels // tasks)}
    assert per_task.sum() == channels
    overlap = m @ m.T
    np.testing.assert_array_equal(overlap - np.diag(np.diag(overlap)), 0)


@pytest.mark.parametrize("sigma", [0.25, 0.5, 0.75])
def test_partition_intermediate_sigma(sigma):
    channels, tasks = 64, 8
    m = routing_masks(channels, tasks, sigma, seed=1)
    n_shared = round(sigma * channels)
    owners = m.sum(axis=0)
    assert np.sum(owners == tasks) == n_shared  # shared by all
    assert np.sum(owners == 1) == channels - n_shared  # task-specific
    assert set(owners) <= {1, tasks}
    specific = (channels - n_shared) / tasks
    kept = m.sum(axis=1)
    assert np.all(kept >= n_shared + np.floor(specific))
    assert np.all(kept <= n_shared + np.ceil(specific))
    # Fraction each task keeps is sigma + (1 - sigma) / T, up to rounding.
    np.testing.assert_allclose(kept.mean() / channels, sigma + (1 - sigma) / tasks, atol=1 / channels)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9, 1.0])
def test_independent_mode_keeps_round_sigma_c_units(sigma):
    m = routing_masks(100, 20, sigma, seed=2, mode="independent")
    np.testing.assert_array_equal(m.sum(axis=1), max(1, round(sigma * 100)))
    if sigma < 1:
        assert len({tuple(r) for r in m}) > 1  # tasks differ


def test_same_seed_same_masks_other_seed_other_masks():
    a = routing_masks(64, 10, 0.5, seed=7)
    b = routing_masks(64, 10, 0.5, seed=7)
    c = routing_masks(64, 10, 0.5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    la, lb = TaskRouting(10, 0.5, seed=7), TaskRouting(10, 0.5, seed=7)
    la.build((None, 64))
    lb.build((None, 64))
    np.testing.assert_array_equal(la.masks, lb.masks)


def test_bad_sigma_and_too_few_units_raise_clear_errors():
    with pytest.raises(ValueError, match="sigma"):
        TaskRouting(3, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        TaskRouting(3, "half")
    with pytest.raises(ValueError, match="at least 50 units"):
        routing_masks(16, 50, 0.0, seed=0)
    with pytest.raises(ValueError, match="routing mode"):
        TaskRouting(3, 0.5, mode="bogus")


def test_seed_none_is_recorded_in_config():
    layer = TaskRouting(4, 0.5)
    assert isinstance(layer.get_config()["seed"], int)
    clone = TaskRouting.from_config(layer.get_config())
    layer.build((None, 32))
    clone.build((None, 32))
    np.testing.assert_array_equal(layer.masks, clone.masks)


# ---------------------------------------------------------------- routing
def test_routing_masks_each_example_by_its_task_conv_and_dense():
    layer = TaskRouting(3, 0.5, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 5, 5, 8)).astype("float32")
    ids = np.array([0, 2, 1, 2])
    y = keras.ops.convert_to_numpy(layer(x, ids))
    masks = layer.masks
    np.testing.assert_allclose(y, x * masks[ids][:, None, None, :])
    dense = TaskRouting(3, 0.0, seed=0)
    z = np.ones((3, 6), "float32")
    out = keras.ops.convert_to_numpy(dense(z, np.array([0, 1, 2])))
    np.testing.assert_array_equal(out, dense.masks)


def test_gradient_is_masked_for_units_a_task_does_not_own():
    layer = TaskRouting(2, 0.5, seed=4)
    x = tf.Variable(np.ones((2, 16), "float32"))
    ids = tf.constant([0, 1])
    with tf.GradientTape() as tape:
        # Only example 0 (task 0) contributes to the loss.
        loss = tf.reduce_sum(layer(x, ids)[0] ** 2)
    g = tape.gradient(loss, x).numpy()
    masks = layer.masks
    np.testing.assert_array_equal(g[0] != 0, masks[0] == 1)
    np.testing.assert_array_equal(g[1], 0)
    assert (masks[0] == 0).any()


def test_routing_model_keras_roundtrip(tmp_path):
    image = keras.Input((6, 6, 2), name="image")
    task = keras.Input((), dtype="int32", name="task")
    h = keras.layers.Conv2D(8, 3, padding="same")(image)
    h = TaskRouting(5, 0.3, seed=11, name="route")(h, task)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(10)(h)
    h = TaskRouting(5, 0.0, seed=12)(h, task)
    model = keras.Model({"image": image, "task": task}, h)
    data = {"image": np.random.rand(6, 6, 6, 2).astype("float32"), "task": np.arange(6) % 5}
    before = model.predict(data, verbose=0)
    path = tmp_path / "routing.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(data, verbose=0), before, atol=1e-6)
    np.testing.assert_array_equal(loaded.get_layer("route").masks, model.get_layer("route").masks)
    # Masks are weights: a model built with another seed routes like the saved
    # one once the weights are loaded (what KerasTuner's reload relies on).
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"].endswith("TaskRouting"):
            layer["config"]["seed"] = 999
    other = keras.Model.from_config(config)
    assert not np.array_equal(other.get_layer("route").masks, model.get_layer("route").masks)
    model.save_weights(tmp_path / "w.weights.h5")
    other.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(other.get_layer("route").masks, model.get_layer("route").masks)
    np.testing.assert_allclose(other.predict(data, verbose=0), before, atol=1e-6)


# -------------------------------------------------------------------- head
def test_task_head_shapes_roundtrip_and_drop(tmp_path):
    head = TaskHead(7, hidden_units=(16, 8), dropout=0.1, name="h")
    x = np.random.rand(3, 12).astype("float32")
    assert head(x).shape == (3, 7)
    assert len(head.trainable_variables) == 6
    inp = keras.Input((12,))
    model = keras.Model(inp, head(inp))
    model.save(tmp_path / "head.keras")
    loaded = keras.models.load_model(tmp_path / "head.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    head.drop_estimator()
    assert not head.has_estimator
    assert len(head.trainable_variables) == 2  # only the output layer remains
    with pytest.raises(ValueError, match="shares another head's estimator"):
        head(x)
    assert TaskHead.from_config(head.get_config()).has_estimator is False


def test_task_head_rejects_bad_settings():
    with pytest.raises(ValueError, match="hidden_units"):
        TaskHead(3, hidden_units=(0,))
    with pytest.raises(ValueError, match="dropout"):
        TaskHead(3, dropout=1.0)


# ------------------------------------------------------------------- heads
def head_tasks():
    return TaskSet([Task("a", "multiclass", 5), Task("b", "binary", 1), Task("c", "multiclass", 3),
                    Task("d", "regression", 2)])


def test_task_heads_pass_equals_each_pair_through_its_own_head_before_and_after_a_merge():
    heads = TaskHeads(head_tasks(), hidden_units=(6, 4), name="heads")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 10)).astype("float32")
    task_ids = np.arange(8, dtype="int32") % 4
    logits = keras.ops.convert_to_numpy(heads(features, task_ids))
    assert logits.shape == (8, 5) and heads.compute_output_shape((8, 10)) == (8, 5)
    for i, t in enumerate(task_ids):
        alone = keras.ops.convert_to_numpy(heads.heads[t](features[i : i + 1]))[0]
        n = heads.tasks[int(t)].num_outputs
        np.testing.assert_allclose(logits[i, :n], alone, atol=1e-5)
        if heads.tasks[int(t)].kind == "multiclass":
            assert np.all(logits[i, n:] <= -1e8)
    params = heads.count_params()
    assert heads.set_estimator_of_task([0, 0, 2, 0]) == [1, 3]
    assert heads.estimator_owners == [0, 2] and heads.task_groups == {0: [0, 1, 3], 2: [2]}
    assert heads.count_params() == params - 2 * (10 * 6 + 6 + 6 * 4 + 4)
    merged = keras.ops.convert_to_numpy(heads(features, task_ids))
    for i, t in enumerate(task_ids):
        owner = heads.heads[heads.estimator_of_task[t]]
        alone = keras.ops.convert_to_numpy(heads.heads[t].output_layer(owner.estimate(features[i : i + 1])))[0]
        np.testing.assert_allclose(merged[i, : heads.tasks[int(t)].num_outputs], alone, atol=1e-5)
    with pytest.raises(ValueError, match="dropped earlier"):
        heads.set_estimator_of_task([0, 1, 2, 0])
    with pytest.raises(ValueError, match="an owner must use its own estimator"):
        heads.set_estimator_of_task([2, 0, 2, 0])
    with pytest.raises(ValueError, match="one entry per task"):
        heads.set_estimator_of_task([0, 0, 2])
    assert heads.estimator_of_task == [0, 0, 2, 0]  # a refused regrouping changes nothing


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("row,rows", [
    ([0, 2, 2, 5, 0, 2, 0, 5, 3], 9),             # padded into blocks: repeated rows, unused rows
    ([4] * 40 + [0, 1, 2, 3, 5, 6, 7, 8], 100),   # 100 rows x 40 > 32 x 48 pairs: one pair at a time
    ([], 9),                                      # no pairs: zeros
])
def test_summed_outer_products_equal_numpy(row, rows, jit):
    rng = np.random.default_rng(2)
    h = rng.normal(size=(len(row), 5)).astype("float32")
    g = rng.normal(size=(len(row), 3)).astype("float32")
    want = np.zeros((rows, 5, 3), "float32")
    for p, r in enumerate(row):
        want[r] += np.outer(h[p], g[p])
    f = tf.function(summed_outer_products, jit_compile=True) if jit else summed_outer_products
    got = f(tf.constant(h), tf.constant(g), tf.constant(row, "int32"), rows)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_per_pair_matmul_values_and_gradients_equal_the_gathered_einsum(jit):
    # Repeated rows (summed gradients), rows no pair uses (zero gradient), one row used once.
    rng = np.random.default_rng(1)
    h = tf.constant(rng.normal(size=(9, 5)), "float32")
    kernels = tf.constant(rng.normal(size=(6, 5, 3)), "float32")
    row = tf.constant([0, 2, 2, 5, 0, 2, 0, 5, 3], "int32")
    upstream = tf.constant(rng.normal(size=(9, 3)), "float32")

    def both(f):
        with tf.GradientTape() as tape:
            tape.watch([h, kernels])
            y = f(h, kernels, row)
            loss = tf.reduce_sum(y * upstream)
        return [tf.convert_to_tensor(t) for t in [y, *tape.gradient(loss, [h, kernels])]]

    reference = lambda h, k, r: tf.einsum("pi,pio->po", h, tf.gather(k, r))
    fast = tf.function(lambda: both(per_pair_matmul), jit_compile=True) if jit else (lambda: both(per_pair_matmul))
    for got, want in zip(fast(), both(reference)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    dkernels = fast()[2].numpy()
    assert np.all(dkernels[[1, 4]] == 0) and np.any(dkernels[3] != 0)


def test_per_pair_matmul_promotes_16_bit_features_like_einsum():
    h = tf.ones((2, 4), "bfloat16")
    kernels = tf.ones((3, 4, 2), "float32")
    out = per_pair_matmul(h, kernels, tf.constant([0, 2]))
    assert out.dtype == tf.float32 and np.all(out.numpy() == 4)


@pytest.mark.parametrize("jit", [False, True])
def test_task_heads_gradient_names_only_the_estimator_rows_the_batch_uses(jit):
    tasks = TaskSet([Task(f"t{i}", "multiclass", 3) for i in range(6)])
    # tanh: no unit is dead, so every row a pair uses gets a gradient.
    heads = TaskHeads(tasks, hidden_units=(4,), activation="tanh", estimator_of_task=[0, 1, 1, 3, 4, 5])
    features = tf.constant(np.random.default_rng(0).normal(size=(5, 8)), "float32")
    task_ids = tf.constant([2, 0, 2, 1, 5], "int32")  # owners 1, 0, 1, 1, 5
    heads(features, task_ids)

    def gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(heads(features, task_ids) ** 2)
        return tape.gradient(loss, heads.estimator_kernels[0])

    g = tf.function(gradient, jit_compile=True)() if jit else gradient()
    assert isinstance(g, tf.IndexedSlices)
    if not jit:  # each row once (under XLA, one slice per pair, summed by the optimizer)
        assert sorted(g.indices.numpy().tolist()) == [0, 1, 5]
    dense = tf.convert_to_tensor(g).numpy()
    assert np.all(np.any(dense[[0, 1, 5]] != 0, axis=(1, 2))) and not np.any(dense[[2, 3, 4]])
    # The output layers: the units of tasks 0, 1, 2 and 5 (3 each, rows 3t to 3t + 2).
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(heads(features, task_ids) ** 2)
    g = tape.gradient(loss, heads.output_kernel)
    assert isinstance(g, tf.IndexedSlices) and sorted(g.indices.numpy().tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 17]


def test_task_heads_own_the_dropout_and_their_heads_have_none():
    heads = TaskHeads(head_tasks(), hidden_units=(64,), dropout=0.5)
    features = np.ones((16, 8), "float32")
    task_ids = np.zeros(16, "int32")
    assert all(head.dropout == 0.0 and head.dropout_layer is None for head in heads.heads)
    inference = keras.ops.convert_to_numpy(heads(features, task_ids))
    np.testing.assert_allclose(inference, keras.ops.convert_to_numpy(heads(features, task_ids)))
    np.testing.assert_allclose(inference[0], keras.ops.convert_to_numpy(heads.heads[0](features[:1]))[0], atol=1e-5)
    training = keras.ops.convert_to_numpy(heads(features, task_ids, training=True))
    # Identical pairs get their own dropout masks.
    assert not np.allclose(training, inference) and len({tuple(r) for r in np.round(training, 5)}) > 1
    with pytest.raises(ValueError, match="dropout"):
        TaskHeads(head_tasks(), dropout=1.0)


def test_task_heads_compute_float32_logits_under_mixed_precision():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        heads = TaskHeads(head_tasks(), hidden_units=(4,))
        out = heads(np.ones((3, 6), "float16"), np.array([0, 1, 2], "int32"))
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert all(v.dtype == "float32" for v in heads.weights)


def test_task_heads_keras_roundtrip_keeps_the_merged_grouping(tmp_path):
    features = keras.Input((10,), name="features")
    task = keras.Input((), dtype="int32", name="task")
    heads = TaskHeads(head_tasks(), hidden_units=(6,), dropout=0.2, kernel_regularizer="l2", name="heads")
    model = keras.Model({"features": features, "task": task}, heads(features, task))
    heads.set_estimator_of_task([0, 0, 2, 2])
    data = {"features": np.random.default_rng(1).normal(size=(8, 10)).astype("float32"),
            "task": np.arange(8, dtype="int32") % 4}
    before = model.predict(data, verbose=0)
    model.save(tmp_path / "heads.keras")
    loaded = keras.models.load_model(tmp_path / "heads.keras")
    clone = loaded.get_layer("heads")
    assert isinstance(clone, TaskHeads) and clone.estimator_of_task == [0, 0, 2, 2]
    assert [h.has_estimator for h in clone.heads] == [True, False, True, False]
    assert clone.dropout == 0.2 and clone.get_config() == heads.get_config()
    np.testing.assert_allclose(loaded.predict(data, verbose=0), before, atol=1e-6)


# ------------------------------------------------------------ batch norm
def _bn_pair(momentum=0.9, **kwargs):
    ours, keras_bn = ClosedFormBatchNormalization(momentum=momentum, **kwargs), keras.layers.BatchNormalization(
        momentum=momentum, **kwargs)
    return ours, keras_bn


def _bn_run(layer, x, upstream, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, upstream.dtype) * upstream)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [y, *grads, layer.moving_mean, layer.moving_variance]


@pytest.mark.parametrize("shape,jit,dtype", [((16, 6, 6, 5), False, "float32"), ((16, 6, 6, 5), True, "float32"),
                                             ((32, 7), False, "float32"), ((64, 16, 16, 8), False, "float32"),
                                             ((8, 3, 4, 5, 6), False, "float32"), ((16, 6, 6, 5), False, "float64")])
def test_closed_form_batch_norm_equals_keras_batch_norm(shape, jit, dtype):
    rng = np.random.default_rng(0)
    # Off-centre inputs with unequal channel scales, as a conv without bias gives.
    x = tf.constant(rng.normal(size=shape) * rng.uniform(0.1, 3, shape[-1]) + rng.normal(size=shape[-1]) * 4, dtype)
    upstream = tf.constant(rng.normal(size=shape), dtype)
    ours, reference = _bn_pair(dtype=dtype)
    gamma = rng.uniform(0.5, 2, shape[-1]).astype(dtype)
    for layer in (ours, reference):
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(np.arange(shape[-1], dtype=dtype))
    run = tf.function(_bn_run, jit_compile=True) if jit else _bn_run
    got, want = run(ours, x, upstream), _bn_run(reference, x, upstream)
    for name, a, b in zip(["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"], got, want):
        # Float rounding of a sum over many terms scales with the largest entry, not with each.
        atol = max(2e-5, 1e-5 * float(np.abs(np.asarray(b)).max()))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=atol, err_msg=name)
    # Inference reads the moving statistics, like the parent.
    np.testing.assert_allclose(ours(x, training=False).numpy(), reference(x, training=False).numpy(), atol=1e-5)


def test_closed_form_batch_norm_falls_back_to_keras_where_it_does_not_apply():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(8, 4, 3)), "float32")
    upstream = tf.constant(rng.normal(size=(8, 4, 3)), "float32")
    for kwargs in ({"axis": 1}, {"renorm": True}):
        ours, reference = _bn_pair(**kwargs)
        assert not ours._closed_form_applies(x, True, None)
        for a, b in zip(_bn_run(ours, x, upstream), _bn_run(reference, x, upstream)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_closed_form_batch_norm_equals_keras_with_and_without_onednn_kernels(onednn):
    """The comparison above in a fresh process with oneDNN's kernels on (users' default) and off."""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = (
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        f"assert port.IsMklEnabled() == {onednn == '1'}\n"
        "import tests.test_layers as t\n"
        "for shape in [(16, 6, 6, 5), (32, 7), (64, 16, 16, 8)]:\n"
        "    t.test_closed_form_batch_norm_equals_keras_batch_norm(shape, False, 'float32')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_closed_form_batch_norm_keeps_float32_statistics_under_mixed_precision(tmp_path):
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        bn = ClosedFormBatchNormalization()
        y = bn(tf.ones((4, 3, 3, 2), "bfloat16") * tf.range(4, dtype="bfloat16")[:, None, None, None], training=True)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert y.dtype == tf.bfloat16 and bn.moving_mean.dtype == "float32"
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.01 * 1.5, rtol=1e-6)
    inputs = keras.Input((3, 3, 2))
    model = keras.Model(inputs, ClosedFormBatchNormalization(name="bn")(inputs))
    model.get_layer("bn").moving_variance.assign([2.0, 3.0])
    model.save(tmp_path / "bn.keras")
    loaded = keras.saving.load_model(tmp_path / "bn.keras")
    assert isinstance(loaded.get_layer("bn"), ClosedFormBatchNormalization)
    np.testing.assert_array_equal(loaded.get_layer("bn").moving_variance.numpy(), [2.0, 3.0])


@pytest.mark.parametrize("convs_per_block", [1, 2])
def test_backbone_pooling_before_routing_and_relu_equals_pooling_last(convs_per_block):
    from mtl_keras.backbones import conv_backbone

    trunk = conv_backbone((8, 8, 1), num_tasks=3, sigma=0.5, filters=(4, 6), convs_per_block=convs_per_block,
                          dense_units=(5,), seed=0)
    rng = np.random.default_rng(0)
    inputs = {"image": tf.constant(rng.normal(size=(6, 8, 8, 1)), "float32"), "task": tf.constant([0, 1, 2, 0, 1, 2])}
    layer = trunk.get_layer

    def pooling_last():
        # The textbook order, conv -> BN -> routing -> ReLU, pool at the block's end.
        x, r = inputs["image"], 0
        for b in range(2):
            for c in range(convs_per_block):
                x = layer(f"block{b}_bn{c}")(layer(f"block{b}_conv{c}")(x), training=True)
                x = tf.nn.relu(layer(f"routing_{r}")(x, inputs["task"]))
                r += 1
            x = layer(f"block{b}_pool")(x)
        x = tf.nn.relu(layer(f"routing_{r}")(layer("dense0")(tf.reduce_mean(x, axis=(1, 2))), inputs["task"]))
        return x

    def gradients(forward):
        with tf.GradientTape() as tape:
            y = forward()
            loss = tf.reduce_sum(y * tf.range(1.0, 6.0))
        return [y, *tape.gradient(loss, trunk.trainable_variables)]

    got = gradients(lambda: trunk(inputs, training=True))
    want = gradients(pooling_last)
    assert float(tf.reduce_sum(tf.abs(got[0]))) > 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
