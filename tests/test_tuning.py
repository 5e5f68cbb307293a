"""KerasTuner over sigma: the hypermodel, a real search, resuming, and the best model's reload."""

import json

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from app_loading import load_app, small_omniglot_dir
from mtl_keras import Task, TaskSet, conv_backbone
from mtl_keras.backbones import routing_layers
from mtl_keras.tuning import (
    OBJECTIVE_NAME,
    SigmaHyperModel,
    check_best_model,
    make_tuner,
    plot_objective,
    trials_table,
)

TASKS = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 4), Task("c", "binary", 1)])
BUILDS = []


def random_mask_backbone(sigma, width):
    """A builder that draws new routing masks at every build (seed=None): a
    reload must take the trained masks from the checkpoint, not the rebuild."""
    BUILDS.append((sigma, width))
    return conv_backbone((8, 8, 1), len(TASKS), sigma=sigma, filters=(width, 2 * width), seed=None)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    t = (np.arange(n) % 3).astype("int32")
    y = np.where(t == 0, rng.integers(0, 3, n), np.where(t == 1, rng.integers(0, 4, n), rng.integers(0, 2, n)))
    x = {"image": rng.random((n, 8, 8, 1)).astype("float32"), "task": t}
    x["image"][:, 0, 0, 0] = y / 4.0  # a learnable signal
    return tf.data.Dataset.from_tensor_slices((x, y.astype("float32"))).batch(16)


PROBE = {"image": np.random.default_rng(9).random((6, 8, 8, 1)).astype("float32"), "task": np.array([0, 1, 2] * 2, "int32")}


class RecordPredictions(keras.callbacks.Callback):
    """Stores the probe's predictions after every epoch of every trial.

    KerasTuner deep-copies callbacks per trial, so the record is a class attribute."""

    seen = []

    def on_epoch_end(self, epoch, logs=None):
        masks = [l.masks.copy() for l in routing_layers(self.model.backbone)]
        RecordPredictions.seen.append((epoch, masks, self.model.predict(PROBE, verbose=0)))


def hypermodel(**kwargs):
    kwargs.setdefault("sigma", [0.0, 0.5])
    return SigmaHyperModel(random_mask_backbone, TASKS, widths=(4, 6), learning_rate=(1e-3, 3e-2), head_units=(4,), **kwargs)


def test_hypermodel_space_and_build():
    hp = keras_tuner.HyperParameters()
    model = hypermodel(sigma=(0.0, 1.0), sigma_step=0.25).build(hp)
    assert set(hp.values) == {"sigma", "width", "learning_rate"}
    assert hp.values["sigma"] == 0.0 and hp.values["width"] == 4
    assert len(routing_layers(model.backbone)) == 2
    assert model.optimizer.learning_rate.numpy() == pytest.approx(hp.values["learning_rate"])
    fixed = SigmaHyperModel(lambda sigma, seed: conv_backbone((8, 8, 1), 3, sigma=sigma, filters=(4,), seed=seed), TASKS)
    hp = keras_tuner.HyperParameters()
    fixed.build(hp)
    assert set(hp.values) == {"sigma", "learning_rate"} and hp.values["learning_rate"] == 1e-3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma values must lie in"):
        hypermodel(sigma=[0.5, 1.5])
    with pytest.raises(ValueError, match="low < high"):
        hypermodel(sigma=(0.8, 0.2))
    with pytest.raises(ValueError, match="takes no 'width'"):
        SigmaHyperModel(lambda sigma: None, TASKS, widths=(4,))
    with pytest.raises(ValueError, match="Unknown tuner 'grid'"):
        make_tuner("grid", hypermodel(), "/tmp/unused")


def test_search_resume_and_best_model_routes_as_trained(tmp_path):
    train, val = data(), data(24, seed=1)
    BUILDS.clear()
    RecordPredictions.seen = []
    tuner = make_tuner("bayesian", hypermodel(), tmp_path / "tuner", max_trials=2, seed=1)
    assert tuner.oracle.objective.name == OBJECTIVE_NAME and tuner.oracle.objective.direction == "max"
    BUILDS.clear()  # the tuner builds once to learn the search space
    tuner.search(train, validation_data=val, epochs=2, callbacks=[RecordPredictions()], verbose=0)
    assert len(BUILDS) == 2
    first = trials_table(tuner)
    assert len(first) == 2 and all(r["score"] is not None for r in first)
    assert first[0]["score"] >= first[1]["score"]
    assert {r["hyperparameters"]["sigma"] for r in first} <= {0.0, 0.5}

    # Resume: a new tuner on the same directory runs only the missing trial.
    tuner = make_tuner("bayesian", hypermodel(), tmp_path / "tuner", max_trials=3, seed=1)
    BUILDS.clear()
    tuner.search(train, validation_data=val, epochs=2, callbacks=[RecordPredictions()], verbose=0)
    assert len(BUILDS) == 1
    rows = trials_table(tuner)
    assert len(rows) == 3 and {r["trial_id"] for r in first} <= {r["trial_id"] for r in rows}

    # The best model comes back with its trained masks and weights, though
    # the rebuild drew new masks: same score, same predictions as recorded.
    model, check = check_best_model(tuner, val)
    assert check["match"], check
    best = tuner.oracle.get_best_trials(1)[0]
    recorded = [
        p for epoch, masks, p in RecordPredictions.seen
        if epoch == best.best_step
        and len(masks) == len(routing_layers(model.backbone))
        and all(np.array_equal(m, l.masks) for m, l in zip(masks, routing_layers(model.backbone)))
    ]
    assert recorded, "no trial epoch had the reloaded model's masks"
    np.testing.assert_allclose(model.predict(PROBE, verbose=0), recorded[0], rtol=1e-5, atol=1e-6)
    fresh = random_mask_backbone(best.hyperparameters.values["sigma"], best.hyperparameters.values["width"])
    if best.hyperparameters.values["sigma"] < 1.0:
        assert any(not np.array_equal(f.masks, l.masks) for f, l in zip(routing_layers(fresh), routing_layers(model.backbone)))

    path = plot_objective(rows, tmp_path / "objective_vs_sigma.png")
    assert path.stat().st_size > 1000
    json.dumps(rows)  # the table is JSON-serialisable as it is


def test_plot_needs_scored_trials(tmp_path):
    with pytest.raises(ValueError, match="No finished trial"):
        plot_objective([{"score": None, "hyperparameters": {"sigma": 0.5}}], tmp_path / "x.png")


@pytest.mark.slow
def test_tune_sigma_app_on_real_archives_resumes_and_reports(tmp_path):
    data_dir = small_omniglot_dir()
    app = load_app("tune_sigma")
    argv = [
        "--data-dir", str(data_dir), "--archives", "small", "--tfds-dir", str(tmp_path / "tfds"),
        "--tasks", "2", "--image-size", "16", "--width", "8", "--depth", "2", "--head-units", "16",
        "--tuner", "random", "--epochs", "1", "--output", str(tmp_path / "run"),
    ]
    first = app.main(argv + ["--trials", "2"])
    assert len(first["trials"]) == 2
    report = app.main(argv + ["--trials", "3"])  # resumes: one more trial
    on_disk = json.loads((tmp_path / "run" / "tuning.json").read_text())
    assert len(on_disk["trials"]) == 3
    assert {t["trial_id"] for t in first["trials"]} <= {t["trial_id"] for t in on_disk["trials"]}
    assert on_disk["objective"] == OBJECTIVE_NAME and on_disk["tasks"] == 2
    best = max(t["score"] for t in on_disk["trials"])
    assert on_disk["best_val_mean_accuracy"] == best
    assert on_disk["best_hyperparameters"] == on_disk["trials"][0]["hyperparameters"]
    check = on_disk["reload_check"]
    assert check["match"] and check["keras_file_same_masks"] and check["keras_file_same_outputs"]
    assert set(on_disk["test_accuracy"]) == {"Balinese", "Early_Aramaic"}
    assert (tmp_path / "run" / "objective_vs_sigma.png").stat().st_size > 1000
    assert (tmp_path / "run" / "best_model.keras").exists()
    assert report["best_model_path"] == str(tmp_path / "run" / "best_model.keras")
