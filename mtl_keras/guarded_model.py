"""GuardedModel: the `fit` / `evaluate` / `predict` defaults that refuse runs which cannot succeed.

`MultiTaskModel` derives from it, so every app and library user gets, with
no extra argument:

- `StopOnNonFiniteLoss` and `RequireData` (see `mtl_keras.callbacks`) in
  `fit` and `evaluate`, ahead of the caller's callbacks;
- under `jit_compile=True`, the batch checks that XLA would drop from the
  step (`mtl_keras.input_checks`) run in the data path instead: mapped over
  a `tf.data.Dataset`, or once over in-memory arrays. Other inputs
  (generators, `PyDataset`, distributed datasets) are not checked under XLA.

Kept apart from `model.py` so that the step stays about training.
"""

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.callbacks import RequireData, StopOnNonFiniteLoss
from mtl_keras.input_checks import checked_batch


def _in_memory(x):
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(isinstance(v, (np.ndarray, tf.Tensor, np.generic, int, float)) for v in leaves)


class GuardedModel(keras.Model):
    """A `keras.Model` whose `fit` and `evaluate` stop on non-finite losses and on missing data.

    Subclasses provide `table` and `backbone_input_names` (as
    `MultiTaskModel` does) for `check_batch`.

    Attributes:
        stop_on_non_finite_loss: set False on a model (or pass your own
            `StopOnNonFiniteLoss`) to train on through NaN losses.
    """

    stop_on_non_finite_loss = True

    def batch_checks_in_step(self, check=None):
        """Whether the step checks each batch: unless told, always except under XLA (which ignores assertions)."""
        if check is not None:
            return bool(check)
        return tf.executing_eagerly() or not self.jit_compile

    def _checks_in_data_path(self):
        return bool(self.jit_compile) and not self.run_eagerly

    def check_batch(self, x, y=None, sample_weight=None):
        """`(x, y, sample_weight)`, refused unless valid (`mtl_keras.input_checks.checked_batch`).

        Uses the subclass's `table` (a `TaskTable`) and `backbone_input_names`.
        """
        return checked_batch(x, y, sample_weight, self.table, self.backbone_input_names)

    def _checked_data(self, x, y=None, sample_weight=None):
        """`x` with the batch checks in its data path (XLA only; the step checks otherwise)."""
        if not self._checks_in_data_path() or x is None:
            return x
        if isinstance(x, tf.data.Dataset):
            def check(*element):
                if len(element) == 1:
                    return self.check_batch(element[0])[0]
                return self.check_batch(*element)[: len(element)]

            return x.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if _in_memory(x):
            self.check_batch(x, y, sample_weight)
        return x

    def _guards(self, callbacks):
        if isinstance(callbacks, keras.callbacks.CallbackList):
            return callbacks  # evaluate() inside fit(): the guards are in fit's list already
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else ([callbacks] if callbacks else [])
        guards = [RequireData()]
        if self.stop_on_non_finite_loss:
            guards.append(StopOnNonFiniteLoss())
        # First, so that a failed step is refused before a later callback (a backup) records it.
        return [g for g in guards if not any(isinstance(c, type(g)) for c in callbacks)] + callbacks

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_split=0.0, validation_data=None, *args, **kwargs):
        x = self._checked_data(x, y, kwargs.get("sample_weight"))
        if isinstance(validation_data, tf.data.Dataset):
            validation_data = self._checked_data(validation_data)
        elif isinstance(validation_data, (list, tuple)):
            self._checked_data(*validation_data)
        return super().fit(x, y, batch_size, epochs, verbose, self._guards(callbacks), validation_split,
                           validation_data, *args, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None,
                 callbacks=None, return_dict=False, **kwargs):
        if not kwargs.get("_use_cached_eval_dataset"):
            x = self._checked_data(x, y, sample_weight)
        return super().evaluate(
            x=x, y=y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight, steps=steps,
            callbacks=self._guards(callbacks), return_dict=return_dict, **kwargs,
        )

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        return super().predict(self._checked_data(x), batch_size=batch_size, verbose=verbose, steps=steps,
                               callbacks=callbacks)
