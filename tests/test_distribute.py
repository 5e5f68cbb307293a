"""Strategy choice, batch helpers, and data-parallel training that matches one device.

The MirroredStrategy test uses the two logical CPU devices of conftest.py;
the MultiWorkerMirroredStrategy test runs tests/multiworker_worker.py as two
processes forming a cluster on 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import multiworker_worker as worker
from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone, distribute
from mtl_keras.distribute import (
    backup_dir_for_worker,
    cluster_size,
    get_strategy,
    global_batch_size,
    is_chief,
    parse_tf_config,
    per_replica_batch_size,
    prepare_for_replicas,
    shard_dataset,
    strategy_kind,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multiworker_worker.py"
TWO_WORKERS = json.dumps(
    {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
)


def test_strategy_kind_follows_names_devices_and_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    # No GPU here, no cluster: auto is the default strategy.
    assert strategy_kind("auto") == "default"
    assert strategy_kind("auto", devices=["/cpu:0", "/cpu:1"]) == "mirrored"
    assert strategy_kind("auto", tf_config=TWO_WORKERS) == "multiworker"
    one_worker = json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}})
    assert strategy_kind("auto", tf_config=one_worker) == "default"
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    assert strategy_kind("auto") == "multiworker"
    assert strategy_kind("default") == "default"
    assert strategy_kind("mirrored") == "mirrored"
    monkeypatch.setenv("TF_CONFIG", "{not json")
    assert strategy_kind("default") == "default"  # TF_CONFIG only matters for auto / multiworker
    with pytest.raises(ValueError, match="not valid JSON"):
        strategy_kind("auto")
    with pytest.raises(ValueError, match="Unknown strategy 'tpu'"):
        strategy_kind("tpu")
    with pytest.raises(ValueError, match="only applies to the 'mirrored'"):
        get_strategy("default", devices=["/cpu:0"])


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "has no 'cluster'"),
        ('{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}', "list of 'host:port'"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "needs a 'task'"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}', "not in the cluster"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "out of range"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "parameter servers"),
        ('{"cluster": {"gpu": ["a:1"]}, "task": {"type": "gpu", "index": 0}}', "unknown task types"),
    ],
)
def test_malformed_tf_config_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        parse_tf_config(config)


def test_tf_config_parsing_and_cluster_size(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert parse_tf_config() is None and cluster_size() == 0
    config = parse_tf_config(
        '{"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "chief", "index": 0}}'
    )
    assert cluster_size(config) == 3
    assert cluster_size(TWO_WORKERS) == 2


def test_default_strategy_helpers():
    strategy = get_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert is_chief(strategy) and distribute.worker_index(strategy) == 0
    assert backup_dir_for_worker("/tmp/backup", strategy) == "/tmp/backup"
    assert global_batch_size(32, strategy) == 32


def test_mirrored_batch_helpers():
    strategy = get_strategy("mirrored")  # every logical CPU device of conftest.py
    assert strategy.num_replicas_in_sync == 2
    assert global_batch_size(8, strategy) == 16
    assert per_replica_batch_size(16, strategy) == 8
    with pytest.raises(ValueError, match="does not split evenly over 2 replicas"):
        per_replica_batch_size(15, strategy)
    with pytest.raises(ValueError, match="Unknown shard policy"):
        shard_dataset(tf.data.Dataset.range(4), "rows")
    options = shard_dataset(tf.data.Dataset.range(4), "data").options()
    assert options.experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA


def _train(strategy, make_optimizer, epochs=3):
    with strategy.scope():  # Keras binds an optimizer to the strategy it is created in
        model = worker.build_model(make_optimizer())
    initial = [v.numpy() for v in model.weights]
    history = model.fit(worker.make_dataset(), epochs=epochs, verbose=0, shuffle=False)
    return initial, [v.numpy() for v in model.weights], history.history


def test_two_replicas_match_one_device_on_the_same_global_batch():
    """2 replicas x 8 examples = 1 device x 16 examples, step after step (Adam:
    any mis-scaled gradient would show up in its moment estimates)."""
    init1, one, h1 = _train(get_strategy("default"), lambda: keras.optimizers.Adam(1e-2))
    init2, two, h2 = _train(get_strategy("mirrored"), lambda: keras.optimizers.Adam(1e-2))
    for a, b in zip(init1, init2):
        np.testing.assert_array_equal(a, b)
    moved = max(np.abs(a - b).max() for a, b in zip(init1, one))
    diff = max(np.abs(a - b).max() for a, b in zip(one, two))
    print(f"\n2-replica vs 1-replica: max |w2 - w1| = {diff:.3g} (weights moved by up to {moved:.3g})")
    assert moved > 1e-2, "training did not move the weights"
    assert diff < 1e-5
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-5)
    np.testing.assert_allclose(h1["mean_accuracy"], h2["mean_accuracy"], rtol=1e-6)


def _norms(model):
    return [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_two_replicas_match_one_device_with_batch_norm(tmp_path):
    """Batch norm built under 2 replicas is synchronized: each replica's 8
    examples are normalised with the statistics of the global 16, so the
    replicas train as one device does (weights, moving statistics, and the
    statistics fit() re-estimates at its end); per-replica statistics would not."""
    def train(strategy, synchronized="auto"):
        with strategy.scope():
            model = worker.build_model(keras.optimizers.Adam(1e-2), batch_norm=True)
            if synchronized != "auto":
                # The same trunk with per-replica statistics, as before.
                for layer in _norms(model):
                    layer.synchronized = synchronized
        history = model.fit(worker.make_dataset(), epochs=3, verbose=0, shuffle=False)
        return model, [v.numpy() for v in model.weights], history.history

    # One MirroredStrategy for both 2-replica runs: a second one in this
    # test would reuse its collective keys (see conftest.py).
    mirrored = get_strategy("mirrored")
    one, w1, h1 = train(get_strategy("default"))
    two, w2, h2 = train(mirrored)
    assert [l.synchronized for l in _norms(one)] == [False, False]
    assert [l.synchronized for l in _norms(two)] == [True, True]
    initial = [v.numpy() for v in worker.build_model(batch_norm=True).weights]
    moved = max(np.abs(a - b).max() for a, b in zip(initial, w1))
    diff = max(np.abs(a - b).max() for a, b in zip(w1, w2))
    _, w_local, _ = train(mirrored, synchronized=False)
    local = max(np.abs(a - b).max() for a, b in zip(w1, w_local))
    print(f"\nwith batch norm, 2-replica vs 1-replica: max |w2 - w1| = {diff:.3g} synchronized, "
          f"{local:.3g} per replica (weights moved by up to {moved:.3g})")
    assert moved > 1e-2, "training did not move the weights"
    assert diff < 1e-5
    assert local > 100 * diff
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-5)
    np.testing.assert_allclose(h1["mean_accuracy"], h2["mean_accuracy"], rtol=1e-6)
    # Every replica holds the same statistics after the re-estimate.
    for layer in _norms(two):
        for variable in (layer.moving_mean, layer.moving_variance):
            first, second = (np.asarray(v) for v in variable.value.values)
            np.testing.assert_array_equal(first, second)
    # Saved from 2 replicas, it loads, predicts and trains on one device.
    two.save(tmp_path / "two.keras")
    loaded = keras.saving.load_model(tmp_path / "two.keras")
    assert [l.synchronized for l in _norms(loaded)] == [True, True]
    x, _ = worker.make_arrays(n=16, seed=5)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), one.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    assert np.isfinite(loaded.fit(worker.make_dataset(), epochs=1, verbose=0).history["loss"][0])


@pytest.mark.parametrize("layout", ["one_task_per_example", "several_tasks_per_example"])
def test_prepared_evaluation_on_two_replicas_counts_every_example_once(layout):
    """17 examples in batches of 16: the last batch would leave one replica
    empty (and oneDNN's Conv2D mis-shapes an empty batch, which batch norm
    then rejects); padded with zero-weight rows, 2 replicas evaluate
    exactly as 1."""
    x, y = worker.make_arrays(n=17, seed=3)
    if layout == "several_tasks_per_example":
        rng = np.random.default_rng(4)
        y = np.stack([rng.integers(0, 3, 17), rng.integers(0, 5, 17), rng.integers(0, 2, 17)], 1).astype("float32")
        y[rng.random(y.shape) < 0.3] = np.nan
        x = {"image": x["image"]}
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def evaluate(strategy, data):
        with strategy.scope():
            if layout == "one_task_per_example":
                model = worker.build_model(batch_norm=True)
            else:
                tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1)])
                keras.utils.set_random_seed(0)
                backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(4, 8), seed=0)
                model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0)
                model.compile(optimizer="sgd")
        return model.evaluate(data, return_dict=True, verbose=0)

    mirrored = get_strategy("mirrored")
    padded = prepare_for_replicas(ds, 16, mirrored)
    batches = list(padded)
    assert [len(b[2]) for b in batches] == [16, 16]
    np.testing.assert_array_equal(np.asarray(batches[1][2])[:, 0], [1] + [0] * 15)
    one = evaluate(get_strategy("default"), ds)
    two = evaluate(mirrored, padded)
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_prepared_training_drops_only_the_incomplete_batch():
    x, y = worker.make_arrays(n=40)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    strategy = get_strategy("mirrored")
    kept = list(prepare_for_replicas(ds, 16, strategy, training=True))
    assert [len(b[1]) for b in kept] == [16, 16]
    assert len(list(prepare_for_replicas(ds, 16, get_strategy("default"), training=True))) == 3
    with pytest.raises(ValueError, match="must yield \\(x, y\\)"):
        prepare_for_replicas(tf.data.Dataset.range(4).batch(2), 2, strategy)
    with strategy.scope():
        model = worker.build_model()
    history = model.fit(prepare_for_replicas(ds, 16, strategy, training=True), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def _free_ports(n):
    # Hold all sockets open while picking, so the ports are distinct.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_workers(tmp_path, n, timeout, tag, extra=()):
    """Starts n workers, waits for all (or the first failure), always reaps them."""
    ports = ",".join(str(p) for p in _free_ports(n))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    procs, logs = [], []
    try:
        for i in range(n):
            log = open(tmp_path / f"{tag}_worker{i}.log", "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "--index", str(i), "--ports", ports,
                     "--out", str(tmp_path / f"{tag}_weights{i}.npz"), *extra],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                )
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return codes, outputs


def _cluster_run(tmp_path, tag, extra=(), timeout=120):
    """A 2-worker run; retried once only if it lost the race for its ports."""
    for _ in range(2):
        codes, outputs = _run_workers(tmp_path, 2, timeout, tag, extra)
        if codes == [0, 0] or not any("Address already in use" in o for o in outputs):
            break
    assert codes == [0, 0], "worker failed or timed out:\n" + "\n----\n".join(o[-3000:] for o in outputs)
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    weights = [_load_weights(tmp_path / f"{tag}_weights{i}.npz") for i in range(2)]
    return reports, weights


def _load_weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.slow
def test_multiworker_two_processes_train_identical_weights(tmp_path):
    """Two worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy picked by
    get_strategy("auto") from TF_CONFIG) end with bit-identical weights, equal
    to one device trained on the same global batches; restarted with their
    BackupAndRestore directories they resume after the last finished epoch."""
    started = time.monotonic()
    backup = ["--backup", str(tmp_path / "backup")]
    reports, (w0, w1) = _cluster_run(tmp_path, "first", backup + ["--epochs", "1"])
    wall = time.monotonic() - started
    assert [r["replicas"] for r in reports] == [2, 2]
    assert [r["chief"] for r in reports] == [True, False]
    assert reports[0]["loss"] == reports[1]["loss"]
    assert len(w0) == len(w1) > 0
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["worker_0", "worker_1"]

    # The same global batches on one device give the same weights.
    _, reference, history = _train(get_strategy("default"), lambda: keras.optimizers.SGD(0.1), epochs=2)
    one_epoch = _train(get_strategy("default"), lambda: keras.optimizers.SGD(0.1), epochs=1)[1]
    assert len(one_epoch) == len(w0)
    diff = max(np.abs(a - r).max() for a, r in zip(w0, one_epoch))
    print(f"\nmulti-worker: 2 processes, wall {wall:.1f} s, max |w_workers - w_one_device| = {diff:.3g}")
    assert diff < 1e-5
    np.testing.assert_allclose(reports[0]["loss"], history["loss"][:1], rtol=1e-5)

    # A restarted job asked for 2 epochs runs only the second one, from the backup.
    reports, (w0, w1) = _cluster_run(tmp_path, "restart", backup + ["--epochs", "2"])
    assert [len(r["loss"]) for r in reports] == [1, 1]
    np.testing.assert_allclose(reports[0]["loss"], history["loss"][1:], rtol=1e-5)
    for a, b, r in zip(w0, w1, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
