"""Carrying a task's output layer over to the estimator it is merged onto.

When Selective Sharing merges a task onto another task's estimator, the
task keeps its own output layer, but that layer was trained on the hidden
units of the estimator that is now dropped. Hidden units of independently
trained estimators come in arbitrary order and scale, so the old output
layer reads the new estimator's features as noise (on Omniglot its R²
against the task's own pre-merge logits was -0.6 to -2.2) and the task
has to learn its output layer again.

`refit_plan` instead fits each moved task's output layer, by ridge
regression, to reproduce from the new estimator's features the logits the
task computed before the merge, on a set of inputs (no labels are used:
the task's own predictions are the target). How well it can is itself
evidence about the merge: the fit's R² says how much of the task's
function the shared estimator can carry.

>>> plan = refit_plan(model, inputs, new_estimator_of_task)
>>> model.set_estimator_of_task(new_estimator_of_task)
>>> apply_refit(model, plan)
>>> {t: fit.r2 for t, fit in plan.items()}
"""

import dataclasses

import numpy as np

from mtl_keras.sharing.predictions import TrunkFeatures

# Ridge strength relative to the mean eigenvalue of the features' Gram
# matrix: small enough to leave a well-determined fit unchanged, large
# enough that dead (all-zero) hidden units do not make it singular.
DEFAULT_RIDGE = 1e-3


@dataclasses.dataclass
class OutputFit:
    """A moved task's refitted output layer and how well it reproduces the old logits."""

    kernel: np.ndarray
    bias: np.ndarray
    r2: float
    r2_unchanged: float

    def as_dict(self):
        return {"r2": round(self.r2, 4), "r2_unchanged": round(self.r2_unchanged, 4)}


def _r2(target, prediction):
    centred = target - target.mean(axis=0, keepdims=True)
    total = float(np.sum(centred ** 2))
    return 1.0 - float(np.sum((target - prediction) ** 2)) / total if total > 0 else 1.0


def ridge_readout(features, targets, ridge=DEFAULT_RIDGE):
    """Least-squares `(kernel, bias)` with `features @ kernel + bias ≈ targets`, ridge on the kernel.

    Args:
        features: `[N, H]`.
        targets: `[N, K]`.
        ridge: penalty relative to the mean eigenvalue of the centred
            features' Gram matrix.

    Returns:
        `(kernel [H, K], bias [K])` float64.
    """
    features = np.asarray(features, np.float64)
    targets = np.asarray(targets, np.float64)
    mean_x, mean_y = features.mean(axis=0), targets.mean(axis=0)
    x, y = features - mean_x, targets - mean_y
    gram = x.T @ x
    scale = max(float(np.trace(gram)) / max(len(gram), 1), 1e-12)
    kernel = np.linalg.solve(gram + ridge * scale * np.eye(len(gram)), x.T @ y)
    return kernel, mean_y - mean_x @ kernel


def refit_plan(model, inputs, estimator_of_task, ridge=DEFAULT_RIDGE):
    """New output layers for the tasks whose estimator `estimator_of_task` changes.

    Call before `model.set_estimator_of_task(estimator_of_task)`: the
    estimators being dropped are still needed to compute the old logits.

    Args:
        model: a `MultiTaskModel` whose heads have estimators
            (`head_units` not empty).
        inputs: images, or a dict holding `"image"`: what the fit is made
            on (a few hundred to a few thousand inputs; labels are not used).
        estimator_of_task: the grouping about to be applied.
        ridge: see `ridge_readout`.

    Returns:
        `{task index: OutputFit}` for every task whose estimator changes.
    """
    old = list(model.estimator_of_task)
    moved = [t for t, (a, b) in enumerate(zip(old, estimator_of_task)) if a != b]
    if not moved:
        return {}
    if not model.task_heads.hidden_units:
        raise ValueError("Refitting output layers needs heads with estimators (head_units); these heads have none.")
    features = TrunkFeatures(model, inputs)
    plan = {}
    for t in moved:
        output = model.heads[t].output_layer
        kernel = np.asarray(output.kernel.value, np.float64)
        bias = np.asarray(output.bias.value, np.float64)
        old_logits = features.hidden(t, old[t]) @ kernel + bias
        new_hidden = features.hidden(t, int(estimator_of_task[t]))
        fitted_kernel, fitted_bias = ridge_readout(new_hidden, old_logits, ridge)
        plan[t] = OutputFit(
            kernel=fitted_kernel, bias=fitted_bias,
            r2=_r2(old_logits, new_hidden @ fitted_kernel + fitted_bias),
            r2_unchanged=_r2(old_logits, new_hidden @ kernel + bias),
        )
    return plan


def apply_refit(model, plan):
    """Writes the refitted output layers of `plan` (see `refit_plan`) into the model."""
    for t, fit in plan.items():
        output = model.heads[t].output_layer
        output.kernel.assign(fit.kernel.astype(output.kernel.dtype))
        output.bias.assign(fit.bias.astype(output.bias.dtype))


def summarize(plan, names):
    """The refit's figures for a check's record: per task and the mean / least R²."""
    if not plan:
        return None
    r2 = [fit.r2 for fit in plan.values()]
    return {
        "tasks": {names[t]: fit.as_dict() for t, fit in sorted(plan.items())},
        "mean_r2": round(float(np.mean(r2)), 4),
        "min_r2": round(float(np.min(r2)), 4),
        "mean_r2_unchanged": round(float(np.mean([fit.r2_unchanged for fit in plan.values()])), 4),
    }
