"""A many-task model built and compiled from a `TrainConfig`: the one recipe the apps share."""

import contextlib

import keras

from mtl_keras.backbones import conv_backbone, vgg_filters
from mtl_keras.input_checks import check_fraction
from mtl_keras.model import MultiTaskModel
from mtl_keras.schedules import WarmupStableDecay


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


def learning_rate(config, steps_per_epoch=None):
    """Adam's learning rate of `config`: `config.lr`, or its schedule over `config.epochs`.

    `"cosine"`: linear warm-up from 0 over the first `config.warmup_fraction`
    of the run's steps, then cosine decay from `config.lr` to 0 at its last
    step. `"wsd"` (`mtl_keras.schedules.WarmupStableDecay`): the same
    warm-up, `config.lr` held, then linear decay to 0 over the last
    `config.decay_fraction` of the steps. Warm-up and decay as shares of the
    run keep a 3-epoch try from spending a third of it warming up.

    Args:
        config: a `TrainConfig`.
        steps_per_epoch: training steps per epoch; needed by schedules.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule not in ("cosine", "wsd"):
        raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; use 'constant', 'cosine' or 'wsd'.")
    if not steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(
            f"The {config.lr_schedule} learning-rate schedule spans the run, so it needs steps_per_epoch "
            f"(training steps per epoch); got {steps_per_epoch!r}."
        )
    total = int(config.epochs) * int(steps_per_epoch)
    share = "a share of the run's training steps."
    warmup = check_fraction("warmup_fraction", config.warmup_fraction, upper_open=True, meaning=share)
    warmup = min(int(round(warmup * total)), total - 1)
    if config.lr_schedule == "wsd":
        decay = check_fraction("decay_fraction", config.decay_fraction, meaning=share)
        decay = min(int(round(decay * total)), total - warmup)
        return WarmupStableDecay(config.lr, total_steps=total, warmup_steps=warmup, decay_steps=decay)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.lr, decay_steps=total - warmup,
        warmup_target=config.lr if warmup else None, warmup_steps=warmup,
    )


@contextlib.contextmanager
def dtype_policy(name):
    """Layers built inside take the Keras dtype policy `name` (e.g. `"mixed_bfloat16"`).

    The policy is stored with each layer, so the global policy is put back
    afterwards: models built later in the process are unaffected.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_model(config, tasks, input_shape, sigma=None, weighting=None, seed=None, name=None, tasks_per_step=1,
                steps_per_epoch=None):
    """A compiled `MultiTaskModel` (Adam at `learning_rate(config)`) on `build_backbone`'s trunk.

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
        steps_per_epoch: training steps per epoch, for a learning-rate
            schedule over the run (`learning_rate`).

    Returns:
        The compiled model.

    Example:

    >>> model = build_model(get_preset("default"), data.tasks, (32, 32, 1), steps_per_epoch=steps)
    >>> model.fit(data.train, epochs=1)
    """
    seed = config.seed if seed is None else seed
    with dtype_policy(config.precision):
        backbone = build_backbone(config, input_shape, len(tasks), sigma=sigma, seed=seed)
        model = MultiTaskModel(
            backbone, tasks, head_units=config.head_units, head_dropout=config.head_dropout,
            weighting=config.weighting if weighting is None else weighting, tasks_per_step=tasks_per_step,
            label_smoothing=config.label_smoothing, seed=seed, name=name,
        )
    model.compile(optimizer=make_optimizer(config, steps_per_epoch), jit_compile=config.jit_compile)
    return model


def make_optimizer(config, steps_per_epoch=None):
    """The optimizer `config.optimizer` names, at `learning_rate(config, steps_per_epoch)`."""
    from mtl_keras.fused_adam import FusedAdam
    from mtl_keras.lazy_adam import LazyAdam

    kinds = {"adam": FusedAdam, "lazy_adam": LazyAdam}
    return kinds[config.optimizer](learning_rate(config, steps_per_epoch))
