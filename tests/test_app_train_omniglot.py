"""apps/train_omniglot.py on a slice of the real archives: report, plot, logs, and an export that serves."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

from small_archives import small_omniglot_dir
from apps import train_omniglot
from mtl_keras.data import load_omniglot
from mtl_keras.presets import get_preset

# report.json's keys: the README, docs and other tools read them.
REPORT_KEYS = {
    "app", "tasks", "sigma", "weighting", "sharing", "strategy", "replicas", "routing_mode", "seed", "epochs",
    "batch_size", "image_size", "width", "depth", "parameters", "parameters_at_start", "head_parameters",
    "mean_test_accuracy", "test_loss", "test_accuracy", "chance_accuracy", "final_val_mean_accuracy",
    "wall_time_seconds", "train_seconds", "num_examples", "export_path", "model_path", "command", "provenance",
    "config",
}


def test_app_trains_reports_and_exports_a_model_that_serves_in_a_fresh_process(tmp_path):
    tmp = tmp_path
    data_dir = small_omniglot_dir()
    argv = [
        "--data-dir", str(data_dir), "--archives", "small", "--tfds-dir", str(tmp / "tfds"),
        "--tasks", "3", "--image-size", "16", "--width", "8", "--depth", "2", "--head-units", "16",
        "--epochs", "2", "--batch-size", "64", "--output", str(tmp / "run"),
        "--export-dir", str(tmp / "saved"), "--verbose", "0",
    ]
    report = train_omniglot.main(argv)

    # The report, the plot and the TensorBoard logs.
    out = tmp / "run"
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk) == REPORT_KEYS
    assert on_disk["tasks"] == 3 and on_disk["sigma"] == get_preset("default").sigma
    assert set(on_disk["test_accuracy"]) == {"Balinese", "Early_Aramaic", "Greek"}
    assert all(0.0 <= a <= 1.0 for a in on_disk["test_accuracy"].values())
    assert on_disk["parameters"] > 0 and on_disk["wall_time_seconds"] > 0
    assert np.isclose(on_disk["mean_test_accuracy"], np.mean(list(on_disk["test_accuracy"].values())), atol=1e-6)
    assert (out / "accuracy.png").stat().st_size > 1000
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert on_disk["export_path"] == str(tmp / "saved" / "1")
    # Flags left alone are the "default" preset's.
    assert (on_disk["weighting"], on_disk["routing_mode"], on_disk["seed"], on_disk["sharing"]) == \
        ("equal", "partition", 0, None)
    assert on_disk["command"] == on_disk["provenance"]["command"] == "python apps/train_omniglot.py " + " ".join(argv)
    assert len(on_disk["provenance"]["git_commit"]) == 40 and len(on_disk["provenance"]["load_average_before"]) == 3

    # The exported model serves real images in a fresh process.
    data = load_omniglot(
        data_dir=small_omniglot_dir(), tasks=3, image_size=16, batch_size=32,
        tfds_dir=tmp / "tfds", archives="small",
    )
    x, y = next(iter(data.test))
    np.save(tmp / "img.npy", x["image"].numpy())
    np.save(tmp / "task.npy", x["task"].numpy())
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        fn = tf.saved_model.load({report['export_path']!r}).signatures["serving_default"]
        out = fn(image=tf.constant(np.load({str(tmp / 'img.npy')!r})), task=tf.constant(np.load({str(tmp / 'task.npy')!r})))
        np.save({str(tmp / 'pred.npy')!r}, out["predicted_class"].numpy())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    served = np.load(tmp / "pred.npy")
    classes = np.array([data.tasks[int(t)].num_outputs for t in x["task"].numpy()])
    assert served.shape == (32,) and np.all(served >= 0) and np.all(served < classes)
    # The served predictions are the trained Keras model's (reloaded from the run's .keras file).
    model = keras.saving.load_model(report["model_path"])
    logits = model.predict(x, verbose=0)
    np.testing.assert_array_equal(served, logits.argmax(axis=1))
    norms = [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.momentum == 0.99 for l in norms)
