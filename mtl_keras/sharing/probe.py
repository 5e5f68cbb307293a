"""The probe of the predictions signal: inputs every task head predicts on.

`SelectiveSharing(signal="predictions", probe=...)` compares the heads by
what they predict on one shared set of inputs. The probe should be
examples the model does not train on (a validation split), drawn across
the whole split: a split stored task by task would otherwise give a probe
of the first few tasks' inputs only.

>>> probe = probe_inputs(data.validation, size=512, seed=0)
>>> sharing = SelectiveSharing(signal="predictions", probe=probe)
"""

import numpy as np
import tensorflow as tf

# The predictions signal's probe size: docs/GROUPING.md's benchmarks used 512.
DEFAULT_PROBE_SIZE = 512
# Most examples read from the dataset before the probe is drawn from them.
MAX_READ = 50_000


def probe_inputs(dataset, size=DEFAULT_PROBE_SIZE, seed=0, batched=True, max_read=MAX_READ):
    """`size` inputs drawn without replacement from `dataset`, as a probe for `SelectiveSharing`.

    Reads up to `max_read` examples, then keeps a seeded random `size` of
    them (all of them when there are fewer), in their order in `dataset`.
    The same dataset and seed give the same probe, so a resumed run groups
    on the same evidence as an uninterrupted one.

    Args:
        dataset: a `tf.data.Dataset` of `(inputs, labels[, weights])` or of
            inputs, where inputs are an image tensor or a dict holding
            `"image"` (a `"task"` entry is dropped: every head predicts on
            every probe input).
        size: how many inputs the probe holds.
        seed: which inputs are drawn.
        batched: whether `dataset`'s elements are batches (as `fit` takes
            them) or single examples.
        max_read: most examples read.

    Returns:
        `{"image": np.ndarray}` of at most `size` inputs.

    Raises:
        ValueError: `size` < 1, or `dataset` is empty or holds no images.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"The probe size must be a positive int (number of inputs); got {size!r}.")
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(f"probe_inputs reads a tf.data.Dataset; got {type(dataset).__name__}.")
    chunks, read = [], 0
    for element in dataset.as_numpy_iterator():
        image = _image_of(element)
        if not batched:
            image = image[None]
        chunks.append(image[: max_read - read])
        read += len(chunks[-1])
        if read >= max_read:
            break
    if read == 0:
        raise ValueError("The probe's dataset is empty: give SelectiveSharing's probe a split with examples "
                         "(e.g. the validation data).")
    images = np.concatenate(chunks)
    if len(images) > size:
        rows = np.sort(np.random.default_rng(seed).choice(len(images), size, replace=False))
        images = images[rows]
    return {"image": images}


def _image_of(element):
    inputs = element[0] if isinstance(element, tuple) else element
    if isinstance(inputs, dict):
        if "image" not in inputs:
            raise ValueError(f"The probe's dataset gives inputs {sorted(inputs)} without an 'image' entry; "
                             "its elements must be images or dicts holding 'image'.")
        inputs = inputs["image"]
    return np.asarray(inputs)
