"""A many-task model built and compiled from a `TrainConfig`: the one recipe the apps share."""

import keras

from mtl_keras.backbones import conv_backbone, vgg_filters
from mtl_keras.model import MultiTaskModel


def build_backbone(config, input_shape, num_tasks, sigma=None, seed=None):
    """The routed VGG-style trunk of `config` (`sigma`, `seed` override the config's)."""
    return conv_backbone(
        tuple(input_shape), num_tasks,
        sigma=config.sigma if sigma is None else sigma,
        filters=vgg_filters(config.width, config.depth),
        routing_mode=config.routing_mode,
        seed=config.seed if seed is None else seed,
        batch_norm_momentum=config.bn_momentum,
    )


def backbone_builder(config, input_shape, num_tasks):
    """`build(sigma, seed, width=config.width)`: `build_backbone` of `config` for one trial of a search.

    The builder `mtl_keras.tuning.SigmaHyperModel` calls with each trial's
    sigma (and width, when widths are searched); everything else, batch-norm
    momentum included, is `config`'s.

    Example:

    >>> hypermodel = SigmaHyperModel(backbone_builder(config, (32, 32, 1), len(tasks)), tasks, widths=(16, 32))
    """
    def build(sigma, seed, width=config.width):
        return build_backbone(config.replace(width=width), input_shape, num_tasks, sigma=sigma, seed=seed)

    return build


def build_model(config, tasks, input_shape, sigma=None, weighting=None, seed=None, name=None, tasks_per_step=1):
    """A compiled `MultiTaskModel` (Adam at `config.lr`) on `build_backbone`'s trunk.

    Call it inside `strategy.scope()` to train under a distribution strategy.

    Args:
        config: a `mtl_keras.presets.TrainConfig`.
        tasks: the `TaskSet`.
        input_shape: one example's image shape, e.g. `(32, 32, 1)`.
        sigma: sharing ratio, overriding `config.sigma` (1 = hard sharing).
        weighting: a weighting name or `Weighting`, overriding `config.weighting`.
        seed: overrides `config.seed` (weights are seeded by the caller with
            `keras.utils.set_random_seed`; this seeds masks and task sampling).
        name: the model's name.
        tasks_per_step: tasks each example is routed through per step, on
            data labelled for several tasks (`MultiTaskModel`'s argument).

    Returns:
        The compiled model.

    Example:

    >>> model = build_model(get_preset("default"), data.tasks, (32, 32, 1))
    >>> model.fit(data.train, epochs=1)
    """
    seed = config.seed if seed is None else seed
    backbone = build_backbone(config, input_shape, len(tasks), sigma=sigma, seed=seed)
    model = MultiTaskModel(
        backbone, tasks, head_units=config.head_units, head_dropout=config.head_dropout,
        weighting=config.weighting if weighting is None else weighting, tasks_per_step=tasks_per_step,
        seed=seed, name=name,
    )
    model.compile(optimizer=keras.optimizers.Adam(config.lr), jit_compile=config.jit_compile)
    return model
