"""KerasTuner over sigma: the hypermodel, a real search, resuming, and the best model's reload."""

import json
import types

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.backbones import routing_layers
from mtl_keras.tuning import (
    OBJECTIVE_NAME,
    SigmaHyperModel,
    check_best_model,
    check_saved_model,
    make_tuner,
    plot_objective,
    search,
    trials_table,
    trials_text_table,
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
    model, check = check_best_model(tuner, val, strict=True)
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

    # Saved as a .keras file and loaded back, it routes and predicts the same.
    saved = check_saved_model(model, tmp_path / "best.keras", PROBE)
    assert saved == {"keras_file_same_masks": True, "keras_file_same_outputs": True}
    table = trials_text_table(rows).splitlines()
    assert table[0].split() == ["trial", "sigma", "width", "learning", "rate", OBJECTIVE_NAME]
    assert len(table) == 2 + len(rows) and rows[0]["trial_id"] in table[2]


@pytest.mark.parametrize("stop_after", [1, 3])
def test_a_search_whose_trials_all_fail_raises_the_trials_own_error(tmp_path, stop_after):
    """KerasTuner stops a search after `stop_after` failed trials in a row with its own RuntimeError,
    and ends a shorter one quietly with nothing scored. Either way the caller gets the trial's error."""
    from mtl_keras.callbacks import NonFiniteLossError

    lr_blows_up = SigmaHyperModel(random_mask_backbone, TASKS, widths=(4,), learning_rate=1e30, head_units=(4,))
    tuner = make_tuner("random", lr_blows_up, tmp_path / "tuner", max_trials=1, seed=1,
                       max_consecutive_failed_trials=stop_after)
    with pytest.raises(NonFiniteLossError, match=r"went NaN or infinite in epoch 1") as caught:
        search(tuner, data(), validation_data=data(24, seed=1), epochs=1, verbose=0)
    assert [r["score"] for r in trials_table(tuner)] == [None]
    assert isinstance(caught.value.__cause__, RuntimeError) == (stop_after == 1)


def test_saved_model_check_sees_other_masks_and_outputs(tmp_path, monkeypatch):
    def tiny(seed):
        keras.utils.set_random_seed(seed)
        model = MultiTaskModel(conv_backbone((8, 8, 1), len(TASKS), sigma=0.5, filters=(4, 8), seed=seed), TASKS,
                               head_units=(4,), seed=seed)
        model.compile()
        return model

    model, other = tiny(1), tiny(2)
    assert not np.array_equal(routing_layers(model.backbone)[0].masks, routing_layers(other.backbone)[0].masks)
    # A file that came back as another model: the check must say so.
    monkeypatch.setattr(keras.models, "load_model", lambda path: other)
    check = check_saved_model(model, tmp_path / "m.keras", PROBE)
    assert check == {"keras_file_same_masks": False, "keras_file_same_outputs": False}


def test_trials_table_text_fills_unsearched_width_and_missing_scores():
    rows = [{"trial_id": "07", "hyperparameters": {"sigma": 0.25, "learning_rate": 2e-3}, "score": 0.5},
            {"trial_id": "08", "hyperparameters": {"sigma": 0.5, "learning_rate": 1e-3, "width": 16}, "score": None}]
    lines = trials_text_table(rows, width=32).splitlines()
    assert lines[2].split() == ["07", "0.250", "32", "2.00e-03", "0.5000"]
    assert lines[3].split() == ["08", "0.500", "16", "1.00e-03", "-"]


def test_strict_check_refuses_a_best_model_that_does_not_reproduce_its_trial():
    class Reloaded:
        def evaluate(self, data, return_dict, verbose):
            return {"mean_accuracy": 0.25}

    trial = types.SimpleNamespace(trial_id="3", score=0.5)
    tuner = types.SimpleNamespace(oracle=types.SimpleNamespace(get_best_trials=lambda n: [trial]),
                                  get_best_models=lambda n: [Reloaded()], executions_per_trial=1)
    _, check = check_best_model(tuner, None)
    assert check == {"trial_id": "3", "trial_score": 0.5, "reloaded_score": 0.25, "check": "equal", "match": False}
    with pytest.raises(RuntimeError, match=r"scores 0\.250000 on validation, but its trial scored 0\.500000"):
        check_best_model(tuner, None, strict=True)
    tuner.executions_per_trial = 2
    trial.score = 0.2
    assert check_best_model(tuner, None, strict=True)[1]["check"] == "at_least"


def test_plot_needs_scored_trials(tmp_path):
    with pytest.raises(ValueError, match="No finished trial"):
        plot_objective([{"score": None, "hyperparameters": {"sigma": 0.5}}], tmp_path / "x.png")
