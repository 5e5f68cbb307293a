"""LazyAdam: sparse gradients update only their rows, as Adam would; dense ones are Adam's."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import LazyAdam
from mtl_keras.sparse_rows import sum_duplicate_rows
import synthetic
from synthetic import per_example_batch

LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-7


def reference_lazy_adam(value, steps):
    """NumPy lazy Adam: each step a dict {row: summed gradient}; other rows keep weights and moments."""
    value = value.astype("float64").copy()
    m, v = np.zeros_like(value), np.zeros_like(value)
    for t, rows in enumerate(steps, start=1):
        alpha = LR * np.sqrt(1 - B2**t) / (1 - B1**t)
        for r, g in rows.items():
            m[r] += (g - m[r]) * (1 - B1)
            v[r] += (g * g - v[r]) * (1 - B2)
            value[r] -= alpha * m[r] / (np.sqrt(v[r]) + EPS)
    return value, m, v


def sparse_steps(rng, rows=6):
    """Three steps of slices with repeated rows, and rows no step uses."""
    index_sets = [[1, 4, 1, 1], [4, 2], [2, 2, 1, 0]]
    steps = []
    for indices in index_sets:
        values = rng.normal(size=(len(indices), 3)).astype("float32")
        summed = {}
        for i, g in zip(indices, values):
            summed[i] = summed.get(i, 0) + g.astype("float64")
        steps.append((tf.IndexedSlices(tf.constant(values), tf.constant(indices, "int32"), tf.constant([rows, 3])),
                      summed))
    return steps


@pytest.mark.parametrize("jit", [False, True])
def test_sparse_rows_follow_adam_and_untouched_rows_keep_weights_and_moments(jit):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(6, 3)).astype("float32")
    variable = keras.Variable(start)
    optimizer = LazyAdam(LR, beta_1=B1, beta_2=B2, epsilon=EPS)
    optimizer.build([variable])
    steps = sparse_steps(rng)
    apply = tf.function(lambda g: optimizer.apply([g], [variable]), jit_compile=jit)
    for slices, _ in steps:
        apply(slices)
    want, want_m, want_v = reference_lazy_adam(start, [summed for _, summed in steps])
    np.testing.assert_allclose(variable.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer._momentums[0].numpy(), want_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(optimizer._velocities[0].numpy(), want_v, rtol=1e-5, atol=1e-9)
    # Rows 3 and 5 were in no step: exactly as they started, with zero moments.
    np.testing.assert_array_equal(variable.numpy()[[3, 5]], start[[3, 5]])
    assert not np.any(optimizer._momentums[0].numpy()[[3, 5]])


def test_a_row_in_every_step_gets_exactly_keras_adams_update():
    rng = np.random.default_rng(1)
    start = rng.normal(size=(4, 3)).astype("float32")
    lazy_variable, dense_variable = keras.Variable(start), keras.Variable(start)
    lazy, dense = LazyAdam(LR), keras.optimizers.Adam(LR)
    lazy.build([lazy_variable])
    dense.build([dense_variable])
    for _ in range(3):
        g = rng.normal(size=(4, 3)).astype("float32")
        lazy.apply([tf.IndexedSlices(tf.constant(g), tf.range(4))], [lazy_variable])
        dense.apply([tf.constant(g)], [dense_variable])
    np.testing.assert_allclose(lazy_variable.numpy(), dense_variable.numpy(), rtol=1e-6, atol=1e-7)
    # A dense gradient takes Adam's own update.
    g = rng.normal(size=(4, 3)).astype("float32")
    lazy.apply([tf.constant(g)], [lazy_variable])
    dense.apply([tf.constant(g)], [dense_variable])
    np.testing.assert_allclose(lazy_variable.numpy(), dense_variable.numpy(), rtol=1e-6, atol=1e-7)


def test_sum_duplicate_rows_sums_each_row_once_and_pads_under_xla():
    slices = tf.IndexedSlices(tf.constant([[1.0], [2.0], [4.0], [8.0]]), tf.constant([3, 0, 3, 3]))
    rows, values, valid = sum_duplicate_rows(slices)
    assert valid is None and rows.numpy().tolist() == [3, 0] and values.numpy()[:, 0].tolist() == [13.0, 2.0]
    rows, values, valid = (t.numpy() for t in tf.function(sum_duplicate_rows, jit_compile=True)(slices))
    assert rows.tolist() == [0, 3, 0, 0] and valid.tolist() == [True, True, False, False]
    assert values[:, 0].tolist() == [2.0, 13.0, 0.0, 0.0]
    # Distinct rows come back as they are.
    distinct = tf.IndexedSlices(tf.constant([[1.0], [2.0]]), tf.constant([4, 1]))
    rows, values, _ = sum_duplicate_rows(distinct)
    assert rows.numpy().tolist() == [4, 1] and values.numpy()[:, 0].tolist() == [1.0, 2.0]


def test_amsgrad_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="keras.optimizers.Adam\\(amsgrad=True\\)"):
        LazyAdam(amsgrad=True)


def small_model(strategy=None):
    return synthetic.small_model(lambda: LazyAdam(0.01), strategy, batch_norm=False)


def test_a_model_step_moves_only_the_heads_of_the_batch_and_the_file_keeps_the_optimizer(tmp_path):
    model = small_model()
    x, y = per_example_batch(n=12)
    keep = x["task"] != 2  # task c has no example in the batch
    x, y = {k: v[keep] for k, v in x.items()}, y[keep]
    heads = model.task_heads
    before = [v.numpy() for v in heads.stacked_estimator_variables()]
    model.fit(x, y, batch_size=len(y), epochs=2, verbose=0, shuffle=False)
    for b, v in zip(before, heads.stacked_estimator_variables()):
        np.testing.assert_array_equal(v.numpy()[2], b[2])  # task c's estimator: untouched
        assert np.all(np.any(v.numpy()[[0, 1, 3]] != b[[0, 1, 3]], axis=tuple(range(1, b.ndim))))
    synthetic.assert_reload_keeps_the_optimizer(model, tmp_path / "lazy.keras", LazyAdam)


def test_mirrored_two_replicas_match_one_device():
    x, y = per_example_batch(n=16, seed=2)
    # Replica 0 gets tasks 0 and 1, replica 1 tasks 0 and 3: a row on both replicas, one on neither.
    x["task"] = np.array([0, 1, 0, 1, 1, 0, 1, 0, 3, 0, 3, 0, 3, 3, 0, 3], "int32")
    y = np.zeros((16, 2), "float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest should provide two logical CPU devices"
    results = []
    for strategy in (None, tf.distribute.MirroredStrategy(devices)):
        model = small_model(strategy)
        start = [v.numpy() for v in model.task_heads.stacked_estimator_variables()]
        model.fit(data, epochs=3, verbose=0, shuffle=False)
        results.append([w.numpy() for w in model.weights])
        np.testing.assert_array_equal(model.task_heads.estimator_kernels[0].numpy()[2], start[0][2])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_trains_with_lazy_adam_under_xla_and_leaves_absent_heads_alone():
    model = small_model()
    model.compile(optimizer=LazyAdam(0.01), jit_compile=True)
    x, y = per_example_batch(n=12)
    keep = x["task"] != 2
    x, y = {k: v[keep] for k, v in x.items()}, y[keep]
    before = model.task_heads.estimator_kernels[0].numpy()
    history = model.fit(x, y, batch_size=len(y), epochs=2, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    after = model.task_heads.estimator_kernels[0].numpy()
    np.testing.assert_array_equal(after[2], before[2])
    assert np.any(after[[0, 1, 3]] != before[[0, 1, 3]])
