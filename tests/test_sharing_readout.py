"""A merged task's output layer is refitted onto the estimator it joins."""

import json

import keras
import numpy as np
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.sharing import SelectiveSharing
from mtl_keras.sharing.readout import apply_refit, refit_plan, ridge_readout
from synthetic import per_example_batch


def model_of(sigma=0.5, units=6):
    keras.utils.set_random_seed(0)
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1),
                     Task("d", "regression", 2)])
    backbone = conv_backbone((8, 8, 1), 4, sigma=sigma, filters=(8, 8), seed=0, batch_norm=False)
    model = MultiTaskModel(backbone, tasks, head_units=(units,), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model(per_example_batch(4)[0])
    return model


def images(n=256, seed=3):
    return {"image": np.random.default_rng(seed).random((n, 8, 8, 1)).astype("float32")}


def all_logits(model, x):
    return np.asarray(model(x, training=False))  # [B, T, max_outputs]


def test_ridge_readout_recovers_a_planted_linear_map():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 7))
    kernel, bias = rng.normal(size=(7, 3)), rng.normal(size=3)
    fitted_kernel, fitted_bias = ridge_readout(features, features @ kernel + bias, ridge=1e-10)
    np.testing.assert_allclose(fitted_kernel, kernel, atol=1e-6)
    np.testing.assert_allclose(fitted_bias, bias, atol=1e-6)


def test_refit_keeps_a_moved_task_exact_when_the_estimators_agree_up_to_unit_order():
    # Planted: task b's estimator computes a's hidden units permuted and scaled
    # (positive scales commute with relu), so after moving b onto a's estimator
    # its old logits are an exact linear map of the new features. On a routed
    # trunk, b's own view of the trunk is used both before and after.
    model = model_of(sigma=0.5)
    kernel_a = model.heads[0].estimator_layers[0].kernel.numpy()
    bias_a = model.heads[0].estimator_layers[0].bias.numpy()
    order, scale = np.array([3, 0, 5, 1, 4, 2]), np.array([0.5, 2.0, 1.0, 3.0, 0.7, 1.5], "float32")
    model.heads[1].estimator_layers[0].kernel.assign(kernel_a[:, order] * scale)
    model.heads[1].estimator_layers[0].bias.assign(bias_a[order] * scale)
    x = images()
    before = all_logits(model, x)
    plan = refit_plan(model, x, [0, 0, 2, 3], ridge=1e-9)
    assert list(plan) == [1]
    assert plan[1].r2 > 0.999999 and plan[1].r2_unchanged < 0.9
    model.set_estimator_of_task([0, 0, 2, 3])
    unrefitted = all_logits(model, x)
    apply_refit(model, plan)
    after = all_logits(model, x)
    np.testing.assert_allclose(after[:, 1, :5], before[:, 1, :5], atol=1e-3)
    assert np.abs(unrefitted[:, 1, :5] - before[:, 1, :5]).max() > 0.05
    # Tasks that did not move are untouched.
    np.testing.assert_allclose(after[:, [0, 2, 3]], before[:, [0, 2, 3]], atol=1e-6)


def test_refit_fits_unrelated_estimators_at_least_as_well_as_the_old_layer():
    model = model_of(sigma=1.0, units=16)
    plan = refit_plan(model, images(), [0, 0, 0, 3])
    assert sorted(plan) == [1, 2]
    for fit in plan.values():
        assert fit.r2_unchanged <= fit.r2 <= 1.0


def test_callback_refits_on_the_given_inputs_and_records_the_fit():
    def fixed(factors, clusters):
        return [[0, 1], [2], [3]]

    x, y = per_example_batch(32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    refit_on = images(128)
    runs = {}
    for refit in (True, False):
        model = model_of()
        sharing = SelectiveSharing(fixed, start_epoch=1, keep="first", refit_outputs=refit,
                                   refit_inputs=refit_on, verbose=0)
        model.fit(data, epochs=1, verbose=0, callbacks=[sharing])
        runs[refit] = (model, sharing)
    model, sharing = runs[True]
    record = sharing.history[0]
    assert record["merged"] and set(record["refit"]["tasks"]) == {"b"}
    fit = record["refit"]["tasks"]["b"]
    assert fit["r2_unchanged"] <= fit["r2"] <= 1.0 and record["refit"]["min_r2"] == fit["r2"]
    assert sharing.report()["settings"]["refit_outputs"] is True
    json.dumps(sharing.report())
    assert runs[False][1].history[0]["refit"] is None
    # Both runs trained the same first epoch; only the refit changed b's output layer.
    np.testing.assert_allclose(model.heads[0].output_layer.kernel.numpy(),
                               runs[False][0].heads[0].output_layer.kernel.numpy(), atol=1e-6)
    assert not np.allclose(model.heads[1].output_layer.kernel.numpy(),
                           runs[False][0].heads[1].output_layer.kernel.numpy())


def test_head_logits_equal_the_models_own_all_task_pass_routed_or_not_and_after_a_merge():
    from mtl_keras.sharing.predictions import head_logits

    for sigma in (0.5, 1.0):
        model = model_of(sigma=sigma)
        model.set_estimator_of_task([0, 0, 2, 2])
        x = images(40)
        np.testing.assert_allclose(head_logits(model, x, batch_size=16), all_logits(model, x), atol=1e-4)
