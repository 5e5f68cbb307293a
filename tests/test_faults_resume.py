"""kill -9 of apps/train_omniglot.py in the middle of an epoch, then the same command again;
kill -9 while the backup of an epoch is being written.

The killed process is the app itself, run by this file as a script (see
`_freeze_main`): it trains exactly as `python apps/train_omniglot.py ...`
does, with one callback added that stops the process (SIGSTOP) after a
chosen batch of a chosen epoch. The test sees it stopped (waitpid), so the
kill -9 lands at that batch, mid-epoch, on every machine, without guessing
how long anything takes. The same command is then started again, plain,
and must end exactly as an uninterrupted run: same weights, metrics and
Selective Sharing groups (`--deterministic`).
"""

import json
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stopped_children import kill_when_stopped, reap

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "train_omniglot.py"
FROZEN = "FAULT-TEST: stopped"

# Tiny and quick: 2 alphabets at 8x8, 41 batches an epoch. The merge check
# at the end of epoch 2 comes before the kill in epoch 3, so the resumed
# run must re-apply a merge it did not see happen.
EPOCHS, KILL_EPOCH, KILL_BATCH = 3, 2, 20
APP_FLAGS = [
    "--archives", "small", "--tasks", "2", "--image-size", "8", "--width", "4", "--depth", "2",
    "--head-units", "8", "--batch-size", "16", "--epochs", str(EPOCHS), "--sharing", "similarity",
    "--sharing-epoch", "2", "--deterministic", "--verbose", "2", "--no-export",
]
TIMEOUT = 240


def _freeze_main(argv):
    """Runs the app with a callback that stops this process after batch KILL_BATCH of epoch KILL_EPOCH."""
    import keras

    from apps import train_omniglot

    class StopHere(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == KILL_EPOCH and batch == KILL_BATCH:
                print(FROZEN, flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)

    fit = keras.Model.fit

    def fit_then_stop(self, *args, **kwargs):
        # Bound to fit's own signature: callers pass callbacks by position or by name.
        bound = inspect.signature(fit).bind(self, *args, **kwargs)
        bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or []), StopHere()]
        return fit(*bound.args, **bound.kwargs)

    keras.Model.fit = fit_then_stop
    train_omniglot.main(argv)


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
                CUDA_VISIBLE_DEVICES="")


def _flags(tmp_path, tag, data_dir):
    return [*APP_FLAGS, "--data-dir", str(data_dir), "--tfds-dir", str(tmp_path / "tfds"),
            "--output", str(tmp_path / tag / "run"), "--export-dir", str(tmp_path / tag / "saved"),
            "--backup-dir", str(tmp_path / tag / "backup")]


def _start(script, flags, log):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(script), *flags], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), cwd=str(ROOT))


def _finish(proc, log, deadline):
    """Waits for a started app until `deadline`; returns its output. The caller reaps it on failure."""
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    text = Path(log).read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _kill_when_stopped(proc, log, deadline, where=f"epoch {KILL_EPOCH + 1}, batch {KILL_BATCH + 1}"):
    """Kills the freezing child once it has stopped itself at `where`; returns its output."""
    kill_when_stopped(proc, deadline, where, lambda: Path(log).read_text())
    return Path(log).read_text()


def _weights(path):
    import keras

    model = keras.saving.load_model(path)
    return {v.path: v.numpy() for v in model.weights}


def test_kill_9_mid_epoch_then_the_same_command_resumes_exactly(tmp_path):
    import numpy as np

    from small_archives import small_omniglot_dir

    from mtl_keras.data import load_omniglot

    data_dir = small_omniglot_dir()
    # Prepared once here, so that the two runs below can start together.
    load_omniglot(data_dir=data_dir, tasks=2, image_size=8, tfds_dir=tmp_path / "tfds", archives="small")
    flags = _flags(tmp_path, "killed", data_dir)
    deadline = time.monotonic() + TIMEOUT
    procs = []
    try:
        # The reference (the same command, never interrupted) beside the run that is killed.
        procs.append(_start(APP, _flags(tmp_path, "whole", data_dir), tmp_path / "whole.log"))
        procs.append(_start(__file__, flags, tmp_path / "killed.log"))
        killed_log = _kill_when_stopped(procs[1], tmp_path / "killed.log", deadline)
        assert f"Epoch {KILL_EPOCH + 1}/{EPOCHS}" in killed_log and FROZEN in killed_log
        # Killed mid-epoch: the backup holds the epochs before, complete and consistent.
        backup = tmp_path / "killed" / "backup"
        state = json.loads((backup / "training_metadata.json").read_text())
        assert state["epoch"] == KILL_EPOCH
        assert sorted(p.name for p in backup.glob("*.weights.h5")) == [state["weights"]]
        assert not (tmp_path / "killed" / "run" / "report.json").exists()

        # The same command again, at once: the reference may still be finishing beside it.
        procs.append(_start(APP, flags, tmp_path / "resumed.log"))
        _finish(procs[0], tmp_path / "whole.log", deadline)
        resumed_log = _finish(procs[2], tmp_path / "resumed.log", time.monotonic() + TIMEOUT)
    finally:
        reap(procs)
    # Only the unfinished epochs ran, the merge of epoch 2 re-applied first.
    assert "SelectiveSharing: resumed with the groups of epoch 2" in resumed_log, resumed_log[-4000:]
    epochs_run = [n for n in range(1, EPOCHS + 1) if f"Epoch {n}/{EPOCHS}" in resumed_log]
    assert epochs_run == list(range(KILL_EPOCH + 1, EPOCHS + 1)), resumed_log[-4000:]
    assert not backup.exists(), "the backup outlived a finished run"

    whole = json.loads((tmp_path / "whole" / "run" / "report.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "run" / "report.json").read_text())
    merges = whole["sharing"]["merges"]
    assert merges and merges[0]["epoch"] == 2, "no merge happened: the test would not test resuming one"
    assert resumed["sharing"]["final_groups"] == whole["sharing"]["final_groups"]
    assert [m["groups"] for m in resumed["sharing"]["merges"]] == [m["groups"] for m in merges]
    for key in ("test_accuracy", "test_loss", "mean_test_accuracy", "final_val_mean_accuracy", "parameters"):
        assert resumed[key] == whole[key], key
    a, b = _weights(whole["model_path"]), _weights(resumed["model_path"])
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _backup_child_main(backup_dir):
    """Trains the tiny model of the distribution tests 3 epochs with BackupAndRestore, and stops
    itself while saving epoch 2: its weights file in place, the metadata still naming epoch 1."""
    import multiworker_worker as worker
    from mtl_keras import distribute

    replace = os.replace

    def replace_then_stop(src, dst):
        replace(src, dst)
        if str(dst).endswith("epoch-000002.weights.h5"):
            print(FROZEN, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    distribute.os.replace = replace_then_stop
    model = worker.build_model()
    model.fit(worker.make_dataset(), epochs=3, verbose=0, shuffle=False,
              callbacks=[distribute.BackupAndRestore(backup_dir, delete_checkpoint=False)])


def test_kill_9_while_the_backup_is_saved_resumes_from_a_consistent_state(tmp_path):
    """Keras' own callback writes the weights in place and the epoch after them: killed
    between the two, a restart would train epoch 2 twice. Here the epoch is committed
    last, by one rename of a file that names its weights."""
    import numpy as np

    import multiworker_worker as worker
    from mtl_keras.distribute import BackupAndRestore, resume_epoch

    backup = tmp_path / "backup"
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    with open(tmp_path / "child.log", "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--backup-child", str(backup)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    try:
        _kill_when_stopped(proc, tmp_path / "child.log", time.monotonic() + TIMEOUT, "the save of epoch 2")
    finally:
        reap([proc])
    # Killed with epoch 2's weights written but not committed: the state is still epoch 1's.
    assert (backup / "epoch-000002.weights.h5").exists()
    assert resume_epoch(backup) == 1

    resumed = worker.build_model()
    history = resumed.fit(worker.make_dataset(), epochs=3, verbose=0, shuffle=False,
                          callbacks=[BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 2, "epochs 2 and 3 must run again, from epoch 1's state"
    whole = worker.build_model()
    expected = whole.fit(worker.make_dataset(), epochs=3, verbose=0, shuffle=False)
    assert history.history["loss"] == expected.history["loss"][1:]
    for a, b in zip(resumed.weights, whole.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_resumed_stream_is_the_uninterrupted_one_from_its_epoch_on():
    import tensorflow as tf

    from mtl_keras.distribute import epoch_stream

    def batches(start_epoch, n):
        ds = tf.data.Dataset.range(6).shuffle(6, seed=1, reshuffle_each_iteration=True).batch(2)
        return [b.numpy().tolist() for b in epoch_stream(ds, 3, start_epoch).take(n)]

    whole = batches(0, 12)
    assert whole[:3] != whole[3:6], "the dataset is not reshuffled: the test would not test"
    assert batches(2, 6) == whole[6:]


def test_train_steps_and_resume_epoch_name_what_is_wrong(tmp_path):
    import pytest

    from mtl_keras.distribute import get_strategy, resume_epoch, train_steps

    assert train_steps(33, 16, get_strategy("default")) == 3
    assert train_steps(33, 16, get_strategy("mirrored")) == 2  # the incomplete batch is dropped
    with pytest.raises(ValueError, match="15 training examples make no full global batch of 16 over 2 replicas"):
        train_steps(15, 16, get_strategy("mirrored"))
    assert resume_epoch(tmp_path) == 0
    (tmp_path / "training_metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"Cannot read the backup state .*; delete {tmp_path} to train"):
        resume_epoch(tmp_path)


if __name__ == "__main__":
    if sys.argv[1] == "--backup-child":
        _backup_child_main(sys.argv[2])
    else:
        _freeze_main(sys.argv[1:])
