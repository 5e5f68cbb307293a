"""Named training configurations: the one source of every default the apps use.

A `TrainConfig` holds what a run of a many-task model on an image task set
needs (data, model, training). `PRESETS` names the configurations the apps
start from, in the spirit of keras-hub's `from_preset`: an app picks its
preset, `add_config_arguments` turns the preset's fields into command-line
flags whose defaults are the preset's values, and `config_from_args` gives the
`TrainConfig` back. A default changes in one place, here.

Example:

>>> parser = argparse.ArgumentParser()
>>> add_config_arguments(parser, preset="default")
>>> config = config_from_args(parser.parse_args(["--epochs", "3"]))
>>> config.epochs, config.sigma
(3, 1.0)
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from mtl_keras.setting_checks import check_fraction, check_sigma

ROUTING_MODES = ("partition", "independent")
LR_SCHEDULES = ("constant", "cosine", "wsd")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
# Keras dtype policies a model can train in (keras.mixed_precision).
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# adam: mtl_keras.fused_adam.FusedAdam (Keras' Adam, dense updates fused); lazy_adam: mtl_keras.lazy_adam.LazyAdam.
OPTIMIZERS = ("adam", "lazy_adam")


def _option(default, help, group, choices=None, positive=False, nonnegative=False, fraction=None, check=None):
    # fraction: "closed" for a value in [0, 1], "open" for [0, 1) (refused at parse time);
    # check: the field's own check of a fraction (its wording), instead of check_fraction's.
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "positive": positive,
                                            "nonnegative": nonnegative, "fraction": fraction, "check": check})


def _weightings():
    # Imported when flags are made: the weighting registry needs TensorFlow.
    from mtl_keras.weighting import available_weightings

    return tuple(available_weightings())


def _sharing_names():
    # "none", then the names mtl_keras.sharing.selective_sharing takes
    # ("predictions" and the grouping rules); imported when flags are made,
    # as the sharing package needs TensorFlow.
    from mtl_keras.sharing import sharing_names

    return ("none", *sharing_names())


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run of the apps depends on.

    Every field is a flag of the apps that expose its group (`--image-size`
    for `image_size`, ...). The values below are the `"default"` preset, the
    recipe of the README's first command.
    """

    # data (which files hold the data is the data module's business: e.g.
    # mtl_keras.data.omniglot_flags)
    tasks: typing.Optional[int] = _option(None, "use the first K tasks (default: all)", "data", positive=True)
    image_size: int = _option(32, "images are resized to this square size", "data", positive=True)
    augment_shift: float = _option(0.0, "training augmentation: largest random shift, as a fraction of the "
                                   "image size (0: none)", "data", nonnegative=True)
    augment_rotation: float = _option(0.0, "training augmentation: largest random rotation in degrees (0: none)",
                                      "data", nonnegative=True)
    augment_scale: float = _option(0.0, "training augmentation: largest random change of size, relative "
                                   "(0: none)", "data", nonnegative=True)
    # model
    # 1 (hard sharing) since v0.2: at this recipe it beat Task Routing at 0.5
    # and 0.75 on both seeds (docs/RESULTS.md); routing is one flag away.
    sigma: float = _option(1.0, "sharing ratio: 1 = fully shared (hard sharing), below 1 = Task Routing "
                           "(0 = a sub-network per task)", "model",
                           fraction="closed", check=check_sigma)
    routing_mode: str = _option("partition", "how routing masks are drawn from sigma", "model", ROUTING_MODES)
    width: int = _option(32, "filters of the first conv block (doubled per block)", "model", positive=True)
    depth: int = _option(4, "number of conv blocks", "model", positive=True)
    head_units: typing.Tuple[int, ...] = _option((), "estimator widths of each task head (none: each head is "
                                                 "one output layer; Selective Sharing needs an estimator, "
                                                 "e.g. --head-units 128)", "model")
    head_dropout: float = _option(0.0, "dropout after each head estimator layer", "model", fraction="open")
    bn_momentum: float = _option(0.99, "batch-norm momentum of the moving statistics", "model")
    weighting: str = _option("equal", "loss weighting / gradient method (mtl_keras.weighting)", "model", _weightings)
    sharing: str = _option("none", "Selective Sharing that merges task heads' estimators during training: "
                           "predictions (heads compared on validation inputs, merged only past the gate) or "
                           "the authors' gradient rules similarity, variance",
                           "model", _sharing_names)
    sharing_epoch: int = _option(2, "epoch at whose end the heads are grouped and merged", "model")
    sharing_options: str = _option("", "more Selective Sharing arguments as name=value[:name=value...], e.g. "
                                   "proposal=threshold:min_affinity=0.3 (mtl_keras.sharing.SelectiveSharing)",
                                   "model")
    # training
    epochs: int = _option(16, "training epochs", "training", positive=True)
    batch_size: int = _option(128, "global batch size (split over replicas)", "training", positive=True)
    optimizer: str = _option("adam", "adam (Keras' Adam, each dense update one fused op: "
                             "mtl_keras.fused_adam) or lazy_adam (Adam on the rows of the heads a batch uses "
                             "only, so that with many tasks a step hardly grows with their count; heads without "
                             "examples keep weights and moments; mtl_keras.lazy_adam)", "training", OPTIMIZERS)
    lr: float = _option(2e-3, "Adam learning rate (the peak, with a schedule)", "training", positive=True)
    lr_schedule: str = _option("wsd", "learning-rate schedule: constant; cosine (decay to 0 over the run "
                               "after a linear warm-up); wsd (warm-up, the peak held, linear decay to 0 over the "
                               "last --decay-fraction of the run)", "training", LR_SCHEDULES)
    warmup_fraction: float = _option(0.03, "share of the run's steps of linear learning-rate warm-up (cosine, "
                                     "wsd)", "training", fraction="open")
    decay_fraction: float = _option(0.2, "share of the run's steps, at its end, of linear decay to 0 (wsd)",
                                    "training", fraction="closed")
    label_smoothing: float = _option(0.1, "label smoothing of the classification losses", "training",
                                     fraction="open")
    seed: int = _option(0, "seeds weights, routing masks and shuffling", "training")
    jit_compile: bool = _option(False, "XLA-compile the train step (slower on CPU, see docs/BENCHMARKS.md)",
                                "training")
    precision: str = _option("float32", "layers' dtype policy: float32, or mixed_bfloat16 / mixed_float16 "
                             "(16-bit compute, float32 variables; pays only where the hardware computes in 16 bits, "
                             "see docs/BENCHMARKS.md)", "training", PRECISIONS)
    strategy: str = _option("auto", "tf.distribute strategy (auto: from TF_CONFIG and the visible GPUs)",
                            "training", STRATEGIES)

    def replace(self, **changes):
        """A copy with `changes` applied (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)

    def augmentation(self):
        """The training augmentation, a `mtl_keras.augmentation.RandomAffine` (the identity when all are 0)."""
        from mtl_keras.augmentation import RandomAffine

        return RandomAffine(shift=self.augment_shift, rotation=self.augment_rotation, scale=self.augment_scale)

    def to_dict(self):
        """The fields as plain JSON-friendly values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_MAIN = TrainConfig()

# The recipe of v0.1 (Task Routing at sigma 0.5, 12 epochs, constant learning
# rate, heads with a 128-unit estimator and dropout 0.2, no label smoothing), which the
# documented comparison and tuning runs used: their presets keep it, so
# docs/RESULTS.md and the tuning searches reproduce whatever the default
# becomes.
V01_RECIPE = _MAIN.replace(sigma=0.5, epochs=12, lr_schedule="constant", warmup_fraction=0.0, label_smoothing=0.0,
                           head_units=(128,), head_dropout=0.2)

PRESETS = {
    # The README's first command: `python apps/train_omniglot.py`.
    "default": _MAIN,
    # The comparison of docs/RESULTS.md: the v0.1 recipe with BN momentum 0.9,
    # with which the documented tables were made.
    "comparison": V01_RECIPE.replace(bn_momentum=0.9),
    # apps/benchmark.py's model shape: heads with an estimator, as
    # docs/BENCHMARKS.md measured them (Selective Sharing's overhead is that of
    # collecting the estimators' gradients), and Task Routing at sigma 0.5
    # where a case routes.
    "benchmark": _MAIN.replace(head_units=(128,), sigma=0.5),
    # KerasTuner trials: short (4 epochs of batch 64), so batch norm needs
    # the faster momentum; one device, as KerasTuner runs trials one by one.
    # No head dropout: the searches so far ran without it, and a trial's
    # score is only comparable with trials of the same model.
    "tuning": V01_RECIPE.replace(bn_momentum=0.9, batch_size=64, epochs=4, strategy="default", head_dropout=0.0),
}


def get_preset(name):
    """The `TrainConfig` of preset `name` (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
    return PRESETS[name]


def _field_type(f):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) is typing.Union:  # Optional[int]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _bounded(kind, allow_zero=False):
    def parse(text):
        value = kind(text)
        if not (value >= 0 if allow_zero else value > 0):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value
    return parse


def _fraction(flag, upper_open, check=None):
    def parse(text):
        try:
            value = float(text)
            return check(value) if check else check_fraction(flag, value, upper_open=upper_open)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) if "must be" in str(e) else f"must be a number, got {text}")
    return parse


def add_config_arguments(parser, preset="default", groups=("data", "model", "training"), exclude=()):
    """Adds a flag for each `TrainConfig` field of `groups`, defaulting to `preset`'s value.

    Args:
        parser: an `argparse.ArgumentParser`.
        preset: the preset whose values are the flags' defaults.
        groups: which field groups become flags (`"data"`, `"model"`, `"training"`).
        exclude: field names to leave out (an app that fixes them itself).

    Returns:
        The parser. Fields not exposed keep the preset's value in
        `config_from_args`.
    """
    config = get_preset(preset)
    parser.set_defaults(_preset=preset)
    sections = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta["group"] not in groups or f.name in exclude:
            continue
        if meta["group"] not in sections:
            sections[meta["group"]] = parser.add_argument_group(meta["group"])
        section = sections[meta["group"]]
        name = "--" + f.name.replace("_", "-")
        default = getattr(config, f.name)
        # A help that words its own default ("default: all") keeps it.
        help_text = meta["help"] if "default" in meta["help"] else f"{meta['help']} (default: {default})"
        kind = _field_type(f)
        if kind is bool:
            section.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            section.add_argument(name, type=int, nargs="*", default=list(default), help=help_text)
        elif meta["choices"]:
            choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            section.add_argument(name, choices=choices, default=default, help=help_text)
        elif meta["fraction"]:
            parse = _fraction(name, meta["fraction"] == "open", meta["check"])
            section.add_argument(name, type=parse, default=default, help=help_text)
        elif meta["positive"] or meta["nonnegative"]:
            section.add_argument(name, type=_bounded(kind, allow_zero=meta["nonnegative"]), default=default,
                                 help=help_text)
        else:
            section.add_argument(name, type=kind, default=default, help=help_text)
    return parser


def config_from_args(args):
    """The `TrainConfig` of parsed `args`: the preset, with every exposed flag's value."""
    config = get_preset(getattr(args, "_preset", "default"))
    values = vars(args)
    changes = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            value = values[f.name]
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    return config.replace(**changes)
