"""Synthetic one-task-per-example data for the four small tasks the model and sharing tests use."""

import numpy as np


def small_model(optimizer, strategy=None, batch_norm=True):
    """The four tasks `per_example_batch` labels, on a routed 8x8 trunk with 6-unit heads, compiled with
    `optimizer()` (built inside `strategy`'s scope, when given)."""
    import keras
    import tensorflow as tf

    from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone

    keras.utils.set_random_seed(0)
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1),
                     Task("d", "regression", 2)])
    with (strategy or tf.distribute.get_strategy()).scope():
        backbone = conv_backbone((8, 8, 1), 4, sigma=0.5, filters=(8, 8), seed=0, batch_norm=batch_norm)
        model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0)
        model.compile(optimizer=optimizer())
    return model


def assert_reload_keeps_the_optimizer(model, path, optimizer_class):
    """Saves `model` to the `.keras` file `path`, loads it, and checks that the loaded model's optimizer
    is an `optimizer_class` holding exactly the saved optimizer's variables."""
    import keras

    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, optimizer_class)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def per_example_batch(n=12, seed=0, num_tasks=4):
    """`({"image": [n, 8, 8, 1], "task": [n]}, y [n, 2])`, task ids cycling over `num_tasks`.

    Labels fit tasks a (3 classes), b (5 classes), c (binary) and d
    (regression with 2 outputs); unused label columns are 0.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    t = (np.arange(n) % num_tasks).astype("int32")
    y = np.zeros((n, 2), "float32")
    y[t == 0, 0] = rng.integers(0, 3, (t == 0).sum())
    y[t == 1, 0] = rng.integers(0, 5, (t == 1).sum())
    y[t == 2, 0] = rng.integers(0, 2, (t == 2).sum())
    y[t == 3] = rng.normal(size=((t == 3).sum(), 2))
    return {"image": x, "task": t}, y
