"""kill -9 of one of two MultiWorkerMirroredStrategy workers mid-epoch, then the job restarted.

Two tests/multiworker_worker.py processes form a cluster on 127.0.0.1 and
train 3 epochs with their BackupAndRestore folders. Worker 1 stops itself
after the second batch of the second epoch (`--stop-at 1:1`); the test sees
it stopped and kills it with SIGKILL. Worker 0 is left to find out by
itself: TensorFlow's coordination service misses worker 1's heartbeats and
aborts its collectives, so it exits with an error instead of hanging. Both
are then started again with the same command: they resume after epoch 1 and
end where one device trained on the same global batches ends.
"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np

from stopped_children import kill_when_stopped, reap
from test_distribute import ROOT, WORKER, _free_ports, _load_weights, _train
from mtl_keras.distribute import get_strategy

EPOCHS = 3
TIMEOUT = 180


def _start(tmp_path, tag, ports, index, extra=()):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log = tmp_path / f"{tag}_worker{index}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--index", str(index), "--ports", ports, "--epochs", str(EPOCHS),
             "--backup", str(tmp_path / "backup"), "--out", str(tmp_path / f"{tag}_weights{index}.npz"), *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    return proc, log


def test_kill_9_of_one_worker_mid_epoch_then_both_restarted(tmp_path):
    deadline = time.monotonic() + TIMEOUT
    ports = ",".join(str(p) for p in _free_ports(2))
    (w0, log0), (w1, log1) = _start(tmp_path, "first", ports, 0), _start(tmp_path, "first", ports, 1,
                                                                            ["--stop-at", "1:1"])
    try:
        kill_when_stopped(w1, deadline, "epoch 2, batch 2",
                          lambda: f"{log1.read_text()[-3000:]}\n----\n{log0.read_text()[-3000:]}")
        # Where an uninterrupted run ends: one device on the same global batches (the equivalence
        # tests/test_distribute.py holds to 1e-5). Trained here, while the survivor idles out the heartbeats.
        _, reference, history = _train(get_strategy("default"), lambda: keras.optimizers.SGD(0.1), epochs=EPOCHS)
        # The survivor notices by itself (missed heartbeats) and fails: it does not hang.
        w0.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        reap([w0, w1])
    assert w1.returncode == -signal.SIGKILL
    survivor = log0.read_text()
    assert w0.returncode == 1, survivor[-3000:]
    assert "task:1" in survivor and "unhealthy" in survivor, survivor[-3000:]
    # Both workers' backups hold epoch 1, the last one finished.
    for worker in ("worker_0", "worker_1"):
        state = json.loads((tmp_path / "backup" / worker / "training_metadata.json").read_text())
        assert state["epoch"] == 1, (worker, state)

    # The whole job restarted with the same command (new ports: the old ones may linger).
    ports = ",".join(str(p) for p in _free_ports(2))
    procs = [_start(tmp_path, "restart", ports, i) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc, log in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        reap([p for p, _ in procs])
    outputs = [log.read_text() for _, log in procs]
    assert [p.returncode for p, _ in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    assert [len(r["loss"]) for r in reports] == [EPOCHS - 1] * 2, "not resumed after epoch 1"
    r0, r1 = (_load_weights(tmp_path / f"restart_weights{i}.npz") for i in range(2))
    for a, b in zip(r0, r1):
        np.testing.assert_array_equal(a, b)

    diff = max(np.abs(a - r).max() for a, r in zip(r0, reference))
    print(f"\nkilled and restarted 2-worker job vs one device: max |w - w_ref| = {diff:.3g}")
    np.testing.assert_allclose(reports[0]["loss"], history["loss"][1:], rtol=1e-5)
    for a, r in zip(r0, reference):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
