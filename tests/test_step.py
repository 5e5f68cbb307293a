"""StepContext and Pairs: the one record a step hands to its weighting and its observers."""

import dataclasses

import keras
import numpy as np
import pytest

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.step import Pairs, StepContext
from mtl_keras.weighting import EqualWeighting
from synthetic import per_example_batch


class RecordingWeighting(EqualWeighting):
    """Equal weighting that keeps the records it is handed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []

    def compute_gradients(self, tape, objective, variables, step):
        self.records.append(("compute_gradients", step))
        return super().compute_gradients(tape, objective, variables, step)

    def end_train_step(self, step):
        self.records.append(("end_train_step", step))


def small_model(optimizer, weighting, head_regularizer=None):
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1),
                     Task("d", "regression", 2)])
    backbone = conv_backbone((8, 8, 1), 4, sigma=0.5, filters=(8, 8), seed=0, batch_norm=False)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0, weighting=weighting,
                           head_regularizer=head_regularizer)
    model.compile(optimizer=optimizer)
    return model


def test_weighting_and_observers_get_one_frozen_step_context():
    weighting = RecordingWeighting()
    # Learning rate 0: the weights stay, so the trunk can be re-run after the step.
    model = small_model(keras.optimizers.SGD(0.0), weighting)
    observed = []
    model.gradient_observers.append(lambda variables, grads, step: observed.append(step))
    x, y = per_example_batch(n=12)
    model.train_step((x, y))

    (first, step), (second, after) = weighting.records
    assert (first, second) == ("compute_gradients", "end_train_step")
    assert step is after is observed[0]
    assert isinstance(step, StepContext) and isinstance(step.pairs, Pairs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.loss_scale = 2.0
    assert step.pairs.rows is None  # one task per example: the pairs are the examples
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(step.pairs.task_ids), x["task"])
    assert tuple(step.features.shape) == (12, model.backbone.outputs[0].shape[-1])
    assert tuple(step.logits.shape) == (12, 5) and tuple(step.task_losses.shape) == (4,)
    assert step.regularization is None and float(step.loss_scale) == 1.0 and step.num_replicas == 1
    assert step.iteration is model.optimizer.iterations and step.backbone is model.backbone
    assert [v.path for v in step.shared_variables] == [v.path for v in model.backbone.trainable_variables]
    # features_fn is the trunk in the step's mode: it reproduces the step's features.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(step.features_fn(step.pairs.images, step.pairs.task_ids)),
        keras.ops.convert_to_numpy(step.features), atol=1e-6,
    )


def test_training_context_carries_the_loss_scale_and_the_scaled_regularization():
    weighting = RecordingWeighting()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=8.0)
    model = small_model(optimizer, weighting, head_regularizer="l2")
    x, y = per_example_batch(n=12)
    _, evaluation = model._step((x, y), training=False)
    assert float(evaluation.loss_scale) == 1.0 and evaluation.iteration is None
    expected = []
    # Observers run before the update: the weights are still those of the step.
    model.gradient_observers.append(
        lambda variables, grads, step: expected.append(float(keras.ops.sum(model.losses)) * float(step.loss_scale))
    )
    model.train_step((x, y))
    _, step = weighting.records[0]
    assert float(step.loss_scale) == 8.0
    np.testing.assert_allclose(float(step.regularization), expected[0], rtol=1e-6)
    assert float(step.regularization) > 0
