"""Planted task families: a synthetic problem whose true task grouping is known.

There are `num_families` independent latent factors `z_k ~ N(0, 1)`. An input
is a random rotation of `[z_1, ..., z_K, nuisance]`, so every latent is spread
over all input features. Each task belongs to one family and its target is a
function of that family's latent alone:

    y_t = normalise(a_t * z_k + b_t * (z_k**2 - 1) / sqrt(2)) + noise * eps_t

with a random sign and scale `a_t`, a random curvature `b_t` and independent
noise `eps_t ~ N(0, 1)` (`noise` is the noise-to-signal ratio of standard
deviations). Tasks of a family are related (they need the same latent),
tasks of different families are not (their latents are independent), so a
grouping method should recover the families; `families` holds the answer.
For `kind="binary"` the target is `y_t > 0`.
"""

import dataclasses

import numpy as np

from mtl_keras.tasks import Task, TaskSet


@dataclasses.dataclass
class PlantedProblem:
    """A planted-families problem.

    Attributes:
        x: inputs `[N, input_dim]` float32.
        y: targets `[N, T]` float32, every task labelled on every example.
        families: family of each task `[T]` int.
        tasks: the `TaskSet` (regression or binary tasks named `f<k>_t<i>`).
        latents: the latent factors `[N, num_families]`.
    """

    x: np.ndarray
    y: np.ndarray
    families: np.ndarray
    tasks: TaskSet
    latents: np.ndarray

    def dataset(self, batch_size=64, shuffle=True, seed=0):
        """A `tf.data.Dataset` of `({"image": x}, y)` batches (several tasks per example)."""
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices(({"image": self.x}, self.y))
        if shuffle:
            ds = ds.shuffle(len(self.x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size)


def planted_families(
    num_families=5,
    family_size=4,
    num_examples=2048,
    input_dim=32,
    noise=0.5,
    kind="regression",
    shuffle_tasks=True,
    seed=0,
):
    """Generates a problem whose tasks come in known families.

    Args:
        num_families: number of independent latent factors (families).
        family_size: tasks per family (an int, or a list with one size per
            family).
        num_examples: number of examples.
        input_dim: input width (at least `num_families`); the rest of the
            input is nuisance noise.
        noise: standard deviation of each target's noise relative to its
            (unit-variance) signal.
        kind: `"regression"` or `"binary"`.
        shuffle_tasks: shuffle the task order so that families are not
            contiguous task ids.
        seed: random seed.

    Returns:
        A `PlantedProblem`.

    Example:

    >>> problem = planted_families(num_families=3, family_size=4, seed=0)
    >>> problem.y.shape, problem.families[:5]
    ((2048, 12), array([2, 0, 1, 1, 0]))
    """
    sizes = [int(family_size)] * int(num_families) if np.isscalar(family_size) else [int(s) for s in family_size]
    if len(sizes) != num_families or min(sizes, default=0) < 1 or num_families < 1:
        raise ValueError(
            f"Need num_families >= 1 and family sizes >= 1 (one per family); got num_families="
            f"{num_families}, family_size={family_size!r}."
        )
    if input_dim < num_families:
        raise ValueError(f"input_dim ({input_dim}) must be >= num_families ({num_families}).")
    if kind not in ("regression", "binary"):
        raise ValueError(f"kind must be 'regression' or 'binary', got {kind!r}.")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}.")
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((num_examples, num_families))
    nuisance = rng.standard_normal((num_examples, input_dim - num_families))
    rotation, _ = np.linalg.qr(rng.standard_normal((input_dim, input_dim)))
    x = np.concatenate([latents, nuisance], axis=1) @ rotation

    families = np.repeat(np.arange(num_families), sizes)
    if shuffle_tasks:
        families = families[rng.permutation(len(families))]
    columns = []
    for k in families:
        z = latents[:, k]
        a = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5)
        b = rng.uniform(-0.5, 0.5)
        signal = a * z + b * (z**2 - 1) / np.sqrt(2)
        signal = (signal - signal.mean()) / signal.std()
        columns.append(signal + noise * rng.standard_normal(num_examples))
    y = np.stack(columns, axis=1)
    if kind == "binary":
        y = (y > 0).astype(np.float64)
    # Name tasks by position, not family: a method must not read the answer.
    tasks = TaskSet([Task(f"task{i:02d}", kind, 1) for i in range(len(families))])
    return PlantedProblem(
        x=x.astype("float32"), y=y.astype("float32"), families=families, tasks=tasks,
        latents=latents.astype("float32"),
    )


def planted_model(problem, hidden=(64, 32), head_units=(16,), seed=0, **kwargs):
    """A small dense `MultiTaskModel` for a `PlantedProblem` (trunk of `hidden` ReLU layers).

    Returns the uncompiled model; `kwargs` go to `MultiTaskModel`.
    """
    import keras

    from mtl_keras.model import MultiTaskModel

    inputs = keras.Input(shape=(problem.x.shape[1],), name="image")
    h = inputs
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(
            units, activation="relu", name=f"trunk_{i}",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
        )(h)
    backbone = keras.Model({"image": inputs}, h, name="planted_trunk")
    return MultiTaskModel(backbone, problem.tasks, head_units=head_units, seed=seed, **kwargs)


@dataclasses.dataclass
class PlantedLabels:
    """Binary tasks planted on labelled examples: families share one labelling rule.

    Attributes:
        y: `[N, T]` float32 labels (0/1), NaN where a task has no label.
        families: family (rule) of each task `[T]` int.
        rules: `[F, C]` 0/1, each rule's label of each class.
        tasks: the `TaskSet` (binary tasks named `task<i>`, in shuffled order).
        correlation: `[F, F]` label correlation of the rules over the examples.
    """

    y: np.ndarray
    families: np.ndarray
    rules: np.ndarray
    tasks: TaskSet
    correlation: np.ndarray


def _balanced_rule(num_classes, rng):
    rule = np.zeros(num_classes, dtype=int)
    rule[rng.permutation(num_classes)[: num_classes // 2]] = 1
    return rule


def _flip_balanced(rule, fraction, rng):
    """`rule` with `fraction` of its classes flipped, as many 1->0 as 0->1 (stays balanced)."""
    out = rule.copy()
    flips = int(round(fraction * len(rule) / 2))
    ones, zeros = np.flatnonzero(rule == 1), np.flatnonzero(rule == 0)
    out[rng.choice(ones, flips, replace=False)] = 0
    out[rng.choice(zeros, flips, replace=False)] = 1
    return out


def planted_label_families(classes, family_sizes, noise=0.1, correlation=0.0, label_fraction=1.0, seed=0):
    """Binary tasks in known families over examples with a class (e.g. a character of an image).

    Each family is a *labelling rule*: a balanced 0/1 label for every class.
    A task is its family's rule applied to each example's class, with its own
    independent label noise (each label flipped with probability `noise`)
    and, with `label_fraction < 1`, its own random subset of labelled
    examples (the others NaN). Tasks are shuffled, so their ids say nothing
    of their families. With `correlation > 0` the rules are not independent:
    each is a base rule with its own `(1 - sqrt(correlation)) / 2` of the
    classes flipped, so two rules agree on many examples (label correlation
    about `correlation`) while still being different rules. Families of size 1
    with `correlation=0` make a *null* problem (no two tasks related).

    Args:
        classes: `[N]` int class of each example, in `[0, C)`.
        family_sizes: tasks per family (a list, one per family).
        noise: probability of flipping each label, per task independently.
        correlation: target label correlation between rules, in [0, 1).
        label_fraction: share of examples each task has a label for.
        seed: random seed.

    Returns:
        A `PlantedLabels`.

    Example:

    >>> planted = planted_label_families(arrays.characters, [6, 3, 2, 1], noise=0.1)
    >>> planted.y.shape, planted.families
    ((2000, 12), array([0, 2, 0, 1, ...]))
    """
    classes = np.asarray(classes, dtype=int)
    sizes = [int(s) for s in family_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"family_sizes must be a non-empty list of positive ints; got {family_sizes!r}.")
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise is a flip probability in [0, 0.5); got {noise!r}.")
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1); got {correlation!r}.")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1]; got {label_fraction!r}.")
    num_classes = int(classes.max()) + 1
    if num_classes < 4:
        raise ValueError(f"Need at least 4 classes to plant balanced rules; got {num_classes}.")
    rng = np.random.default_rng(seed)
    if correlation > 0:
        base = _balanced_rule(num_classes, rng)
        flip = (1.0 - np.sqrt(correlation)) / 2.0
        rules = np.stack([_flip_balanced(base, flip, rng) for _ in sizes])
    else:
        rules = np.stack([_balanced_rule(num_classes, rng) for _ in sizes])
    families = np.repeat(np.arange(len(sizes)), sizes)
    families = families[rng.permutation(len(families))]
    clean = rules[:, classes]  # [F, N]
    y = np.empty((len(classes), len(families)), dtype=np.float32)
    for t, f in enumerate(families):
        labels = np.where(rng.random(len(classes)) < noise, 1 - clean[f], clean[f]).astype(np.float32)
        if label_fraction < 1.0:
            labels[rng.random(len(classes)) >= label_fraction] = np.nan
        y[:, t] = labels
    corr = np.corrcoef(clean) if len(sizes) > 1 else np.ones((1, 1))
    tasks = TaskSet([Task(f"task{i:02d}", "binary", 1) for i in range(len(families))])
    return PlantedLabels(y=y, families=families, rules=rules, tasks=tasks, correlation=np.nan_to_num(corr))
