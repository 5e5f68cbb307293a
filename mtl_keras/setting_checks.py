"""Checks of settings (numbers a user gives), free of TensorFlow so that flag parsing can use them.

`mtl_keras.input_checks` re-exports them beside the checks of batches.
"""

import math

import numpy as np


def check_fraction(name, value, upper_open=False, meaning=""):
    """Raises a ValueError unless `value` is a real number in [0, 1] (or [0, 1)).

    Strings and booleans are refused even though `float()` takes them: a
    flag or config value of the wrong type is a bug to report, not to coerce.

    Args:
        name: what the value is, as the user knows it (e.g. `"head_dropout"`).
        value: the value to check.
        upper_open: whether 1 itself is excluded.
        meaning: a sentence on what the ends of the range mean, appended.

    Returns:
        `value` as a float.
    """
    interval = "[0, 1)" if upper_open else "[0, 1]"
    number = None
    if not isinstance(value, (str, bytes, bool, np.bool_)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    ok = number is not None and math.isfinite(number) and 0.0 <= number and (
        number < 1.0 if upper_open else number <= 1.0
    )
    if not ok:
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}{': ' if meaning else '.'}{meaning}")
    return number


def check_sigma(sigma):
    """Raises a ValueError unless the sharing ratio `sigma` is a number in [0, 1]; returns it as a float."""
    return check_fraction(
        "sigma (the sharing ratio)", sigma,
        meaning="1 shares every unit between all tasks, 0 gives each task its own units.",
    )
