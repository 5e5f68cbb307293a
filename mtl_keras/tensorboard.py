"""TensorBoard views of a many-task run: per-task curves, routing masks, the run's config.

`MultiTaskTensorBoard` is a Keras callback writing, next to (or instead of)
`keras.callbacks.TensorBoard`, into the same `train` / `validation` runs:

- **Scalars grouped by task**: `task/<name>/<metric>` for every task and
  metric the model logs (`<name>/accuracy`, `<name>/loss`, ...), so the tag
  filter `task/Latin/` shows one task, `task/.*/accuracy` one metric of all;
  run-level values as `overall/<key>` (`overall/loss`,
  `overall/mean_accuracy`, ...). Train and validation values of a tag share
  its chart (two runs).
- **Routing masks**: one image per `TaskRouting` layer, `routing/<layer>`,
  rows = tasks (in task-id order), columns = units, white = the task uses
  the unit, plus a markdown table of each layer's sharing.
- **Run summary**: the run's config (any flat dict: flags, data sizes) and
  the task list as markdown text (`run/config`), and at the end of training
  a table of every task's final metrics (`run/results`).

Under a multi-worker strategy only the chief writes.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.backbones import routing_layers
from mtl_keras.distribute import is_chief

# Largest side, in pixels, of a routing mask image: masks are small
# ([tasks, units]), so they are magnified with square cells up to this size.
_MAX_IMAGE_SIDE = 1024


def split_log_key(key, task_names):
    """Splits a log key into `(split, task or None, metric)`.

    Args:
        key: a Keras log key, e.g. `"val_Latin/accuracy"` or `"mean_loss"`.
        task_names: the model's task names.

    Returns:
        `("validation" | "train", task name or None, metric)`; for run-level
        keys the task is None and the metric is the key without `val_`.
    """
    split = "train"
    if key.startswith("val_"):
        split, key = "validation", key[len("val_"):]
    head, sep, metric = key.partition("/")
    if sep and head in task_names:
        return split, head, metric
    return split, None, key


def task_scalars(logs, task_names, prefix="task"):
    """Maps Keras logs to TensorBoard tags, per split.

    Returns:
        `{"train": {tag: value}, "validation": {tag: value}}` with tags
        `"<prefix>/<task>/<metric>"` and `"overall/<key>"`.
    """
    names = set(task_names)
    out = {"train": {}, "validation": {}}
    for key, value in (logs or {}).items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue  # e.g. a learning-rate schedule object
        split, task, metric = split_log_key(key, names)
        tag = f"{prefix}/{task}/{metric}" if task is not None else f"overall/{metric}"
        out[split][tag] = value
    return out


def mask_image(masks, max_side=_MAX_IMAGE_SIDE):
    """A `[1, H, W, 1]` float image of a `[tasks, units]` 0/1 mask, cells magnified.

    Each mask entry becomes a `k x k` square (`k` as large as fits in
    `max_side`, at least 1), so a 50 x 256 mask stays readable.
    """
    masks = np.asarray(masks, dtype=np.float32)
    if masks.ndim != 2:
        raise ValueError(f"A routing mask is [tasks, units]; got shape {masks.shape}.")
    scale = max(1, min(16, max_side // max(masks.shape)))
    image = np.kron(masks, np.ones((scale, scale), np.float32))
    return image[None, :, :, None]


def routing_markdown(model):
    """A markdown table of the routing layers of `model.backbone` (or `model`)."""
    layers = routing_layers(getattr(model, "backbone", model))
    if not layers:
        return "No TaskRouting layers: the trunk is fully shared (sigma = 1)."
    rows = [
        "| layer | units | sigma | mode | seed | units per task (mean) | used by every task |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        m = np.asarray(layer.masks)
        shared = int((m.sum(axis=0) == m.shape[0]).sum())
        rows.append(
            f"| {layer.name} | {m.shape[1]} | {layer.sigma:g} | {layer.mode} | {layer.seed} "
            f"| {m.sum(axis=1).mean():.1f} ({m.mean():.0%}) | {shared} |"
        )
    return "\n".join(rows)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def config_markdown(config=None, model=None):
    """Markdown text of a run: its config, its tasks, and the model's size.

    Args:
        config: a flat dict (e.g. `vars(args)`), or None.
        model: a `MultiTaskModel` (tasks, parameters), or None.
    """
    parts = []
    if config:
        lines = ["| setting | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in config.items()]
        parts.append("### Config\n\n" + "\n".join(lines))
    if model is not None and hasattr(model, "tasks"):
        lines = ["| id | task | kind | outputs | loss | weight |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {i} | {_cell(t.name)} | {t.kind} | {t.num_outputs} | {t.loss} | {t.weight:g} |"
            for i, t in enumerate(model.tasks)
        ]
        parts.append(f"### Tasks ({len(model.tasks)})\n\n" + "\n".join(lines))
        size = f"{model.count_params():,} parameters"
        if hasattr(model, "head_parameter_count"):
            size += f", of which {model.head_parameter_count():,} in the task heads"
        parts.append(f"### Model\n\n{size}.\n\n" + routing_markdown(model))
    return "\n\n".join(parts) or "(no configuration given)"


def results_markdown(logs, task_names):
    """A markdown table of each task's final train / validation metrics."""
    table = {}
    metrics = []
    for split, tags in task_scalars(logs, task_names).items():
        for tag, value in tags.items():
            _, task, metric = tag.split("/", 2) if tag.startswith("task/") else (None, None, None)
            if task is None:
                continue
            column = metric if split == "train" else f"val {metric}"
            if column not in metrics:
                metrics.append(column)
            table.setdefault(task, {})[column] = value
    if not table:
        return "(no per-task metrics were logged)"
    lines = ["| task | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name in task_names:
        if name in table:
            cells = [table[name].get(m, math.nan) for m in metrics]
            lines.append(f"| {_cell(name)} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)


def write_routing_masks(model, step=0, max_side=_MAX_IMAGE_SIDE):
    """Writes each TaskRouting layer's masks as an image to the default summary writer.

    Returns:
        The tags written.
    """
    tags = []
    for layer in routing_layers(getattr(model, "backbone", model)):
        masks = np.asarray(layer.masks)
        tag = f"routing/{layer.name}"
        tf.summary.image(
            tag,
            mask_image(masks, max_side),
            step=step,
            description=(
                f"{layer.name}: {masks.shape[0]} tasks (rows, task-id order) x {masks.shape[1]} units "
                f"(columns); white = the task uses the unit. sigma={layer.sigma:g}, mode={layer.mode}."
            ),
        )
        tags.append(tag)
    tf.summary.text("routing/summary", routing_markdown(model), step=step)
    return tags + ["routing/summary"]


class MultiTaskTensorBoard(keras.callbacks.Callback):
    """Writes per-task scalars, routing mask images and a run summary for TensorBoard.

    Args:
        log_dir: the run's TensorBoard directory (`train/` and
            `validation/` are created inside, as Keras' own callback does,
            so both callbacks can share it).
        config: a flat dict describing the run (e.g. `vars(args)`), written
            as markdown text at the start of training.
        tag_prefix: first component of the per-task tags
            (`"<prefix>/<task>/<metric>"`).
        masks: whether to write the routing mask images.
        update_freq: `"epoch"`, or an integer N to also write the train
            scalars every N batches (steps counted from the start of `fit`).

    Example:

    >>> tb = MultiTaskTensorBoard("runs/x/tensorboard", config=vars(args))
    >>> model.fit(train, validation_data=val, epochs=5, callbacks=[tb])
    >>> # tensorboard --logdir runs/x/tensorboard
    """

    def __init__(self, log_dir, config=None, tag_prefix="task", masks=True, update_freq="epoch"):
        super().__init__()
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq > 0):
            raise ValueError(f"update_freq must be 'epoch' or a positive int, got {update_freq!r}.")
        if not tag_prefix or "/" in tag_prefix:
            raise ValueError(f"tag_prefix must be a non-empty name without '/', got {tag_prefix!r}.")
        self.log_dir = str(log_dir)
        self.config = dict(config or {})
        self.tag_prefix = tag_prefix
        self.masks = masks
        self.update_freq = update_freq
        self._writers = {}
        self._step = 0
        self._enabled = True

    def _task_names(self):
        tasks = getattr(self.model, "tasks", None)
        return tuple(tasks.names) if tasks is not None else ()

    def _writer(self, split):
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self.log_dir, split))
        return self._writers[split]

    def _write_scalars(self, logs, step, splits=("train", "validation")):
        for split, tags in task_scalars(logs, self._task_names(), self.tag_prefix).items():
            if split not in splits or not tags:
                continue
            with self._writer(split).as_default():
                for tag, value in tags.items():
                    tf.summary.scalar(tag, value, step=step)

    def on_train_begin(self, logs=None):
        self._enabled = is_chief(self.model.distribute_strategy)
        if not self._enabled:
            return
        step = int(getattr(self.model, "_initial_epoch", 0) or 0)
        with self._writer("train").as_default():
            tf.summary.text("run/config", config_markdown(self.config, self.model), step=step)
            if self.masks:
                write_routing_masks(self.model, step=step)
        self._writer("train").flush()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._enabled and self.update_freq != "epoch" and self._step % self.update_freq == 0:
            batch_logs = {k: v for k, v in (logs or {}).items() if not k.startswith("val_")}
            with self._writer("train").as_default():
                for tag, value in task_scalars(batch_logs, self._task_names(), self.tag_prefix)["train"].items():
                    tf.summary.scalar(f"batch/{tag}", value, step=self._step)

    def on_epoch_end(self, epoch, logs=None):
        if not self._enabled:
            return
        self._write_scalars(logs, step=epoch)
        for writer in self._writers.values():
            writer.flush()
        self._last_logs = dict(logs or {})
        self._last_epoch = epoch

    def on_train_end(self, logs=None):
        if not self._enabled:
            return
        final = getattr(self, "_last_logs", None) or logs or {}
        with self._writer("train").as_default():
            tf.summary.text(
                "run/results", results_markdown(final, self._task_names()), step=getattr(self, "_last_epoch", 0)
            )
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
