"""Loss weighting and gradient combination methods, selectable by name."""

from mtl_keras.weighting.base import (
    EqualWeighting,
    Weighting,
    available_weightings,
    get_weighting,
    register_weighting,
)
