"""A progress bar that stays readable with hundreds of per-task metrics."""

import keras


def summary_logs(logs):
    """The logs without per-task entries (keys of the form `<task>/<metric>`)."""
    return {k: v for k, v in (logs or {}).items() if "/" not in k}


class CompactProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar showing only the summary metrics.

    A many-task model logs `<task>/<metric>` for every task: 100 tasks make a
    progress line of several hundred numbers. This bar shows `loss`,
    `mean_<metric>` and their `val_` counterparts; the per-task values stay in
    the logs (History, TensorBoard, callbacks). Passing it in `callbacks`
    replaces the default bar.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[CompactProgbar()])
    """

    def _update_progbar(self, batch, logs=None):
        super()._update_progbar(batch, summary_logs(logs))

    def _finalize_progbar(self, logs):
        super()._finalize_progbar(summary_logs(logs))
