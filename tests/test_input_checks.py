"""Bad input is refused with a message naming the problem and the fix, and changes nothing.

One test (or parametrized case) per row of docs/RELIABILITY.md's bad-input
table: settings (sigma, head dropout), task ids, labels, images, data
smaller than a global batch, non-finite losses, and `.keras` files loaded
with `safe_mode=True`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskRouting, TaskSet, conv_backbone, routing_masks



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


