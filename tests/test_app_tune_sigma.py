"""apps/tune_sigma.py on the real small archives: a search, its resumption and tuning.json."""

import json

import keras
import pytest

from small_archives import small_omniglot_dir
from apps import tune_sigma
from mtl_keras.tuning import OBJECTIVE_NAME


@pytest.mark.slow
def test_tune_sigma_app_on_real_archives_resumes_and_reports(tmp_path):
    data_dir = small_omniglot_dir()
    app = tune_sigma
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

    # The preset's defaults reached the trials: BN momentum 0.9 built into the trunk, no head dropout.
    assert on_disk["epochs_per_trial"] == 1 and on_disk["archives"] == "small" and on_disk["seed"] == 0
    model = keras.saving.load_model(tmp_path / "run" / "best_model.keras")
    norms = [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 2 and all(l.momentum == 0.9 for l in norms)
    assert model.task_heads.hidden_units == (16,) and model.get_config()["head_dropout"] == 0.0
    provenance = on_disk["provenance"]
    command = "python apps/tune_sigma.py " + " ".join(argv + ["--trials", "3"])
    assert provenance["command"] == on_disk["command"] == command
    assert len(provenance["load_average_after"]) == 3 and provenance["wall_seconds"] > 0
