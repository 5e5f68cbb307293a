"""Random affine augmentation of image batches in a `tf.data` pipeline, reproducible across restarts.

Each training image gets its own small random shift, rotation and scaling,
applied as *one* affine resampling (composing three Keras preprocessing
layers would interpolate, and so blur, three times). The randomness is
stateless: every batch draws from a seed that `tf.data.Dataset.random`
derives from `seed` and the pass over the data, so

- every epoch sees new transformations (like a reshuffling `shuffle`);
- the `e`-th pass over the data gets the same transformations whether the
  process trained epochs `0..e-1` itself or a killed run was resumed by
  skipping them (`mtl_keras.distribute.epoch_stream`): no random state lives
  outside the pipeline, where a checkpoint would have to save it.

Example:

>>> augment = RandomAffine(shift=0.1, rotation=10, scale=0.1)
>>> train = augment.apply_to(train, seed=0)  # ({"image": [B, H, W, C], ...}, y) batches
"""

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class RandomAffine:
    """Random shift, rotation and scaling of each image, one resampling.

    Args:
        shift: largest translation, as a fraction of the image's height and
            width (each axis drawn uniformly in `[-shift, shift]`).
        rotation: largest rotation in degrees (uniform in `[-rotation, rotation]`).
        scale: largest relative change of size (uniform in `[1 - scale, 1 + scale]`).
        fill_value: value of pixels that come from outside the image (0: the
            background of images whose strokes are bright on dark).
        interpolation: `"bilinear"` or `"nearest"`.

    All zero: the identity (`enabled` is False and `apply_to` returns the
    dataset unchanged).
    """

    shift: float = 0.0
    rotation: float = 0.0
    scale: float = 0.0
    fill_value: float = 0.0
    interpolation: str = "bilinear"

    def __post_init__(self):
        for name, value, upper in (("shift", self.shift, 0.5), ("rotation", self.rotation, 180.0),
                                   ("scale", self.scale, 1.0)):
            if not isinstance(value, (int, float)) or not 0.0 <= value < upper:
                raise ValueError(
                    f"RandomAffine {name} must be a number in [0, {upper}) (0 turns it off); got {value!r}."
                )
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest'; got {self.interpolation!r}.")

    @property
    def enabled(self):
        return bool(self.shift or self.rotation or self.scale)

    def transforms(self, batch, height, width, seed):
        """`[batch, 8]` projective transforms (output pixel -> input pixel), as `ImageProjectiveTransformV3` takes.

        Args:
            batch, height, width: the batch's shape (scalars or tensors).
            seed: a stateless seed, int `[2]`.
        """
        seeds = tf.random.experimental.stateless_split(seed, 4)
        height = tf.cast(height, tf.float32)
        width = tf.cast(width, tf.float32)

        def uniform(i, bound):
            return tf.random.stateless_uniform([batch], seeds[i], -bound, bound)

        angle = uniform(0, self.rotation * math.pi / 180.0)
        zoom = 1.0 + uniform(1, self.scale)
        dx = uniform(2, self.shift) * width
        dy = uniform(3, self.shift) * height
        # Rotate and scale about the image centre, then shift. The matrix maps
        # *output* coordinates to the input's, so it is the inverse transform.
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
        a0, a1 = cos, sin
        b0, b1 = -sin, cos
        ox, oy = cx + dx, cy + dy  # where the input's centre lands
        a2 = cx - a0 * ox - a1 * oy
        b2 = cy - b0 * ox - b1 * oy
        zeros = tf.zeros_like(a0)
        return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)

    def __call__(self, images, seed):
        """Transforms a batch `[B, H, W, C]` with stateless seed `seed` (int `[2]`)."""
        if not self.enabled:
            return images
        images = tf.convert_to_tensor(images)
        shape = tf.shape(images)
        transforms = self.transforms(shape[0], shape[1], shape[2], seed)
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=shape[1:3],
            fill_value=tf.cast(self.fill_value, images.dtype), interpolation=self.interpolation.upper(),
            fill_mode="CONSTANT",
        )
        return tf.ensure_shape(out, images.shape)

    def apply_to(self, dataset, seed=0, key="image"):
        """`dataset` with every batch's `x[key]` transformed, new transformations each pass.

        Args:
            dataset: batched `(x, y)` or `(x, y, sample_weight)` elements,
                `x` a dict holding `key` (or the image tensor itself).
            seed: seeds the transformations of every pass.
            key: the image entry of `x`.

        Returns:
            The dataset (unchanged when the augmentation is the identity).
        """
        if not self.enabled:
            return dataset
        # rerandomize_each_iteration: a new stream of seeds for each pass
        # (each `repeat()`), the same streams for the same `seed`.
        seeds = tf.data.Dataset.random(seed=int(seed), rerandomize_each_iteration=True).batch(2)

        def transform(element, batch_seed):
            x, *rest = element
            if isinstance(x, dict):
                x = dict(x)
                x[key] = self(x[key], batch_seed)
            else:
                x = self(x, batch_seed)
            return (x, *rest)

        return tf.data.Dataset.zip((dataset, seeds)).map(
            transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def get_config(self):
        return dataclasses.asdict(self)
