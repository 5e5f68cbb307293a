"""The report of one training run: its settings, per-task test results and where its files went.

`training_report` is the dict an app writes as `report.json`; `task_table`
prints its per-task part. Keys are stable: docs and tests read them.

Example:

>>> report = training_report("train", config, model, model.evaluate(test, return_dict=True),
...                          history, strategy=strategy, parameters_at_start=n)
>>> print(task_table(report, model.tasks))
"""

from mtl_keras.reporting import per_task, text_table


def chance_accuracy(tasks):
    """`{task name: accuracy of a uniform guess}` of the classification tasks."""
    # A binary task has one logit but two classes.
    return {t.name: 1.0 / max(t.num_outputs, 2) for t in tasks if t.kind in ("multiclass", "binary")}


def training_report(app, config, model, test_logs, history, *, strategy, parameters_at_start, sharing=None,
                    num_examples=None, train_seconds=None, wall_seconds=None, export_path=None, model_path=None):
    """The results of a trained model and the settings that made it, as one JSON-friendly dict.

    Args:
        app: the app's name (`"app"` key).
        config: the run's `mtl_keras.presets.TrainConfig`.
        model: the trained `MultiTaskModel` (after any Selective Sharing merge).
        test_logs: `model.evaluate(test, return_dict=True)`.
        history: `model.fit`'s `History` (its last `val_mean_accuracy`).
        strategy: the `tf.distribute` strategy it trained under.
        parameters_at_start: the parameter count before training (merges drop heads).
        sharing: `SelectiveSharing.report()`, or None without sharing.
        num_examples, train_seconds, wall_seconds, export_path, model_path:
            recorded as given (seconds rounded to 0.1).

    Returns:
        A dict whose `test_accuracy` and `chance_accuracy` are keyed by task name.
    """
    accuracy = per_task(test_logs, model.tasks, "accuracy")
    return {
        "app": app,
        "tasks": len(model.tasks),
        "sigma": config.sigma,
        "weighting": config.weighting,
        "sharing": sharing,
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "routing_mode": config.routing_mode,
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "width": config.width,
        "depth": config.depth,
        "parameters": model.count_params(),
        "parameters_at_start": parameters_at_start,
        "head_parameters": model.head_parameter_count(),
        "mean_test_accuracy": test_logs["mean_accuracy"],
        "test_loss": test_logs["loss"],
        "test_accuracy": accuracy,
        "chance_accuracy": chance_accuracy(model.tasks),
        "final_val_mean_accuracy": history.history.get("val_mean_accuracy", [None])[-1],
        "wall_time_seconds": None if wall_seconds is None else round(wall_seconds, 1),
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "num_examples": num_examples,
        "export_path": str(export_path) if export_path else None,
        "model_path": None if model_path is None else str(model_path),
        # Every setting, so a tool that reuses the run (apps/recipe_ablation.py)
        # can tell it from a run of another configuration.
        "config": config.to_dict(),
    }


def task_table(report, tasks, task_label="task"):
    """A terminal table of `report`'s per-task test accuracy beside chance, tasks sorted by name."""
    accuracy, chance = report["test_accuracy"], report["chance_accuracy"]
    rows = [[name, tasks[name].num_outputs, accuracy[name], chance[name]] for name in sorted(accuracy)]
    return text_table(rows, [task_label, "classes", "test acc", "chance"])
