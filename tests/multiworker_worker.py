"""One worker of the MultiWorkerMirroredStrategy test (run by tests/test_distribute.py).

    python tests/multiworker_worker.py --index I --ports P0,P1 --out weights_I.npz [--epochs N --backup DIR]
        [--stop-at EPOCH:BATCH]

Sets `TF_CONFIG` for a cluster of workers on 127.0.0.1, trains the tiny
model below for a few steps under `get_strategy("auto")` (which must pick
MultiWorkerMirroredStrategy from `TF_CONFIG`) and saves every weight to
`--out`. With `--backup`, a `BackupAndRestore` callback in this worker's
own sub-directory (`backup_dir_for_worker`) keeps the state after every
epoch, so a second run with more epochs resumes where the first ended, as
a restarted job would. With `--stop-at E:B` the worker stops itself
(SIGSTOP) after batch B of epoch E (both from 0), printing a line first, so
that a test can kill it there with SIGKILL. The test also imports
`build_model` / `make_dataset` to train the same model on one device as the
reference.
"""

import argparse
import json
import os
import signal
import sys
import time

GLOBAL_BATCH = 16
STEPS = 4


def build_model(optimizer=None, batch_norm=False):
    """The tiny routed model of the distribution tests, compiled with
    `optimizer` (default SGD(0.1)). No batch norm by default: its training
    statistics are per replica, so training is not expected to match
    across replica counts (evaluation is)."""

    import keras

    from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone

    tasks = TaskSet(
        [
            Task("a", "multiclass", 3),
            Task("b", "multiclass", 5),
            Task("c", "binary", 1),
            Task("d", "regression", 2),
        ]
    )
    keras.utils.set_random_seed(0)
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(4, 8), seed=0, batch_norm=batch_norm)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1))
    return model


def make_arrays(n=GLOBAL_BATCH * STEPS, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    t = rng.integers(0, 4, n).astype("int32")
    y = np.zeros((n, 2), "float32")
    for k, classes in ((0, 3), (1, 5), (2, 2)):
        y[t == k, 0] = rng.integers(0, classes, (t == k).sum())
    y[t == 3] = rng.normal(size=((t == 3).sum(), 2))
    return {"image": x, "task": t}, y


def make_dataset(global_batch=GLOBAL_BATCH):
    import tensorflow as tf

    x, y = make_arrays()
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch, drop_remainder=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--ports", required=True, help="comma-separated ports, one per worker")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--backup", default=None)
    p.add_argument("--stop-at", default=None, help="EPOCH:BATCH after which this worker stops itself")
    args = p.parse_args(argv)

    ports = [int(x) for x in args.ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": args.index},
        }
    )
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import numpy as np
    import tensorflow as tf

    import keras

    from mtl_keras.distribute import BackupAndRestore, backup_dir_for_worker, get_strategy, is_chief, shard_dataset

    started = time.time()
    # The strategy must exist before any other TensorFlow op runs.
    strategy = get_strategy("auto")
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), type(strategy)
    with strategy.scope():
        model = build_model()
    callbacks = []
    if args.backup:
        # Kept after fit (delete_checkpoint=False) so that the test can
        # restart the job from it.
        callbacks.append(BackupAndRestore(backup_dir_for_worker(args.backup, strategy), delete_checkpoint=False))
    if args.stop_at:
        stop_epoch, stop_batch = (int(x) for x in args.stop_at.split(":"))

        class StopHere(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == (stop_epoch, stop_batch):
                    print(f"worker {args.index}: stopped at epoch {stop_epoch} batch {stop_batch}", flush=True)
                    os.kill(os.getpid(), signal.SIGSTOP)

        callbacks.append(StopHere())
    history = model.fit(
        shard_dataset(make_dataset(), "data"), epochs=args.epochs, callbacks=callbacks, verbose=0, shuffle=False
    )
    np.savez(args.out, *[v.numpy() for v in model.weights])
    print(
        json.dumps(
            {
                "index": args.index,
                "replicas": strategy.num_replicas_in_sync,
                "chief": is_chief(strategy),
                "loss": history.history["loss"],
                "seconds": round(time.time() - started, 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
