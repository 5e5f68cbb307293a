"""Speed of Selective Sharing's gradient collection: two measurements, each a dict of numbers.

- `sharing_overhead(num_tasks, config)`: training steps/s of a model without
  and with the `SelectiveSharing` collector in the train step. Issue 3's
  target: at most 5% slower with 50 tasks.
- `predictions_check_overhead(num_tasks, config, run_steps)`: what the
  predictions signal (no collector) adds to a run: one check (probe logits,
  gate, worst-case refit) against the run's training time. Issue 11's
  target: at most 5% at T = 50 on the default run's schedule.
- `collection_vs_naive(num_tasks, config)`: time to obtain every task's
  estimator gradient for one batch, our way (the train step's one backward
  pass, the rows stacked as the collector does) against the naive way (one
  `GradientTape` per task: a forward and a backward pass for each task's
  loss) and a kinder naive variant (one persistent tape, one `gradient` call
  per task). Target: at least 10x cheaper with 50 tasks.

Timings alternate the variants over several rounds and keep the best round
(steps/s) or the median (seconds), as the machine may be shared.
`apps/benchmark.py` runs both (`--sharing`, `--sharing-tasks`, `--sharing-only`).
"""

import time

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.experiments.training import build_model
from mtl_keras.sharing import GradientCollector
from mtl_keras.sharing.named import DEFAULT_REFIT_SIZE
from mtl_keras.sharing.probe import DEFAULT_PROBE_SIZE
from mtl_keras.tasks import Task, TaskSet


def _model_and_batch(num_tasks, config, classes, seed=0):
    keras.utils.set_random_seed(seed)
    tasks = TaskSet([Task(f"task{i:02d}", "multiclass", classes) for i in range(num_tasks)])
    size, batch_size = config.image_size, config.batch_size
    # Speed does not depend on the learning rate: a constant one needs no run length.
    model = build_model(config.replace(lr_schedule="constant"), tasks, (size, size, 1), seed=seed)
    rng = np.random.default_rng(seed)
    x = {
        "image": rng.random((batch_size, size, size, 1)).astype("float32"),
        "task": rng.integers(0, num_tasks, batch_size).astype("int32"),
    }
    y = rng.integers(0, classes, batch_size).astype("float32")
    return model, (x, y)


def _time_fit(model, dataset, steps):
    t0 = time.perf_counter()
    # Steps/s of training alone: the batch-norm re-estimate after fit() is no step.
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, recalibrate_batch_norm=False)
    return steps / (time.perf_counter() - t0)


def sharing_overhead(num_tasks, config, classes=20, steps=20, rounds=3):
    """Training steps/s without and with the Selective Sharing collector.

    Args:
        num_tasks: tasks of the model.
        config: the `TrainConfig` of the model (image size, batch, trunk, heads, sigma).
        classes: classes per task.
        steps: timed steps per round and variant.
        rounds: rounds, each timing both variants.

    Returns:
        A dict: `num_tasks`, `steps_per_second_off`, `steps_per_second_on`
        (best of `rounds`), `slowdown` (`off / on - 1`, e.g. 0.03 = 3%
        slower; `slowdown_median` from the medians), the per-round values,
        and `collector_seconds_per_step` (the collector's ops timed alone)
        with `collector_fraction_of_step` (that time over a step's time).
    """
    model, batch = _model_and_batch(num_tasks, config, classes)
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    collector = GradientCollector(model)
    off, on = [], []
    # Two compiled train functions, one per variant, so that the rounds can
    # alternate without retracing.
    functions = {}
    for attach in (False, True):
        collector.attach() if attach else collector.detach()
        # Trace + warm up.
        model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0, recalibrate_batch_norm=False)
        functions[attach] = model.train_function
    for _ in range(rounds):
        for attach, out in ((False, off), (True, on)):
            collector.attach() if attach else collector.detach()
            model.train_function = functions[attach]
            out.append(_time_fit(model, dataset, steps))
    collector.detach()
    # The collector's own work, timed alone (robust to a busy machine): the
    # ops it adds to a step, on this batch's real gradients.
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        objective, step = model._step(batch, training=True)
    grads = tape.gradient(objective, variables)
    # The step record is captured, not passed: a tf.function takes tensors,
    # and the collector reads only the pairs' task ids and weights from it.
    alone = tf.function(lambda g: collector(variables, g, step))
    alone(grads)
    collector_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        alone(grads)
        collector._steps.numpy()  # wait for the update
        collector_times.append(time.perf_counter() - t0)
    # The best round is the one least disturbed by other processes.
    off_b, on_b = float(np.max(off)), float(np.max(on))
    return {
        "num_tasks": num_tasks,
        "batch_size": config.batch_size,
        "steps_per_second_off": off_b,
        "steps_per_second_on": on_b,
        "slowdown": off_b / on_b - 1.0,
        "slowdown_median": float(np.median(off)) / float(np.median(on)) - 1.0,
        "rounds_off": off,
        "rounds_on": on,
        "collector_seconds_per_step": float(np.median(collector_times)),
        "collector_fraction_of_step": float(np.median(collector_times)) * off_b,
    }


def predictions_check_overhead(num_tasks, config, run_steps, classes=20, steps=20, rounds=3,
                               probe_size=DEFAULT_PROBE_SIZE, refit_size=DEFAULT_REFIT_SIZE, seed=0):
    """What the predictions signal adds to a run: one check against the run's training time.

    The predictions signal leaves the train step as it is (no collector);
    its cost is the check itself, once per scheduled epoch end: every head's
    logits on the probe, the gate (permutation null and bootstrap), and, when
    tasks merge, the refit of their output layers. The check is timed as
    `SelectiveSharing` runs it with its defaults, and the refit in its worst
    case (every task but one moved onto one estimator), so their sum bounds a
    check from above whatever the gate decides.

    Args:
        num_tasks: tasks of the model.
        config: the `TrainConfig` of the model (heads need `head_units`).
        run_steps: training steps of the run the check is part of (e.g. a
            default run's epochs times its batches per epoch).
        classes: classes per task.
        steps, rounds: timed training steps per round, and rounds (best kept).
        probe_size, refit_size: inputs of the probe and of the refit (the
            apps' defaults, `sharing.selective_sharing`'s).
        seed: random state of the model and the inputs.

    Returns:
        A dict: `steps_per_second`, `run_seconds` (`run_steps` at that
        rate), `check_seconds`, `refit_all_seconds`, and `overhead`
        (`(check_seconds + refit_all_seconds) / run_seconds`, 0.03 = 3%).
    """
    from mtl_keras.sharing import SelectiveSharing
    from mtl_keras.sharing.readout import refit_plan

    if not config.head_units:
        raise ValueError("The predictions check merges estimators: give the heads some (head_units).")
    model, batch = _model_and_batch(num_tasks, config, classes, seed)
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0, recalibrate_batch_norm=False)  # trace
    rate = float(np.max([_time_fit(model, dataset, steps) for _ in range(rounds)]))
    rng = np.random.default_rng(seed)
    size = config.image_size
    probe = {"image": rng.random((probe_size, size, size, 1)).astype("float32")}
    refit_inputs = {"image": rng.random((refit_size, size, size, 1)).astype("float32")}
    t0 = time.perf_counter()
    refit_plan(model, refit_inputs, [0] * num_tasks)
    refit_all = time.perf_counter() - t0
    sharing = SelectiveSharing(signal="predictions", probe=probe, refit_inputs=refit_inputs, verbose=0)
    sharing.set_model(model)
    t0 = time.perf_counter()
    sharing._check_predictions(1, {})
    check = time.perf_counter() - t0
    run_seconds = run_steps / rate
    return {
        "num_tasks": num_tasks,
        "batch_size": config.batch_size,
        "steps_per_second": rate,
        "run_steps": int(run_steps),
        "run_seconds": run_seconds,
        "check_seconds": check,
        "check_merged": bool(sharing.history[-1]["merged"]),
        "refit_all_seconds": refit_all,
        "probe_size": probe_size,
        "refit_size": refit_size,
        "overhead": (check + refit_all) / run_seconds,
    }


def collection_vs_naive(num_tasks, config, classes=20, repeats=5):
    """Seconds to get all tasks' estimator gradients for one batch: one pass vs per-task tapes.

    Args:
        num_tasks: tasks of the model.
        config: the `TrainConfig` of the model, as for `sharing_overhead`.
        classes: classes per task.
        repeats: timings of each variant (the median is kept).

    Returns:
        A dict: `num_tasks`, `one_pass_seconds`, `naive_seconds` (a tape,
        forward and backward, per task), `naive_persistent_seconds` (one
        forward, one `gradient` call per task), and the ratios
        `naive_over_one_pass`, `naive_persistent_over_one_pass`.
    """
    model, batch = _model_and_batch(num_tasks, config, classes)
    variables = model.trainable_variables
    # Stacked: row t of each is head t's estimator (mtl_keras.layers.TaskHeads).
    estimator_vars = model.task_heads.stacked_estimator_variables()

    def row(grads, t):
        """Head t's flattened estimator gradient out of the stacked variables' gradients."""
        parts = []
        for g in grads:
            if isinstance(g, tf.IndexedSlices):  # sum the slices of row t, without densifying all rows
                g = tf.tensordot(tf.cast(tf.equal(g.indices, t), g.values.dtype), g.values, 1)
            else:
                g = g[t]
            parts.append(tf.reshape(g, (-1,)))
        return tf.concat(parts, 0)

    @tf.function(autograph=False)
    def one_pass(data):
        # What the train step does anyway: one backward pass for all
        # variables; the collector only stacks the estimators' rows.
        with tf.GradientTape() as tape:
            objective, _ = model._step(data, training=True)
        grads = tape.gradient(objective, variables)
        position = {id(v): i for i, v in enumerate(variables)}
        stacked = [tf.convert_to_tensor(grads[position[id(v)]]) for v in estimator_vars]
        return tf.concat([tf.reshape(g, (num_tasks, -1)) for g in stacked], 1)

    task_weights = tf.constant(model.table.weights, "float32")

    def task_objectives(out, tasks):
        # Task t's part of the training objective: the weighting applied to
        # its loss alone (exact for linear weightings such as the default).
        pairs = out.pairs
        shares, present, global_losses = model.task_losses(out.losses, pairs.task_ids, pairs.weights)
        return [model.weighting.combine(shares * tf.one_hot(t, num_tasks), present, task_weights, global_losses)
                for t in tasks]

    def task_loss(data, t):
        _, out = model._step(data, training=True)
        return task_objectives(out, [t])[0]

    @tf.function(autograph=False)
    def naive(data):
        rows = []
        for t in range(num_tasks):
            with tf.GradientTape() as tape:
                loss = task_loss(data, t)
            rows.append(row(tape.gradient(loss, estimator_vars), t))
        return tf.stack(rows)

    @tf.function(autograph=False)
    def naive_persistent(data):
        with tf.GradientTape(persistent=True) as tape:
            _, out = model._step(data, training=True)
            losses = task_objectives(out, range(num_tasks))
        rows = [row(tape.gradient(losses[t], estimator_vars), t) for t in range(num_tasks)]
        del tape
        return tf.stack(rows)

    functions = {"one_pass": one_pass, "naive": naive, "naive_persistent": naive_persistent}
    results = {}
    for name, fn in functions.items():
        results[name] = fn(batch).numpy()  # trace
    # Same signal three ways (up to float error): the comparison is fair.
    scale = np.abs(results["one_pass"]).max()
    for name in ("naive", "naive_persistent"):
        np.testing.assert_allclose(results[name], results["one_pass"], atol=1e-4 * scale + 1e-7)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            t0 = time.perf_counter()
            fn(batch).numpy()
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(v)) for name, v in times.items()}
    return {
        "num_tasks": num_tasks,
        "batch_size": config.batch_size,
        "one_pass_seconds": med["one_pass"],
        "naive_seconds": med["naive"],
        "naive_persistent_seconds": med["naive_persistent"],
        "naive_over_one_pass": med["naive"] / med["one_pass"],
        "naive_persistent_over_one_pass": med["naive_persistent"] / med["one_pass"],
    }
