"""Choosing a `tf.distribute` strategy, and the batch and dataset helpers that go with it.

`MultiTaskModel`'s step already computes every task's loss over the *global*
batch (see `MultiTaskModel.task_losses`), so data parallel training needs only
three things from the user: build and compile the model *and create its
optimizer* inside `strategy.scope()` (a Keras optimizer belongs to the
strategy it was created under), batch the dataset with the global batch
size (`global_batch_size`) and pass it through `prepare_for_replicas` (no
replica may get an empty batch); `fit()` splits each batch between the
replicas.

- One machine, several GPUs: `MirroredStrategy` (one replica per GPU; on a
  machine without GPUs but with several logical CPU devices, one per CPU
  device, which is how the tests exercise it).
- Several machines: `MultiWorkerMirroredStrategy`, configured by the
  `TF_CONFIG` environment variable of each worker:

      TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                  "task": {"type": "worker", "index": 0}}'

  Every worker runs the same program; worker 0 is the chief (the one that
  should write TensorBoard logs, reports and exports, see `is_chief`).

Example:

>>> strategy = get_strategy("auto")
>>> with strategy.scope():
...     model = MultiTaskModel(conv_backbone(...), tasks)
...     model.compile(optimizer="adam")
>>> batch = global_batch_size(64, strategy)
>>> train = prepare_for_replicas(make_train().batch(batch), batch, strategy, training=True)
>>> val = prepare_for_replicas(make_val().batch(batch), batch, strategy)
>>> model.fit(train, validation_data=val, epochs=3)

**Resuming a killed run.** `BackupAndRestore` (Keras' callback, made crash
safe) keeps the state of the last finished epoch; `resume_epoch` reads which
epoch that is before `fit`, so that `epoch_stream` can give the resumed run
the batches the uninterrupted run would have seen from there on; with
`enable_determinism` (op determinism and seeds) the resumed run then ends
with the very weights of an uninterrupted one:

>>> steps = train_steps(num_examples, batch, strategy)
>>> train = epoch_stream(train, steps, start_epoch=resume_epoch(backup_dir))
>>> model.fit(train, steps_per_epoch=steps, epochs=3, callbacks=[BackupAndRestore(backup_dir)])
"""

import glob
import json
import os

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.reporting import fsync_path

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
TF_CONFIG_ENV = "TF_CONFIG"

# Task types a MultiWorkerMirroredStrategy cluster may contain.
_WORKER_TYPES = ("chief", "worker")
_SHARD_POLICIES = {
    "auto": tf.data.experimental.AutoShardPolicy.AUTO,
    "data": tf.data.experimental.AutoShardPolicy.DATA,
    "file": tf.data.experimental.AutoShardPolicy.FILE,
    "off": tf.data.experimental.AutoShardPolicy.OFF,
}


def parse_tf_config(value=None):
    """Reads and checks a `TF_CONFIG` cluster description.

    Args:
        value: the JSON string; default: the `TF_CONFIG` environment variable.

    Returns:
        The parsed dict (`{"cluster": {...}, "task": {...}}`), or None when
        `TF_CONFIG` is unset or empty.

    Raises:
        ValueError: naming what is wrong when the JSON is malformed, the
            cluster is empty, the task is missing or not in the cluster, or
            the cluster has parameter servers (not supported here).
    """
    if value is None:
        value = os.environ.get(TF_CONFIG_ENV, "")
    if not value or not value.strip():
        return None
    example = (
        '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{TF_CONFIG_ENV} is not valid JSON ({e}); expected e.g. {example}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{TF_CONFIG_ENV} must be a JSON object, got {type(config).__name__}; expected e.g. {example}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(
            f"{TF_CONFIG_ENV} has no 'cluster' (a mapping of task type to 'host:port' lists); "
            f"expected e.g. {example}"
        )
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise ValueError(
                f"{TF_CONFIG_ENV}: cluster[{kind!r}] must be a list of 'host:port' strings, got {addresses!r}."
            )
    if "ps" in cluster:
        raise ValueError(
            f"{TF_CONFIG_ENV} names parameter servers ('ps'); this helper sets up synchronous "
            "MultiWorkerMirroredStrategy only. Use a cluster of 'chief'/'worker' tasks, or build a "
            "tf.distribute.ParameterServerStrategy yourself."
        )
    unknown = sorted(set(cluster) - set(_WORKER_TYPES) - {"evaluator"})
    if unknown:
        raise ValueError(f"{TF_CONFIG_ENV}: unknown task types {unknown} in the cluster; use 'chief' and 'worker'.")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(
            f"{TF_CONFIG_ENV} needs a 'task' with this process's 'type' and 'index', got {task!r}; "
            f"expected e.g. {example}"
        )
    kind, index = task["type"], task["index"]
    if kind != "evaluator":
        if kind not in cluster:
            raise ValueError(f"{TF_CONFIG_ENV}: task type {kind!r} is not in the cluster ({sorted(cluster)}).")
        if not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
            raise ValueError(
                f"{TF_CONFIG_ENV}: task index {index!r} is out of range for the "
                f"{len(cluster[kind])} {kind!r} address(es)."
            )
    return config


def cluster_size(tf_config=None):
    """Number of training processes (chief + workers) named by `TF_CONFIG` (0 when unset).

    Args:
        tf_config: a JSON string, an already parsed dict, or None for the
            environment variable.
    """
    config = tf_config if isinstance(tf_config, dict) else parse_tf_config(tf_config)
    if not config:
        return 0
    return sum(len(config["cluster"].get(kind, [])) for kind in _WORKER_TYPES)


def _local_devices():
    """The devices MirroredStrategy should mirror over: GPUs, else logical CPUs."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def strategy_kind(name="auto", devices=None, tf_config=None):
    """What `get_strategy(name, devices)` builds, without building it.

    Creating a `MultiWorkerMirroredStrategy` starts a server and cannot be
    undone in the process, so the choice is kept apart (and testable).

    Args:
        name: one of `STRATEGIES`.
        devices: device names given for `"mirrored"`, or None.
        tf_config: a `TF_CONFIG` JSON string; default: the environment.

    Returns:
        `"default"`, `"mirrored"` or `"multiworker"`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {STRATEGIES}.")
    if devices is not None and name not in ("mirrored", "auto"):
        raise ValueError(f"devices= only applies to the 'mirrored' strategy, not {name!r}.")
    if name in ("auto", "multiworker"):
        # A malformed TF_CONFIG fails here, with a readable message, rather
        # than deep inside TensorFlow's cluster resolver.
        config = parse_tf_config(tf_config)
        if name == "multiworker" or cluster_size(config) > 1:
            return "multiworker"
    if name == "auto":
        gpus = len(tf.config.list_logical_devices("GPU"))
        many_devices = devices is not None and len(devices) > 1
        return "mirrored" if many_devices or gpus > 1 else "default"
    return name


def get_strategy(name="auto", devices=None):
    """A `tf.distribute.Strategy` by name.

    Args:
        name: one of
            - `"auto"`: `MultiWorkerMirroredStrategy` when `TF_CONFIG` names a
              cluster of more than one process, else `MirroredStrategy` when
              more than one GPU is visible, else the default strategy;
            - `"default"`: the default (single device) strategy;
            - `"mirrored"`: `MirroredStrategy` over `devices`, default all
              GPUs, or all logical CPU devices when there is no GPU;
            - `"multiworker"`: `MultiWorkerMirroredStrategy` configured by
              `TF_CONFIG` (a single local worker when it is unset).
        devices: device names for `"mirrored"` (e.g. `["/gpu:0", "/gpu:1"]`).

    Returns:
        The strategy. Build and compile the model inside `strategy.scope()`.

    Raises:
        ValueError: for an unknown name, devices with a strategy that does
            not take them, or a malformed `TF_CONFIG`.

    Example:

    >>> strategy = get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    >>> strategy.num_replicas_in_sync
    2
    """
    name = strategy_kind(name, devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = list(devices) if devices is not None else _local_devices()
        if not devices:
            raise ValueError("MirroredStrategy needs at least one device; none are visible.")
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.MultiWorkerMirroredStrategy()


def global_batch_size(per_replica_batch_size, strategy=None):
    """The batch size to batch the dataset with: per-replica size times the replicas."""
    strategy = strategy or tf.distribute.get_strategy()
    return int(per_replica_batch_size) * strategy.num_replicas_in_sync


def per_replica_batch_size(global_batch, strategy=None):
    """Each replica's share of a global batch; raises when it does not divide evenly.

    An uneven split is legal in TensorFlow but makes replicas' batches differ
    in size, so a "same global batch" comparison with one replica no longer
    holds batch by batch; asking for a divisible size avoids the surprise.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if int(global_batch) % replicas:
        raise ValueError(
            f"Global batch size {global_batch} does not split evenly over {replicas} replicas; "
            f"use a multiple of {replicas} (e.g. {replicas * max(1, int(global_batch) // replicas)})."
        )
    return int(global_batch) // replicas


def shard_dataset(dataset, policy="data"):
    """Sets how `MultiWorkerMirroredStrategy` splits `dataset` between workers.

    TensorFlow's default (`AUTO`) shards by input file and falls back to
    sharding by element with a warning when the pipeline does not read files
    (in-memory arrays, cached TFDS splits read through one file). `"data"`
    makes every worker read the whole pipeline and keep its share of each
    global batch, which always works; `"file"` is cheaper when there are at
    least as many files as workers; `"off"` gives every worker everything.

    Args:
        dataset: a `tf.data.Dataset`, batched with the global batch size.
        policy: `"auto"`, `"data"`, `"file"` or `"off"`.

    Returns:
        The dataset with the sharding option set (a no-op on one worker).
    """
    if policy not in _SHARD_POLICIES:
        raise ValueError(f"Unknown shard policy {policy!r}; choose one of {tuple(_SHARD_POLICIES)}.")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = _SHARD_POLICIES[policy]
    return dataset.with_options(options)


def _batch_size_of(element):
    return tf.shape(tf.nest.flatten(element)[0])[0]


def prepare_for_replicas(dataset, global_batch, strategy=None, training=False, policy="data"):
    """Makes every batch of `dataset` split into non-empty, equal replica batches.

    tf.distribute cuts each global batch into per-replica batches of
    `global_batch / replicas` examples, so a last batch of `global_batch / 2`
    examples or fewer leaves a replica with an *empty* batch, and with
    oneDNN (TensorFlow's default on x86 CPUs) `Conv2D` returns a wrongly
    shaped tensor for an empty batch, failing the step. This avoids empty
    batches without changing any result:

    - `training=True`: the last, incomplete batch is dropped (the usual
      `drop_remainder`; with a shuffled dataset each epoch drops different
      examples).
    - `training=False`: the last batch is padded to `global_batch` with
      copies of its first example given sample weight 0, so evaluation
      still sees every example and the padding counts in no loss or
      metric. The dataset must yield `(x, y)` or `(x, y, sample_weight)`.

    With one replica the dataset is returned unchanged (sharding option
    aside).

    Args:
        dataset: a `tf.data.Dataset` batched with `global_batch`.
        global_batch: its batch size (all replicas together).
        strategy: the strategy (default: the current one).
        training: whether the dataset feeds training.
        policy: the multi-worker sharding policy, see `shard_dataset`.

    Returns:
        The dataset, ready for `fit` / `evaluate` under `strategy`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    per_replica_batch_size(global_batch, strategy)  # must divide evenly
    dataset = shard_dataset(dataset, policy)
    if strategy.num_replicas_in_sync == 1:
        return dataset
    global_batch = int(global_batch)
    if training:
        return dataset.filter(lambda *element: tf.equal(_batch_size_of(element), global_batch))
    if not isinstance(dataset.element_spec, tuple) or len(dataset.element_spec) not in (2, 3):
        raise ValueError(
            "An evaluation dataset must yield (x, y) or (x, y, sample_weight) to be padded with "
            f"zero-weight examples; got elements {dataset.element_spec}."
        )

    def pad(x, y, sample_weight=None):
        n = _batch_size_of(y)
        missing = global_batch - n
        if sample_weight is None:
            # [n, 1] broadcasts over the task columns of several-tasks-per-
            # example labels and flattens to [n] for one task per example.
            sample_weight = tf.ones([n, 1], tf.float32)

        def fill(t, value=None):
            # Repeat the first row (a valid input, e.g. a valid task id);
            # with `value`, pad with that constant instead.
            t = tf.convert_to_tensor(t)
            if value is not None:
                paddings = [[0, missing]] + [[0, 0]] * (len(t.shape) - 1)
                return tf.pad(t, paddings, constant_values=tf.cast(value, t.dtype))
            return tf.concat([t, tf.repeat(t[:1], missing, axis=0)], axis=0)

        x = tf.nest.map_structure(fill, x)
        y = tf.nest.map_structure(fill, y)
        sample_weight = fill(sample_weight, 0)
        return x, y, sample_weight

    return dataset.map(pad, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def num_replicas():
    """Replicas in sync in the current replica context (1 outside a strategy)."""
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def all_reduce_sum(value):
    """Sums a tensor over the replicas of the current step (identity with one replica)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def in_multi_worker_mode(strategy):
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` spanning several workers."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()
    )


def distribute_dataset(dataset, strategy=None, policy="data"):
    """`strategy.experimental_distribute_dataset` of a globally batched dataset.

    `Model.fit` distributes a `tf.data.Dataset` by itself; use this for custom
    loops (`strategy.run` over the returned iterable).
    """
    strategy = strategy or tf.distribute.get_strategy()
    return strategy.experimental_distribute_dataset(shard_dataset(dataset, policy))


def worker_index(strategy=None):
    """This process's index among the workers (0 without a cluster)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    return int(resolver.task_id or 0)


def is_chief(strategy=None):
    """Whether this process should write logs, reports and exports.

    True unless a multi-worker cluster is running and this process is not its
    chief (the `chief` task, or worker 0 when the cluster has no `chief`).
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    kind, index = resolver.task_type, resolver.task_id
    if kind == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return kind in (None, "worker") and not has_chief and (index or 0) == 0


def backup_dir_for_worker(backup_dir, strategy=None):
    """A `BackupAndRestore` directory of this worker's own under `backup_dir`.

    Keras 3's `BackupAndRestore` writes `latest.weights.h5` into its directory
    from every process, so on a shared file system the workers of a
    multi-worker job would overwrite each other's file mid-write. Giving each
    worker its own sub-directory keeps the backups intact; the workers train
    in lockstep, so they all hold the same weights and restart from the same
    epoch.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return str(backup_dir)
    kind = resolver.task_type or "worker"
    return os.path.join(str(backup_dir), f"{kind}_{int(resolver.task_id or 0)}")


def enable_determinism(seed=None):
    """Makes every TensorFlow op (and `tf.data`) deterministic; with `seed`, also seeds every RNG.

    Two runs (or a killed run and its resumption) on the same machine and
    software then end with bit-identical weights. The cost: ops without a
    deterministic kernel raise `UnimplementedError` (none in this library on
    CPU), TensorFlow random ops without a seed raise, and `tf.data` gives up
    the parallelism that could reorder elements (this library's pipelines
    are already ordered). On GPUs some ops switch to slower kernels.
    Cannot be undone in the process.
    """
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def train_steps(num_examples, global_batch, strategy=None):
    """Batches per epoch of a training set of `num_examples` batched by `global_batch`.

    One device trains on the last, smaller batch too; several replicas drop
    it (`prepare_for_replicas(training=True)`).

    Raises:
        ValueError: when that leaves no batch at all.
    """
    strategy = strategy or tf.distribute.get_strategy()
    full, rest = divmod(int(num_examples), int(global_batch))
    steps = full if strategy.num_replicas_in_sync > 1 else full + (rest > 0)
    if steps < 1:
        raise ValueError(
            f"{num_examples} training examples make no full global batch of {global_batch} over "
            f"{strategy.num_replicas_in_sync} replicas; use a smaller batch size or more data."
        )
    return steps


def epoch_stream(dataset, steps_per_epoch, start_epoch=0):
    """`dataset` repeated without end, from the first batch of epoch `start_epoch`.

    Give `fit` this with `steps_per_epoch`. `fit` then reads the stream with
    one iterator, so epoch `e` gets the `e`-th pass over `dataset` (a
    reshuffled dataset: the `e`-th order of its seed) whether the process
    trained epochs `0..e-1` itself or a killed process did and this one
    resumed: the finished epochs' batches are read and skipped (input
    pipeline work only, no training), never replayed from a new first order.

    Args:
        dataset: the batched training dataset (`steps_per_epoch` batches per pass).
        steps_per_epoch: batches per pass, e.g. from `train_steps`.
        start_epoch: epochs already trained (`resume_epoch`).
    """
    stream = dataset.repeat()
    if start_epoch:
        stream = stream.skip(int(start_epoch) * int(steps_per_epoch))
    return stream


BACKUP_METADATA = "training_metadata.json"


def resume_epoch(backup_dir):
    """The number of finished epochs a `BackupAndRestore` folder holds (0 when there is no backup).

    Raises:
        ValueError: when the folder's metadata cannot be read (a backup
            written by something else, or damaged by hand).
    """
    path = os.path.join(str(backup_dir), BACKUP_METADATA)
    if not os.path.exists(path):
        return 0
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"Cannot read the backup state {path} ({e}); delete {backup_dir} to train from the start."
        ) from None


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore`, safe against a kill at any instant and exact on resume.

    Keras writes `latest.weights.h5` in place and the epoch number after it,
    so a process killed while saving leaves a truncated file (the restart
    fails) or weights one epoch ahead of the recorded epoch (the restart
    silently trains an epoch twice). Here each epoch's state is written to
    files of its own, flushed to disk, and committed by one atomic rename of
    `training_metadata.json`, which names the weights file it belongs to:
    whenever the process dies, the folder holds one complete, consistent
    state.

    It also saves the state of every random generator of the model (the
    `keras.random.SeedGenerator`s that draw dropout masks), which Keras'
    weight files leave out, so that a resumed run draws the same masks as an
    uninterrupted one.

    Saves at epoch ends only: Keras restarts an interrupted epoch from its
    first batch, so a mid-epoch save would train part of an epoch twice.

    Args:
        backup_dir: the folder (one per worker in a multi-worker job, see
            `backup_dir_for_worker`).
        delete_checkpoint: delete the folder when `fit` completes.
    """

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=delete_checkpoint)

    def on_train_begin(self, logs=None):
        # No fallback to a previous copy (Keras' double_checkpoint): the
        # state on disk is always complete.
        self._load_model()

    def _load_model(self):
        if not self.model.built:
            raise ValueError("BackupAndRestore needs a built model; call it on a batch of data before fit().")
        metadata_path = os.path.join(self.backup_dir, BACKUP_METADATA)
        if not os.path.exists(metadata_path):
            return
        with open(metadata_path, encoding="utf-8") as f:
            metadata = json.load(f)
        # A backup written by Keras' own callback has no "weights" entry.
        weights = os.path.join(self.backup_dir, metadata.get("weights", "latest.weights.h5"))
        if not os.path.exists(weights):
            raise FileNotFoundError(
                f"The backup in {self.backup_dir} names {weights}, which is missing; "
                f"delete {self.backup_dir} to train from the start."
            )
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        if "seed_generators" in metadata:
            _set_seed_states(self.model, metadata["seed_generators"], self.backup_dir)
        self.model._initial_epoch = int(metadata["epoch"])

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{self._current_epoch:06d}.weights.h5"
        final = os.path.join(self.backup_dir, name)
        partial = os.path.join(self.backup_dir, f"epoch-{self._current_epoch:06d}.partial.weights.h5")
        self.model.save_weights(partial, overwrite=True)
        fsync_path(partial)
        os.replace(partial, final)
        metadata = {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
            "weights": name,
            "seed_generators": _seed_states(self.model),
        }
        metadata_path = os.path.join(self.backup_dir, BACKUP_METADATA)
        with open(metadata_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(metadata_path + ".tmp", metadata_path)  # the commit
        fsync_path(self.backup_dir)
        for path in glob.glob(os.path.join(glob.escape(self.backup_dir), "*.weights.h5")):
            if os.path.basename(path) != name:
                os.remove(path)


# The name Keras gives every `SeedGenerator`'s state variable.
_SEED_STATE = "seed_generator_state"


def _seed_variables(model):
    """The state variables of `model`'s random generators, in the model's (structural) order.

    In `model.variables` but not in its weight files. Their paths carry
    process-wide name counters (`seed_generator_7/...`), so they are matched
    by position, which only the model's structure decides.
    """
    return [v for v in model.variables if v.name == _SEED_STATE]


def _seed_states(model):
    return [np.asarray(v.numpy()).tolist() for v in _seed_variables(model)]


def _set_seed_states(model, states, backup_dir):
    variables = _seed_variables(model)
    if len(states) != len(variables):
        raise ValueError(
            f"The backup in {backup_dir} is of another model: it holds {len(states)} random generator states, "
            f"the model has {len(variables)}; delete it to train from the start."
        )
    for variable, value in zip(variables, states):
        variable.assign(np.asarray(value, dtype=variable.dtype))
