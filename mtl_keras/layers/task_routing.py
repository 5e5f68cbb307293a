"""TaskRouting: fixed per-task binary channel masks (Strezoski et al., ICCV 2019)."""

import secrets

import keras
import numpy as np
from keras import ops

from mtl_keras.input_checks import check_sigma

ROUTING_MODES = ("partition", "independent")


def routing_masks(num_units, num_tasks, sigma, seed, mode="partition"):
    """Draws the binary `[num_tasks, num_units]` routing masks.

    Two constructions, both fixed by `seed`:

    - `"partition"` (default): a random `round(sigma * num_units)` units are
      *shared* by every task; the other units are dealt out, in a random
      order, one task after another, so each belongs to exactly one task.
      A task therefore keeps `round(sigma * C)` shared units plus
      `floor` or `ceil` of `(C - round(sigma * C)) / T` units of its own,
      i.e. a fraction close to `sigma + (1 - sigma) / T`. `sigma = 1` is a
      fully shared layer; `sigma = 0` gives the tasks pairwise disjoint
      units (separate sub-networks), which needs `C >= T`.
    - `"independent"`: as in the authors' public code, each task on its own
      keeps a random `max(1, round(sigma * C))` units and drops the rest, so
      two tasks overlap in about `sigma**2 * C` units and some units may be
      used by no task. `sigma = 1` is fully shared.

    Args:
        num_units: channels of the routed layer (C).
        num_tasks: number of tasks (T).
        sigma: sharing ratio in `[0, 1]`.
        seed: integer seed; the same seed gives the same masks.
        mode: `"partition"` or `"independent"`.

    Returns:
        A float32 numpy array of 0s and 1s, shape `[num_tasks, num_units]`.
    """
    _check_sigma(sigma)
    if mode not in ROUTING_MODES:
        raise ValueError(f"Unknown routing mode {mode!r}; use one of {ROUTING_MODES}.")
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_tasks, num_units), dtype=np.float32)
    if mode == "independent":
        keep = max(1, int(round(sigma * num_units)))
        order = rng.random((num_tasks, num_units)).argsort(axis=1)[:, :keep]
        np.put_along_axis(masks, order, 1.0, axis=1)
        return masks
    n_shared = int(round(sigma * num_units))
    perm = rng.permutation(num_units)
    masks[:, perm[:n_shared]] = 1.0
    rest = perm[n_shared:]
    # A random first owner, so the tasks that get one unit more than the
    # others differ from layer to layer.
    owners = (np.arange(rest.size) + rng.integers(num_tasks)) % num_tasks
    masks[owners, rest] = 1.0
    empty = np.flatnonzero(masks.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"TaskRouting: a layer of {num_units} units cannot give each of {num_tasks} "
            f"tasks a unit at sigma={sigma} ({empty.size} tasks would get none). "
            f"Use at least {num_tasks} units in that layer, or sigma >= {1.0 / num_units:.3g} "
            "so that every task keeps at least one shared unit."
        )
    return masks


def _check_sigma(sigma):
    check_sigma(sigma)


@keras.saving.register_keras_serializable(package="mtl_keras")
class TaskRouting(keras.layers.Layer):
    """Multiplies the channels of its input by a fixed binary mask per task.

    The masks are drawn once, when the layer is built, from the sharing
    ratio `sigma` (see `routing_masks` for the exact construction), and stored
    as a non-trainable weight of shape `[num_tasks, channels]`: they never
    change in training, and saving, loading, KerasTuner reloads and
    SavedModel export all keep exactly the same routing. Each example carries
    its own task id, so one batch can mix tasks. The mask multiplies both the
    forward activation and, by the chain rule, the gradient: a unit a task
    does not own receives no gradient from that task's loss.

    Args:
        num_tasks: number of tasks T.
        sigma: sharing ratio in `[0, 1]`; 1 is a fully shared layer, 0 gives
            every task its own disjoint units.
        seed: integer seed of the masks. When None, a random seed is drawn
            now and recorded in the config, so a model rebuilt from its
            config routes exactly as the original.
        mode: `"partition"` (default) or `"independent"`, see
            `routing_masks`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: features with channels last, any rank >= 2
            (`[batch, channels]` or `[batch, height, width, channels]`).
        task_ids: integer tensor `[batch]`, the task of each example.

    Returns:
        `inputs` with each example's channels masked by its task's mask.

    Example:

    >>> routing = TaskRouting(num_tasks=3, sigma=0.5, seed=1)
    >>> x = np.ones((2, 8, 8, 16), "float32")
    >>> y = routing(x, np.array([0, 2]))
    >>> routing.masks.shape
    (3, 16)
    """

    def __init__(self, num_tasks, sigma, seed=None, mode="partition", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
        _check_sigma(sigma)
        if mode not in ROUTING_MODES:
            raise ValueError(f"Unknown routing mode {mode!r}; use one of {ROUTING_MODES}.")
        self.num_tasks = num_tasks
        self.sigma = float(sigma)
        self.seed = int(secrets.randbelow(2**31)) if seed is None else int(seed)
        self.mode = mode
        self.supports_masking = True

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("TaskRouting needs a known channel (last) dimension.")
        masks = routing_masks(channels, self.num_tasks, self.sigma, self.seed, self.mode)
        self.mask_weight = self.add_weight(
            name="routing_masks",
            shape=(self.num_tasks, channels),
            initializer=keras.initializers.Constant(masks),
            trainable=False,
            dtype="float32",
        )
        self.built = True

    @property
    def masks(self):
        """The `[num_tasks, channels]` masks as a numpy array."""
        return keras.ops.convert_to_numpy(self.mask_weight)

    def call(self, inputs, task_ids):
        task_ids = ops.cast(ops.reshape(task_ids, (-1,)), "int32")
        mask = ops.take(ops.cast(self.mask_weight, inputs.dtype), task_ids, axis=0)
        broadcast = (-1,) + (1,) * (len(inputs.shape) - 2) + (mask.shape[-1],)
        return inputs * ops.reshape(mask, broadcast)

    def compute_output_shape(self, inputs_shape, task_ids_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tasks=self.num_tasks, sigma=self.sigma, seed=self.seed, mode=self.mode
        )
        return config
