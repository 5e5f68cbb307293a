"""mtl_keras.experiments.efficiency: a step's FLOPs counted by hand on a planted model, the matmul peak."""

import keras
import pytest

from mtl_keras import MultiTaskModel, Task, TaskSet
from mtl_keras.experiments.efficiency import (
    head_forward_flops,
    matmul_peak,
    training_flops_per_step,
    trunk_forward_flops,
    trunk_training_flops,
)


def planted_model():
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8x8 outputs, 3x3x1 kernel, 4 filters
    h = keras.layers.BatchNormalization()(h)  # elementwise: not counted
    h = keras.layers.Conv2D(6, 3, strides=2)(h)  # 3x3 outputs, 3x3x4 kernel, 6 filters
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(5)(h)
    backbone = keras.Model(inputs, h)
    tasks = TaskSet([Task("a", "multiclass", 2), Task("b", "multiclass", 4)])
    return MultiTaskModel(backbone, tasks, head_units=(3,), seed=0)


def test_a_steps_flops_are_its_layers_multiply_adds_forward_and_backward():
    model = planted_model()
    trunk = 2 * (8 * 8 * 3 * 3 * 1 * 4) + 2 * (3 * 3 * 3 * 3 * 4 * 6) + 2 * 6 * 5
    assert trunk_forward_flops(model.backbone) == trunk
    # Estimator 5 -> 3, then output 3 -> 2 or 3 -> 4 classes: the mean over the two tasks.
    assert head_forward_flops(model) == pytest.approx(2 * 5 * 3 + 2 * 3 * (2 + 4) / 2)
    # The first conv reads the image: no input gradient, so twice its forward FLOPs, not three times.
    first = 2 * (8 * 8 * 3 * 3 * 1 * 4)
    assert trunk_training_flops(model.backbone) == 3 * trunk - first
    assert training_flops_per_step(model, batch_size=10) == pytest.approx(10 * (3 * trunk - first) + 3 * 10 * 48)
    # Two tasks per example on an unrouted trunk: the trunk still runs once per example.
    assert training_flops_per_step(model, 10, tasks_per_example=2) == pytest.approx(
        10 * (3 * trunk - first) + 3 * 20 * 48)


def test_matmul_peak_is_a_positive_rate_from_its_own_timing():
    peak = matmul_peak("float32", sizes=(96, 128), repeats=2, inner=2)
    n = peak["size"]
    assert peak["flops_per_second"] == pytest.approx(2 * n**3 * 2 / peak["seconds"])
    assert peak["flops_per_second"] > 1e8 and peak["dtype"] == "float32"
    # The peak is the best size's rate.
    assert set(peak["by_size"]) == {"96", "128"} and peak["flops_per_second"] == max(peak["by_size"].values())


def test_only_layers_fed_by_trainable_weights_need_an_input_gradient():
    image = keras.Input((8, 8, 1), name="image")
    scaled = keras.layers.Rescaling(0.5, name="scale")(image)  # no weights: still no gradient needed
    a = keras.layers.Conv2D(2, 3, name="a")(scaled)
    b = keras.layers.Conv2D(2, 3, name="b")(a)
    side = keras.layers.Conv2D(2, 5, name="side")(image)
    out = keras.layers.Add(name="add")([b, side])
    from mtl_keras.experiments.efficiency import layers_without_input_gradient

    free = layers_without_input_gradient(keras.Model(image, out))
    assert {"a", "side", "scale"} <= free and not {"b", "add"} & free
