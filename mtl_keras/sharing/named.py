"""Selective Sharing by name, as the apps' `--sharing` flag and comparison configurations give it.

- `"predictions"`: the heads' predictions on a probe drawn from the
  validation data, grouped through the gate (`SelectiveSharing`'s
  `signal="predictions"`; docs/GROUPING.md: the signal that recovers
  planted families of real images).
- a grouping rule (`"similarity"`, `"variance"`, or one registered with
  `register_rule`): the authors' pipeline on the heads' estimator
  gradients (`signal="gram"`).

>>> sharing = selective_sharing("predictions", validation=data.validation, train=data.train, start_epoch=4)
>>> model.fit(data.train, validation_data=data.validation, epochs=16, callbacks=[sharing])
"""

import inspect

import numpy as np

from mtl_keras.option_strings import parse_options
from mtl_keras.sharing.callback import SelectiveSharing
from mtl_keras.sharing.grouping import available_rules
from mtl_keras.sharing.probe import DEFAULT_PROBE_SIZE, probe_inputs

# Training inputs a merged task's output layer is refitted on (129 weights
# per output with a 128-unit estimator: a thousand rows determine them, with the ridge).
DEFAULT_REFIT_SIZE = 1024

PREDICTIONS = "predictions"


def sharing_names():
    """The names `selective_sharing` takes: `"predictions"` and every grouping rule."""
    return [PREDICTIONS, *available_rules()]


def selective_sharing(name, validation=None, probe_size=DEFAULT_PROBE_SIZE, seed=0, train=None,
                      refit_size=DEFAULT_REFIT_SIZE, **kwargs):
    """A `SelectiveSharing` callback by name.

    Args:
        name: `"predictions"` or a grouping rule (`sharing_names()`).
        validation: for `"predictions"`: the batched `tf.data.Dataset` the
            probe is drawn from (examples the model does not train on).
        probe_size: for `"predictions"`: inputs in the probe.
        seed: seeds the probe's draw and the grouping.
        train: the batched training `tf.data.Dataset`: when given, a merged
            task's output layer is refitted (`SelectiveSharing`'s
            `refit_inputs`) on `refit_size` training inputs instead of on
            the probe, which stays evidence only.
        refit_size: training inputs drawn for the refit.
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
    elif name not in available_rules():
        raise ValueError(f"Unknown Selective Sharing {name!r}; use one of {sharing_names()}.")
    if train is not None and kwargs.get("refit_outputs", True):
        kwargs.setdefault("refit_inputs", probe_inputs(train, size=refit_size, seed=seed))
    if name == PREDICTIONS:
        probe = probe_inputs(validation, size=probe_size, seed=seed)
        return SelectiveSharing(signal=PREDICTIONS, probe=probe, seed=seed, **kwargs)
    return SelectiveSharing(name, **{"signal": "gram", "seed": seed, **kwargs})


# Set by `selective_sharing` and the apps themselves, not by a user's options.
_NOT_OPTIONS = ("self", "rule", "signal", "probe", "refit_inputs", "start_epoch", "seed", "verbose", "log_dir",
                "plot_dir", "backup_dir")


def sharing_options(name, text):
    """`SelectiveSharing` arguments from an app's option string, checked before any training.

    Args:
        name: the sharing name they go with (`sharing_names()`).
        text: `"proposal=threshold:min_affinity=0.3"` (empty: none).

    Returns:
        The arguments as a dict.

    Raises:
        ValueError: a malformed option, an argument `SelectiveSharing` does
            not take (or that the app sets itself), or a value it refuses.
    """
    options = parse_options(text, f"--sharing-options {text}")
    allowed = [p for p in inspect.signature(SelectiveSharing).parameters if p not in _NOT_OPTIONS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"--sharing-options: {', '.join(map(repr, unknown))} is not an option of Selective "
                         f"Sharing here; use some of {allowed}.")
    if options:
        # The callback checks every value when it is made; a stand-in probe lets
        # it do so now, minutes before the real one is drawn.
        if name == PREDICTIONS:
            SelectiveSharing(signal=PREDICTIONS, probe=np.zeros((2, 1, 1, 1), "float32"), verbose=0, **options)
        else:
            SelectiveSharing(name, signal="gram", verbose=0, **options)
    return options
