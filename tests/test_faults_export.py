"""kill -9 of a process while `export_for_serving` writes: no half-written version is ever visible.

TF Serving loads every folder with an integer name under its base path, so
whatever instant an exporting process dies at, each integer folder there
must be a complete SavedModel that serves. Child processes (this file run
as a script, see `_child_main`) export a tiny model again and again and are
killed with SIGKILL:

- at two chosen instants, where the child stops itself (SIGSTOP) and the
  test kills it once it sees it stopped: with the SavedModel written but
  not yet its metadata asset, and with everything written but not yet
  renamed to its version;
- at random instants (seeded) while exporting in a loop, once writing new
  versions and once overwriting version 1.
"""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from stopped_children import wait_stopped

ROOT = Path(__file__).resolve().parents[1]
STOPPED = "FAULT-TEST: stopped"
TIMEOUT = 240


def _model():
    import keras

    from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone

    keras.utils.set_random_seed(0)
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "binary", 1)])
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(4, 4), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(4,), seed=0)
    model.compile()
    return model


def _child_main(root, mode):
    """Exports into `root` until killed; `mode` picks where it stops itself, or `loop` / `overwrite`."""
    import keras

    from mtl_keras import export

    def stop():
        print(STOPPED, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)

    if mode == "before-rename":
        # Stops at the commit of the second export (whichever way it commits).
        replace, exchange = os.replace, export._exchange

        def stop_before(commit):
            def patched(src, dst):
                if Path(dst).name == "2":
                    stop()
                return commit(src, dst)
            return patched

        export.os.replace = stop_before(replace)
        export._exchange = stop_before(exchange)
    elif mode == "before-assets":
        # ExportArchive() builds the backend's subclass, which has its own write_out.
        archive_class = type(keras.export.ExportArchive())
        write_out = archive_class.write_out

        def write_then_stop(self, *args, **kwargs):
            write_out(self, *args, **kwargs)
            stop()

        archive_class.write_out = write_then_stop
    model = _model()
    while True:
        started = time.monotonic()
        path = export.export_for_serving(model, root, version=1 if mode == "overwrite" else None,
                                         overwrite=mode == "overwrite", task_signatures=False)
        print(f"exported {path.name} in {time.monotonic() - started:.3f} s", flush=True)


class _Child:
    def __init__(self, root, mode):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        self.mode = mode
        self.proc = subprocess.Popen([sys.executable, __file__, str(root), mode], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), text=True)
        self.lines, self.output = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix, deadline):
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"{self.mode}: no line {prefix!r}:\n" + "".join(self.output)[-4000:])
            if line.startswith(prefix):
                return line

    def wait_stopped(self, deadline):
        self.wait_for(STOPPED, deadline)
        # The stop follows the line at once.
        stopped = wait_stopped(self.proc, deadline, poll=0.05)
        assert stopped, f"{self.mode}: the child ended (or ran on) instead of stopping"

    def kill(self):
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL, (self.mode, self.proc.returncode)


def _assert_every_version_serves(root, model, x):
    """Every integer folder under `root` is a complete export that answers like `model`."""
    import numpy as np
    import tensorflow as tf

    from mtl_keras.export import load_metadata, reference_predictions

    versions = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    expected = reference_predictions(model, x["image"], x["task"])
    for path in versions:
        assert (path / "saved_model.pb").is_file() and (path / "variables" / "variables.index").is_file(), path
        assert load_metadata(path)["format"] == "mtl_keras.serving/1", path
        out = tf.saved_model.load(str(path)).signatures["serving_default"](
            image=tf.constant(x["image"]), task=tf.constant(x["task"]))
        np.testing.assert_allclose(out["logits"].numpy(), expected["logits"], rtol=1e-5, atol=1e-6)
    return [int(p.name) for p in versions]


def test_kill_9_during_export_never_leaves_a_half_written_version(tmp_path):
    import numpy as np

    from mtl_keras.export import export_for_serving

    rng = random.Random(12)  # random kill instants, the same on every run
    roots = {m: tmp_path / m for m in ("before-assets", "before-rename", "loop", "overwrite")}
    deadline = time.monotonic() + TIMEOUT
    children = [_Child(root, mode) for mode, root in roots.items()]
    try:
        for child in children:
            if child.mode in ("loop", "overwrite"):
                # A random instant of the next export (the first one, which also traces, takes longer).
                seconds = float(child.wait_for("exported", deadline).split()[3])
                time.sleep(rng.uniform(0.0, seconds))
            else:
                child.wait_stopped(deadline)
            child.kill()
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait(timeout=60)

    model = _model()
    x = {"image": np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32"),
         "task": np.array([0, 1, 0, 1], "int32")}
    found = {mode: _assert_every_version_serves(root, model, x) for mode, root in roots.items()}
    assert found["before-assets"] == [], "the export stopped before its asset must not be visible"
    assert found["before-rename"] == [1], "only the first, finished export may be visible"
    assert found["loop"] and found["loop"] == list(range(1, len(found["loop"]) + 1))
    assert found["overwrite"] == [1]
    for mode in ("before-assets", "before-rename"):
        assert [p for p in roots[mode].iterdir() if p.name.startswith(".")], f"{mode}: no export was in progress"

    # The next export cleans the dead writers' leftovers and adds the next version.
    for mode in ("before-rename", "loop"):
        root = roots[mode]
        path = export_for_serving(model, root, task_signatures=False)
        assert path.name == str(max(found[mode], default=0) + 1)
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")], mode
        assert json.loads((path / "assets" / "mtl_keras_tasks.json").read_text())["tasks"][0]["name"] == "a"


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    return int(proc.stdout)


def test_a_version_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    """Where no atomic swap exists, an overwrite moves the old version aside first; killed
    right there, the version is missing until the next export on the host puts it back."""
    import shutil
    import socket

    from mtl_keras.export import export_for_serving

    model = _model()
    first = export_for_serving(model, tmp_path, task_signatures=False)
    aside = tmp_path / f".1.tmp-{socket.gethostname()}-{_dead_pid()}-old-abcd1234"
    aside.mkdir()
    shutil.move(str(first), str(aside / "1"))
    partial = tmp_path / f".2.tmp-{socket.gethostname()}-{_dead_pid()}-efgh5678"
    (partial / "variables").mkdir(parents=True)
    path = export_for_serving(model, tmp_path, task_signatures=False)
    assert path.name == "2" and (tmp_path / "1" / "saved_model.pb").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_live_writer_staging_is_left_alone(tmp_path):
    import socket

    from mtl_keras.export import export_for_serving

    live = tmp_path / f".1.tmp-{socket.gethostname()}-{os.getpid()}-live0000"
    live.mkdir()
    export_for_serving(_model(), tmp_path, version=3, task_signatures=False)
    assert live.is_dir()


def test_version_folders_are_readable_by_other_users(tmp_path):
    from mtl_keras.export import export_for_serving

    mask = os.umask(0o022)
    try:
        path = export_for_serving(_model(), tmp_path, task_signatures=False)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o755


if __name__ == "__main__":
    _child_main(Path(sys.argv[1]), sys.argv[2])
