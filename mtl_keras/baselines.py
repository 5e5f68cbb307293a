"""Baselines of many-task learning: single-task models and the Δm score.

Multi-task results mean little without the two reference points of the MTL
literature:

- **Single-task learning (STL)**: one network per task, trained on that
  task's examples only. `train_single_task_models` builds each one from the
  *same* trunk builder as the multi-task model (called with one task), so the
  only difference is that nothing is shared. Results are cached on disk per
  task, keyed by a hash of everything they depend on, so comparing a new
  multi-task configuration against STL does not retrain T networks.
- **Hard sharing**: one trunk shared by all tasks, one head per task; that is
  `backbones.conv_backbone(..., sigma=1.0)` (no routing layers) in a
  `MultiTaskModel`, so it needs no helper here.

`delta_m` is the mean relative improvement over STL (Maninis et al. 2019;
Vandenhende et al. 2021; LibMTL), the score that summarises a multi-task
method in one number.
"""

import dataclasses
import gc
import hashlib
import json
import math
import time
from pathlib import Path

import keras
import tensorflow as tf

from mtl_keras.model import MultiTaskModel
from mtl_keras.tasks import TaskSet

CACHE_FORMAT = 1
"""Version of the cache file layout; bump it to invalidate old cache entries."""


# ----------------------------------------------------------------------- Δm
def delta_m(results, stl_results, higher_is_better=True):
    """Δm: the mean relative improvement of a method over single-task learning, in percent.

    As the MTL literature defines it (Maninis et al. 2019, "Attentive
    Single-Tasking of Multiple Tasks"; Vandenhende et al. 2021; LibMTL):

        Δm = (1/T) Σ_t (-1)^{l_t} (M_t - M_stl,t) / M_stl,t × 100

    where `l_t = 1` if a lower value of task t's metric is better (a loss, an
    error) and 0 if higher is better (accuracy). A positive Δm means the
    method beats STL on average; Δm = 0 means parity.

    Args:
        results: `{task name: metric value}` of the method.
        stl_results: `{task name: metric value}` of the single-task models;
            must hold every task of `results`.
        higher_is_better: a bool for all tasks, or `{task name: bool}`.

    Returns:
        Δm in percent (a float).

    Example:

    >>> delta_m({"a": 0.9, "b": 0.6}, {"a": 0.8, "b": 0.6})
    6.25
    >>> delta_m({"a": 0.5}, {"a": 0.4}, higher_is_better=False)  # a loss went up 25%
    -25.0
    """
    if not results:
        raise ValueError("delta_m needs the results of at least one task; got none.")
    missing = [t for t in results if t not in stl_results]
    if missing:
        raise ValueError(
            f"No single-task result for tasks {missing}: Δm compares every task of the method "
            "with its single-task model; train (or load) the STL baseline on the same tasks."
        )
    total = 0.0
    for task, value in results.items():
        reference = float(stl_results[task])
        if reference == 0.0 or not math.isfinite(reference):
            raise ValueError(
                f"The single-task metric of task {task!r} is {reference}; Δm divides by it, so it "
                "must be finite and non-zero (use a metric such as accuracy or a loss, not a "
                "centred score)."
            )
        higher = higher_is_better[task] if isinstance(higher_is_better, dict) else higher_is_better
        sign = 1.0 if higher else -1.0
        total += sign * (float(value) - reference) / reference
    return 100.0 * total / len(results)


# ------------------------------------------------------------ one-task data
def _split_element(element):
    if isinstance(element, tuple):
        return element[0], element[1:]
    raise ValueError(
        "Expected a dataset of (inputs, labels[, sample_weight]) tuples with inputs "
        f"{{'image': ..., 'task': ...}}; got elements of type {type(element).__name__}."
    )


def task_subset(dataset, task_id, batch_size, shuffle_buffer=0, seed=None, cache=True):
    """The examples of one task of a one-task-per-example dataset, as a one-task dataset.

    Keeps the examples whose `inputs["task"] == task_id` and renumbers their
    task to 0, so a model built for one task can train on them.

    Args:
        dataset: a `tf.data.Dataset` of `({"image": ..., "task": ...}, label)`
            or `(inputs, label, sample_weight)`, batched or not.
        task_id: the task to keep.
        batch_size: batch size of the result.
        shuffle_buffer: shuffle buffer (0: keep the order).
        seed: shuffle seed.
        cache: cache the filtered examples in memory, so later epochs do not
            filter the whole dataset again. The cache is filled (one pass
            over `dataset`) right away, which also gives the result a known
            length.

    Returns:
        A batched `tf.data.Dataset` with the same structure.

    Example:

    >>> latin = task_subset(data.train, task_id=3, batch_size=128, shuffle_buffer=1000)
    """
    inputs_spec, _ = _split_element(dataset.element_spec)
    if not isinstance(inputs_spec, dict) or "task" not in inputs_spec:
        raise ValueError(
            "task_subset needs one-task-per-example data: inputs must be a dict with a 'task' "
            f"entry (each example's task id); got inputs {inputs_spec}."
        )
    if inputs_spec["task"].shape.rank == 1:
        dataset = dataset.unbatch()
    task_id = int(task_id)

    def keep(inputs, *rest):
        return tf.equal(tf.cast(inputs["task"], tf.int64), task_id)

    def renumber(inputs, *rest):
        inputs = dict(inputs)
        inputs["task"] = tf.zeros_like(inputs["task"])
        return (inputs, *rest)

    ds = dataset.filter(keep).map(renumber, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
        # One pass fills the cache and gives the size, which the filter hid:
        # Keras then knows the epoch length (no "ran out of data" warning).
        size = ds.reduce(tf.constant(0, tf.int64), lambda n, *_: n + 1)
        ds = ds.apply(tf.data.experimental.assert_cardinality(size))
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def count_examples(dataset):
    """Number of examples in a (batched or unbatched) one-task-per-example dataset."""
    inputs_spec, _ = _split_element(dataset.element_spec)
    batched = inputs_spec["task"].shape.rank == 1

    def add(count, element):
        inputs = element[0]
        return count + (tf.shape(inputs["task"], out_type=tf.int64)[0] if batched else 1)

    return int(dataset.reduce(tf.constant(0, tf.int64), add))


# --------------------------------------------------------------- STL results
@dataclasses.dataclass
class SingleTaskResults:
    """What `train_single_task_models` measured, per task.

    Attributes:
        test: `{task: {metric: value}}` on the test data (e.g. `accuracy`,
            `loss`); empty dicts without test data.
        validation: the same on the validation data after the last epoch.
        parameters: `{task: parameter count of its model}`.
        train_seconds: `{task: seconds to train and evaluate its model}`
            (as measured when it was trained, also for cached tasks).
        train_examples: `{task: number of training examples}`.
        from_cache: `{task: True if loaded from the cache}`.
    """

    test: dict
    validation: dict
    parameters: dict
    train_seconds: dict
    train_examples: dict
    from_cache: dict

    def metric(self, name, split="test"):
        """`{task: value}` of one metric, e.g. `metric("accuracy")`."""
        table = self.test if split == "test" else self.validation
        return {t: m[name] for t, m in table.items() if name in m}

    @property
    def total_parameters(self):
        return int(sum(self.parameters.values()))

    @property
    def total_seconds(self):
        return float(sum(self.train_seconds.values()))

    @property
    def num_trained(self):
        """How many tasks were trained (not loaded from the cache) by this call."""
        return sum(not c for c in self.from_cache.values())


def config_hash(config):
    """A short, stable hash of a JSON-able config (dict key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _without_names(config):
    """A config without its `name` entries: Keras uniquifies names per process
    (`adam`, `adam_1`, ...), which must not change a cache key."""
    if isinstance(config, dict):
        return {k: _without_names(v) for k, v in config.items() if k != "name"}
    if isinstance(config, (list, tuple)):
        return [_without_names(v) for v in config]
    return config


def _task_result(model, task, test_data, validation_logs):
    out = {"test": {}, "validation": {}}
    if test_data is not None:
        logs = model.evaluate(test_data, return_dict=True, verbose=0)
        out["test"] = _task_logs(logs, task.name)
    if validation_logs:
        out["validation"] = _task_logs(validation_logs, task.name, prefix="val_")
    return out


def _task_logs(logs, name, prefix=""):
    key = f"{prefix}{name}/"
    return {k[len(key):]: float(v) for k, v in logs.items() if k.startswith(key)}


def train_single_task_models(
    build_backbone,
    tasks,
    train_data,
    validation_data=None,
    test_data=None,
    epochs=1,
    batch_size=128,
    optimizer=None,
    model_kwargs=None,
    seed=0,
    shuffle_buffer=10000,
    jit_compile=False,
    cache_dir=None,
    cache_config=None,
    callbacks=None,
    verbose=0,
    on_task_end=None,
):
    """Single-task learning: one network per task, trained on that task's examples only.

    Every task gets a fresh `MultiTaskModel` with one task, whose trunk is
    `build_backbone(1)`: the same builder that gives the multi-task trunk
    with `build_backbone(num_tasks)`. Each model sees the same number of
    epochs over its task's examples as a multi-task model sees over all of
    them, and is evaluated after its last epoch.

    With `cache_dir`, each task's result is stored in
    `cache_dir/stl-<hash>.json`, where the hash covers the task, the trunk's
    and optimizer's configs, `model_kwargs`, `epochs`, `batch_size`, `seed`
    and `cache_config`; a later call with the same settings loads it instead
    of training. The trunk builder and the data are not hashable, so
    `cache_config` must describe whatever else the results depend on (the
    data: source, tasks, image size, split, data seed, ...).

    Args:
        build_backbone: `num_tasks -> keras.Model`, e.g.
            `lambda n: conv_backbone((32, 32, 1), n, sigma=1.0, filters=...)`.
        tasks: the `TaskSet` (or list of `Task`s) of the data.
        train_data: one-task-per-example `tf.data.Dataset` of
            `({"image", "task"}, label)` for all tasks.
        validation_data: the same for validation, or None.
        test_data: the same for testing, or None.
        epochs: training epochs of each model.
        batch_size: batch size of each model.
        optimizer: `() -> keras.optimizers.Optimizer`, a fresh one per
            model (default: Adam with learning rate 1e-3).
        model_kwargs: other `MultiTaskModel` arguments (`head_units`, ...).
        seed: `keras.utils.set_random_seed(seed)` before each model, so each
            starts from the same seed.
        shuffle_buffer: shuffle buffer of each task's training data.
        jit_compile: passed to `compile`.
        cache_dir: folder of the per-task result cache, or None.
        cache_config: JSON-able description of the data (required with
            `cache_dir`).
        callbacks: `task -> list of callbacks` for each model's `fit`, or None.
        verbose: `fit` verbosity.
        on_task_end: optional `(task_index, task, result_dict, from_cache)`
            callable, e.g. to print progress.

    Returns:
        A `SingleTaskResults`.

    Example:

    >>> stl = train_single_task_models(
    ...     lambda n: conv_backbone((32, 32, 1), n, sigma=1.0), data.tasks,
    ...     data.train, data.validation, data.test, epochs=6,
    ...     cache_dir="runs/stl_cache", cache_config={"data": "omniglot", "image_size": 32})
    >>> delta_m(mtl_accuracy, stl.metric("accuracy"))
    """
    tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    model_kwargs = dict(model_kwargs or {})
    if "weighting" in model_kwargs or "tasks_per_step" in model_kwargs:
        raise ValueError(
            "Single-task models have one task: 'weighting' and 'tasks_per_step' do not apply; "
            "remove them from model_kwargs."
        )
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    make_optimizer = optimizer or (lambda: keras.optimizers.Adam(1e-3))
    if cache_dir is not None and cache_config is None:
        raise ValueError(
            "cache_dir needs cache_config: a JSON-able description of the data (source, tasks, "
            "image size, data seed, ...), since STL results depend on it and it cannot be hashed "
            "from the datasets. Pass e.g. cache_config={'data': 'my_data', 'image_size': 32}."
        )
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)

    keys = ("test", "validation", "parameters", "train_seconds", "train_examples", "from_cache")
    results = {k: {} for k in keys}
    backbone_config = None
    for index, task in enumerate(tasks):
        path = None
        if cache_dir is not None:
            if backbone_config is None:
                backbone_config = _without_names(keras.saving.serialize_keras_object(build_backbone(1)))
            key = {
                "format": CACHE_FORMAT,
                "task": task.get_config(),
                "task_index": index,
                "backbone": backbone_config,
                "optimizer": _without_names(keras.optimizers.serialize(make_optimizer())),
                "model_kwargs": model_kwargs,
                "epochs": epochs,
                "batch_size": batch_size,
                "seed": seed,
                "shuffle_buffer": shuffle_buffer,
                "data": cache_config,
            }
            path = cache_dir / f"stl-{config_hash(key)}.json"
            if path.exists():
                entry = json.loads(path.read_text())
                for k in keys[:-1]:
                    results[k][task.name] = entry[k]
                results["from_cache"][task.name] = True
                if on_task_end:
                    on_task_end(index, task, entry, True)
                continue

        started = time.time()
        train = task_subset(train_data, index, batch_size, shuffle_buffer, seed=seed)
        n_train = count_examples(train)  # also fills the subset's cache
        if n_train == 0:
            raise ValueError(
                f"Task {task.name!r} (id {index}) has no training example: check that the "
                "dataset's task ids match the TaskSet order."
            )
        val = task_subset(validation_data, index, batch_size) if validation_data is not None else None
        test = task_subset(test_data, index, batch_size) if test_data is not None else None

        keras.utils.set_random_seed(seed)
        model = MultiTaskModel(
            build_backbone(1), TaskSet([task]), seed=seed, name=f"stl_{index}", **model_kwargs
        )
        model.compile(optimizer=make_optimizer(), jit_compile=jit_compile)
        history = model.fit(
            train, validation_data=val, epochs=epochs, verbose=verbose, shuffle=False,
            callbacks=callbacks(task) if callbacks else None,
        )
        last = {k: v[-1] for k, v in history.history.items()}
        entry = _task_result(model, task, test, last)
        entry.update(
            parameters=int(model.count_params()),
            train_seconds=round(time.time() - started, 3),
            train_examples=n_train,
        )
        for k in keys[:-1]:
            results[k][task.name] = entry[k]
        results["from_cache"][task.name] = False
        if path is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry, indent=1))
            tmp.replace(path)  # atomic: an interrupted run leaves no half entry
        if on_task_end:
            on_task_end(index, task, entry, False)
        del model, history
        gc.collect()  # 50 models' traced steps would otherwise pile up
    return SingleTaskResults(**results)
