"""Callbacks that stop a run which can no longer succeed, with an error that says why.

`MultiTaskModel.fit` and `evaluate` add both (see `mtl_keras.guarded_model`);
they are public so that a custom training loop or another model can use them.
"""

import math

import keras
import numpy as np

from mtl_keras.input_checks import empty_data_message


class NonFiniteLossError(RuntimeError):
    """A loss went NaN or infinite; `tasks` names the tasks whose loss did (empty: only the total)."""

    def __init__(self, message, tasks=(), epoch=None, batch=None):
        super().__init__(message)
        self.tasks = list(tasks)
        self.epoch = epoch
        self.batch = batch


class EmptyDataError(ValueError):
    """`fit` or `evaluate` got no batch at all, so nothing was trained or measured."""


def _non_finite(logs, suffix="loss"):
    """Keys of `logs` ending in `suffix` whose value is NaN or infinite."""
    bad = []
    for key, value in (logs or {}).items():
        if not key.endswith(suffix):
            continue
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            continue
        if not finite:
            bad.append(key)
    return bad


def _task_names(model, keys, prefix=""):
    names = list(getattr(getattr(model, "tasks", None), "names", []))
    per_task = [k[len(prefix):-len("/loss")] for k in keys if k.startswith(prefix) and k.endswith("/loss")]
    return [n for n in names if n in per_task] or per_task


def non_finite_weights(weights):
    """Paths of the `weights` (Keras variables, e.g. a model's `.weights`) that hold a NaN or an infinity, in order."""
    return [w.path for w in weights if not np.isfinite(keras.ops.convert_to_numpy(w.value)).all()]


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss, or weight, and names the tasks or weights.

    Reads the per-task losses (`<task>/loss`) and the total (`loss`) that
    `MultiTaskModel` logs after every step; they are running means over the
    epoch, so a non-finite step loss stays visible in every later log of the
    epoch. Raises `NonFiniteLossError` from the first step whose loss is not
    finite, before any later callback of that step (a `BackupAndRestore`
    keeps its last good epoch), and at the end of `evaluate` (or a
    validation pass) whose loss is not finite, so a broken model is never
    reported as trained.

    A loss can stay finite while weights are not: a max pool passes the
    finite value of a window that also holds a NaN, and a batch norm's
    moving statistics never reach a training loss. So every epoch's end also
    scans the model's weights (one pass over them, before the epoch's other
    callbacks) and raises `NonFiniteLossError` naming the weights.

    Costs a scan of the step's logs, which Keras' TensorFlow trainer turns
    into Python floats for its callbacks after every step anyway (it never
    dispatches callbacks asynchronously).
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0
        self._training = False

    def on_train_begin(self, logs=None):
        self._training = True

    def on_train_end(self, logs=None):
        self._training = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        bad = _non_finite(logs)
        if not bad:
            return
        tasks = _task_names(self.model, bad)
        where = f"in epoch {self._epoch + 1}, step {batch + 1}"
        if tasks:
            what = f"The training loss of task(s) {', '.join(repr(t) for t in tasks)} went NaN or infinite {where}"
        else:
            what = (f"The total training loss went NaN or infinite {where}, while every task's loss stayed "
                    "finite (the regularization or the loss weighting overflowed)")
        raise NonFiniteLossError(
            f"{what}; training stopped and the model (whose weights may now be NaN) must not be used or exported. "
            "Lower the learning rate (--lr in the apps), look for extreme labels or inputs of those tasks, or clip "
            "gradients (an optimizer with clipnorm).",
            tasks=tasks, epoch=self._epoch, batch=batch,
        )

    def on_epoch_end(self, epoch, logs=None):
        self._check_weights(epoch)
        self._check_evaluation(logs, "val_", "validation")

    def _check_weights(self, epoch):
        bad = non_finite_weights(self.model.weights)
        if not bad:
            return
        shown = ", ".join(repr(p) for p in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteLossError(
            f"The weight(s) {shown} went NaN or infinite in epoch {epoch + 1}, while every training loss logged "
            "stayed finite (a max pool or a ReLU can hide a NaN from the loss, and moving statistics never reach "
            "it); training stopped and the model must not be used or exported. Lower the learning rate (--lr in "
            "the apps), look for extreme labels or inputs, or clip gradients (an optimizer with clipnorm).",
            epoch=epoch,
        )

    def on_test_end(self, logs=None):
        if not self._training:
            self._check_evaluation(logs, "", "evaluation")

    def _check_evaluation(self, logs, prefix, what):
        bad = [k for k in _non_finite(logs) if k.startswith(prefix)]
        if not bad:
            return
        tasks = _task_names(self.model, bad, prefix)
        named = f"of task(s) {', '.join(repr(t) for t in tasks)} " if tasks else ""
        raise NonFiniteLossError(
            f"The {what} loss {named}is NaN or infinite: the model's outputs overflow on that data (or it "
            "holds extreme labels), so its results must not be reported. Check those tasks' data, or retrain "
            "with a lower learning rate.",
            tasks=tasks, epoch=self._epoch if self._training else None,
        )


class RequireData(keras.callbacks.Callback):
    """Refuses a `fit` epoch or an `evaluate` that saw no batch (Keras returns empty logs and goes on).

    Training on nothing would leave an untrained model looking trained; the
    usual cause is a training set smaller than one global batch under a
    distribution strategy, whose only (short) batch `prepare_for_replicas`
    drops. Raises `EmptyDataError` with the cause and the fix.
    """

    def __init__(self):
        super().__init__()
        self._training = False

    def on_train_begin(self, logs=None):
        self._training = True

    def on_train_end(self, logs=None):
        self._training = False

    def on_epoch_end(self, epoch, logs=None):
        # A training step leaves "loss" in the epoch's logs; validation adds only "val_" keys.
        if not any(not k.startswith("val_") for k in (logs or {})):
            raise EmptyDataError(empty_data_message(f"fit() (epoch {epoch + 1})", self._replicas()))

    def on_test_end(self, logs=None):
        if not logs:
            what = "The validation pass of fit()" if self._training else "evaluate()"
            raise EmptyDataError(empty_data_message(what, self._replicas(), training=False))

    def _replicas(self):
        strategy = getattr(self.model, "distribute_strategy", None)
        return getattr(strategy, "num_replicas_in_sync", 1)
