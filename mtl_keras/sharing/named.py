"""Selective Sharing by name, as the apps' `--sharing` flag and comparison configurations give it.

- `"predictions"`: the heads' predictions on a probe drawn from the
  validation data, grouped through the gate (`SelectiveSharing`'s
  `signal="predictions"`; docs/GROUPING.md: the signal that recovers
  planted families of real images).
- a grouping rule (`"similarity"`, `"variance"`, or one registered with
  `register_rule`): the authors' pipeline on the heads' estimator
  gradients (`signal="gram"`).

>>> sharing = selective_sharing("predictions", validation=data.validation, start_epoch=4)
>>> model.fit(data.train, validation_data=data.validation, epochs=16, callbacks=[sharing])
"""

from mtl_keras.sharing.callback import SelectiveSharing
from mtl_keras.sharing.grouping import available_rules
from mtl_keras.sharing.probe import DEFAULT_PROBE_SIZE, probe_inputs

PREDICTIONS = "predictions"


def sharing_names():
    """The names `selective_sharing` takes: `"predictions"` and every grouping rule."""
    return [PREDICTIONS, *available_rules()]


def selective_sharing(name, validation=None, probe_size=DEFAULT_PROBE_SIZE, seed=0, **kwargs):
    """A `SelectiveSharing` callback by name.

    Args:
        name: `"predictions"` or a grouping rule (`sharing_names()`).
        validation: for `"predictions"`: the batched `tf.data.Dataset` the
            probe is drawn from (examples the model does not train on).
        probe_size: for `"predictions"`: inputs in the probe.
        seed: seeds the probe's draw and the grouping.
        **kwargs: other `SelectiveSharing` arguments (`start_epoch`,
            `log_dir`, `backup_dir`, ...).

    Returns:
        The callback.

    Raises:
        ValueError: an unknown name, or `"predictions"` without `validation`.
    """
    if name == PREDICTIONS:
        if validation is None:
            raise ValueError("Selective Sharing 'predictions' compares the heads' predictions on validation "
                             "inputs: pass validation=<dataset> (the data given to fit's validation_data).")
        probe = probe_inputs(validation, size=probe_size, seed=seed)
        return SelectiveSharing(signal=PREDICTIONS, probe=probe, seed=seed, **kwargs)
    if name not in available_rules():
        raise ValueError(f"Unknown Selective Sharing {name!r}; use one of {sharing_names()}.")
    return SelectiveSharing(name, **{"signal": "gram", "seed": seed, **kwargs})
