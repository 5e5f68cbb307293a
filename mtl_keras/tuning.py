"""KerasTuner search over the sharing ratio sigma (and optionally width and learning rate).

`SigmaHyperModel` builds a `MultiTaskModel` from a user-supplied backbone
builder for each trial's hyperparameters; `make_tuner` wraps it in one of
KerasTuner's tuners with the objective every `MultiTaskModel` logs,
`val_mean_accuracy` (the mean over tasks of each task's validation
accuracy). Trials live in KerasTuner's directory, so a search that is
stopped and started again with the same directory and `overwrite=False`
continues where it stopped.

The routing masks are (non-trainable) weights of the model, so the best
trial's checkpoint holds them: `tuner.get_best_models()` rebuilds the
architecture and loads the checkpoint, and the reloaded model routes
exactly as the trained one, whatever seed the rebuild draws
(`check_best_model` verifies it by reproducing the trial's score).

Example:

>>> def backbone(sigma, width, seed):
...     return conv_backbone((32, 32, 1), len(tasks), sigma=sigma, filters=vgg_filters(width, 3), seed=seed)
>>> hypermodel = SigmaHyperModel(backbone, tasks, widths=(16, 32))
>>> tuner = make_tuner("bayesian", hypermodel, "runs/tune", max_trials=10)
>>> search(tuner, train, validation_data=val, epochs=5)
>>> best = tuner.get_best_models(1)[0]
"""

import inspect
import math

import keras
import keras_tuner
import numpy as np

from mtl_keras.backbones import routing_layers
from mtl_keras.model import MultiTaskModel
from mtl_keras.reporting import text_table
from mtl_keras.tasks import TaskSet

OBJECTIVE_NAME = "val_mean_accuracy"
TUNERS = ("bayesian", "random", "hyperband")


def objective():
    """The tuning objective: mean validation accuracy over tasks, maximised."""
    return keras_tuner.Objective(OBJECTIVE_NAME, direction="max")


def _range_or_choices(value, what):
    # A tuple is a (low, high) range, a list the values to choose from.
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"{what} range must be a (low, high) tuple, got {value!r}; pass a list for choices.")
        lo, hi = float(value[0]), float(value[1])
        if not lo < hi:
            raise ValueError(f"{what} range must be (low, high) with low < high, got {value!r}.")
        return ("range", lo, hi)
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        raise ValueError(f"{what} needs at least one value.")
    return ("choice", values)


class SigmaHyperModel(keras_tuner.HyperModel):
    """A KerasTuner hypermodel of a `MultiTaskModel` with a tunable sharing ratio.

    Hyperparameters: `sigma` (always), `width` (when `widths` is given) and
    `learning_rate` (when `learning_rate` is a range or a list).

    Args:
        build_backbone: `build_backbone(sigma=..., seed=..., [width=...])`
            returning a backbone for `MultiTaskModel` (see
            `backbones.conv_backbone`); `width` is passed only when `widths`
            is given, `seed` only if the builder accepts it.
        tasks: the `TaskSet`.
        sigma: a `(low, high)` tuple (continuous search) or a list of
            values to choose from. Default `(0.0, 1.0)`.
        sigma_step: optional step of a continuous sigma range (e.g. 0.1
            makes the grid 0, 0.1, ..., 1).
        widths: optional list of widths to choose from.
        learning_rate: a float (fixed), a `(low, high)` tuple (log-uniform
            search) or a list of values to choose from.
        optimizer: `"adam"`, `"sgd"` or `"rmsprop"`.
        seed: seed given to the backbone builder (routing masks) and the
            model. Every trial uses the same seed, so trials differ by their
            hyperparameters only.
        **model_kwargs: other `MultiTaskModel` arguments (`head_units`,
            `head_dropout`, ...).

    Example:

    >>> hm = SigmaHyperModel(lambda sigma, seed: conv_backbone((28, 28, 1), 5, sigma=sigma, seed=seed), tasks)
    >>> model = hm.build(keras_tuner.HyperParameters())
    """

    def __init__(
        self,
        build_backbone,
        tasks,
        sigma=(0.0, 1.0),
        sigma_step=None,
        widths=None,
        learning_rate=1e-3,
        optimizer="adam",
        seed=0,
        **model_kwargs,
    ):
        super().__init__(name="sigma_hypermodel", tunable=True)
        if not callable(build_backbone):
            raise ValueError(f"build_backbone must be callable, got {build_backbone!r}.")
        self.build_backbone = build_backbone
        self.tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
        self.sigma = _range_or_choices(sigma, "sigma")
        for v in self.sigma[1:] if self.sigma[0] == "range" else self.sigma[1]:
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"sigma values must lie in [0, 1], got {v!r}.")
        self.sigma_step = sigma_step
        self.widths = [int(w) for w in widths] if widths else None
        self.learning_rate = _range_or_choices(learning_rate, "learning_rate")
        if optimizer not in ("adam", "sgd", "rmsprop"):
            raise ValueError(f"optimizer must be 'adam', 'sgd' or 'rmsprop', got {optimizer!r}.")
        self.optimizer = optimizer
        self.seed = seed
        self.model_kwargs = model_kwargs
        # KerasTuner keeps only a failed trial's traceback text; `search` raises the error itself.
        self.last_failure = None
        params = inspect.signature(build_backbone).parameters
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._pass_seed = takes_kwargs or "seed" in params
        if self.widths and not (takes_kwargs or "width" in params):
            raise ValueError("widths were given, but build_backbone takes no 'width' argument.")

    def _sigma(self, hp):
        if self.sigma[0] == "range":
            return hp.Float("sigma", self.sigma[1], self.sigma[2], step=self.sigma_step)
        return hp.Choice("sigma", [float(v) for v in self.sigma[1]])

    def _learning_rate(self, hp):
        kind = self.learning_rate[0]
        if kind == "range":
            return hp.Float("learning_rate", self.learning_rate[1], self.learning_rate[2], sampling="log")
        values = [float(v) for v in self.learning_rate[1]]
        if len(values) == 1:
            return hp.Fixed("learning_rate", values[0])
        return hp.Choice("learning_rate", values)

    def build(self, hp):
        sigma = self._sigma(hp)
        kwargs = {"sigma": sigma}
        if self.widths:
            kwargs["width"] = hp.Choice("width", self.widths)
        if self._pass_seed:
            kwargs["seed"] = self.seed
        lr = self._learning_rate(hp)
        backbone = self.build_backbone(**kwargs)
        model = MultiTaskModel(backbone, self.tasks, seed=self.seed, **self.model_kwargs)
        optimizer = {
            "adam": keras.optimizers.Adam,
            "sgd": keras.optimizers.SGD,
            "rmsprop": keras.optimizers.RMSprop,
        }[self.optimizer](learning_rate=lr)
        model.compile(optimizer=optimizer)
        return model

    def fit(self, hp, model, *args, **kwargs):
        try:
            return model.fit(*args, **kwargs)
        except Exception as e:
            self.last_failure = e
            raise


def make_tuner(
    kind,
    hypermodel,
    directory,
    project_name="sigma",
    max_trials=10,
    max_epochs=10,
    seed=0,
    overwrite=False,
    **kwargs,
):
    """One of KerasTuner's tuners over `hypermodel`, maximising `val_mean_accuracy`.

    Args:
        kind: `"bayesian"` (Gaussian-process Bayesian optimisation),
            `"random"` or `"hyperband"`.
        hypermodel: a `SigmaHyperModel` (or any `keras_tuner.HyperModel`).
        directory, project_name: where KerasTuner keeps the trials; with
            `overwrite=False` an existing search there is resumed.
        max_trials: trials of the Bayesian and random tuners. Hyperband
            runs one full bracket iteration instead (its trial count follows
            from `max_epochs` and its factor, 3).
        max_epochs: Hyperband's largest training budget per trial.
        seed: the tuner's random seed.
        overwrite: start the search afresh.
        **kwargs: passed to the tuner (e.g. `distribution_strategy`,
            `executions_per_trial`).

    Returns:
        The tuner; call `search(tuner, train, validation_data=val, epochs=E)`.
    """
    common = dict(
        objective=objective(),
        directory=str(directory),
        project_name=project_name,
        seed=seed,
        overwrite=overwrite,
        **kwargs,
    )
    if kind == "bayesian":
        return keras_tuner.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    if kind == "random":
        return keras_tuner.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        return keras_tuner.Hyperband(hypermodel, max_epochs=max(2, int(max_epochs)), factor=3, **common)
    raise ValueError(f"Unknown tuner {kind!r}; choose one of {TUNERS}.")


def search(tuner, *args, **kwargs):
    """`tuner.search(*args, **kwargs)`; when its trials failed, the last failed trial's own error.

    KerasTuner goes on after a failed trial and stops after three in a row
    with a `RuntimeError` that holds only the last one's traceback as text
    (fewer trials, all failed, end with no error at all). When the search
    ends with no scored trial, or by that stop, and a trial of this process
    failed, that trial's exception is raised instead, so a NaN loss or a
    refused batch reaches the caller as the library's own error.
    """
    try:
        tuner.search(*args, **kwargs)
    except RuntimeError as e:
        failure = getattr(tuner.hypermodel, "last_failure", None)
        if failure is None or not str(e).startswith("Number of consecutive failures"):
            raise
        raise failure from e
    failure = getattr(tuner.hypermodel, "last_failure", None)
    if failure is not None and all(row["score"] is None for row in trials_table(tuner)):
        raise failure


def trials_table(tuner):
    """Every finished trial as a dict: id, status, hyperparameters, score, best epoch.

    Sorted best first (trials without a score last).
    """
    rows = []
    for trial in tuner.oracle.trials.values():
        score = trial.score
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": str(trial.status),
                "hyperparameters": dict(trial.hyperparameters.values),
                "score": None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score),
                "best_epoch": trial.best_step,
            }
        )
    rows.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
    return rows


def check_best_model(tuner, validation_data, strict=False):
    """Reloads the best trial's model and checks it scores what the trial scored.

    `get_best_models` rebuilds the architecture (fresh routing masks, if the
    builder's seed changed) and loads the trial's checkpoint, masks
    included. Evaluating it on the validation data must give back the
    trial's `val_mean_accuracy` at its best epoch; a model that routed
    differently would not. With several executions per trial, KerasTuner
    scores the trial by the mean of the executions' best epochs but keeps
    the single best epoch of all executions, so the reload must score at
    least the trial's score.

    Args:
        tuner: a tuner after its search.
        validation_data: the search's validation data.
        strict: raise a `RuntimeError` when the reload does not match,
            instead of reporting it (a search whose best model cannot be
            restored has nothing to hand on).

    Returns:
        `(model, {"trial_id", "trial_score", "reloaded_score", "check",
        "match"})`, `check` being `"equal"` or `"at_least"`.
    """
    best_trial = tuner.oracle.get_best_trials(1)[0]
    model = tuner.get_best_models(1)[0]
    logs = model.evaluate(validation_data, return_dict=True, verbose=0)
    reloaded = float(logs["mean_accuracy"])
    trial_score = float(best_trial.score)
    if getattr(tuner, "executions_per_trial", 1) > 1:
        check, match = "at_least", reloaded >= trial_score - 1e-6
    else:
        check, match = "equal", bool(np.isclose(reloaded, trial_score, rtol=1e-5, atol=1e-6))
    if strict and not match:
        raise RuntimeError(
            f"The reloaded best model scores {reloaded:.6f} on validation, but its trial scored {trial_score:.6f} "
            f"(expected {check.replace('_', ' ')}): the checkpoint did not restore the trained model."
        )
    return model, {
        "trial_id": best_trial.trial_id,
        "trial_score": trial_score,
        "reloaded_score": reloaded,
        "check": check,
        "match": bool(match),
    }


def check_saved_model(model, path, probe):
    """Saves `model` as a `.keras` file, loads it back and checks it routes and predicts as before.

    Args:
        model: a trained `MultiTaskModel` (e.g. `check_best_model`'s).
        path: the `.keras` file to write.
        probe: a batch of inputs to compare predictions on.

    Returns:
        `{"keras_file_same_masks", "keras_file_same_outputs"}` (bools): the
        reloaded model's routing masks equal the model's, and its
        predictions on `probe` agree to 1e-5.
    """
    model.save(path)
    reloaded = keras.models.load_model(path)
    before, after = routing_layers(model.backbone), routing_layers(reloaded.backbone)
    same_masks = len(before) == len(after) and all(np.array_equal(a.masks, b.masks) for a, b in zip(before, after))
    same_outputs = bool(np.allclose(model.predict(probe, verbose=0), reloaded.predict(probe, verbose=0), atol=1e-5))
    return {"keras_file_same_masks": bool(same_masks), "keras_file_same_outputs": same_outputs}


def trials_text_table(trials, width=None):
    """A terminal table of `trials_table`'s rows: id, sigma, width, learning rate, objective.

    `width` fills the column of trials that did not search it.
    """
    rows = []
    for t in trials:
        hp = t["hyperparameters"]
        rows.append([t["trial_id"], f"{hp['sigma']:.3f}", hp.get("width", width), f"{hp['learning_rate']:.2e}",
                     "-" if t["score"] is None else f"{t['score']:.4f}"])
    return text_table(rows, ["trial", "sigma", "width", "learning rate", OBJECTIVE_NAME])


def plot_objective(trials, path, hyperparameter="sigma", title=None):
    """Scatter of each trial's objective against one hyperparameter (PNG).

    Args:
        trials: rows of `trials_table`.
        path: PNG file to write.
        hyperparameter: the x axis.
        title: figure title.

    Returns:
        `path`.
    """
    import matplotlib.colors

    from mtl_keras.plots import pyplot

    plt = pyplot()
    done = [t for t in trials if t["score"] is not None and hyperparameter in t["hyperparameters"]]
    if not done:
        raise ValueError(f"No finished trial has a score and a {hyperparameter!r} value to plot.")
    xs = np.array([float(t["hyperparameters"][hyperparameter]) for t in done])
    ys = np.array([t["score"] for t in done])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colour_by = next(
        (k for k in ("width", "learning_rate") if all(k in t["hyperparameters"] for t in done)
         and len({t["hyperparameters"][k] for t in done}) > 1),
        None,
    )
    if colour_by:
        values = np.array([float(t["hyperparameters"][colour_by]) for t in done])
        points = ax.scatter(xs, ys, c=values, cmap="viridis", s=45, zorder=3,
                            norm=matplotlib.colors.LogNorm() if colour_by == "learning_rate" else None)
        fig.colorbar(points, ax=ax, label=colour_by)
    else:
        ax.scatter(xs, ys, s=45, zorder=3, color="#4C72B0")
    best = int(np.argmax(ys))
    ax.scatter([xs[best]], [ys[best]], s=160, facecolors="none", edgecolors="#C44E52", linewidths=2,
               zorder=4, label=f"best: {hyperparameter}={xs[best]:.3g}, {OBJECTIVE_NAME}={ys[best]:.3f}")
    ax.set_xlabel(f"{hyperparameter} (1 = fully shared)" if hyperparameter == "sigma" else hyperparameter)
    ax.set_ylabel(OBJECTIVE_NAME)
    ax.set_title(title or f"{OBJECTIVE_NAME} vs {hyperparameter} ({len(done)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
