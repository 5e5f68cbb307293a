"""Task affinity from what the task heads predict: the `"predictions"` signal.

Two tasks belong together when their heads compute the same function. On a
shared *probe* batch of inputs every head's logits are taken (all heads on
every probe input), centred over the probe, and compared by linear CKA
(centred kernel alignment, Kornblith et al. 2019):

    CKA(A, B) = ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F)

for the centred logit matrices `A [B, K_i]`, `B [B, K_j]`. For one-output
tasks this is the squared Pearson correlation of the two heads' logits, so
a head that predicts the negation of another counts as the same function
(one output layer can flip a sign); CKA also compares heads with different
output widths.

Why predictions rather than gradients: with label noise a trained head's
gradient is dominated by the examples it gets wrong, and those are each
task's *own* mislabelled examples, independent between tasks of one family;
near a stationary point of the summed loss, same-family tasks' gradients
even point in opposite directions (measured: cosine about -0.9 of the
per-task trunk gradients of same-family tasks on Omniglot planted families,
see docs/GROUPING.md). A head's predictions average the noise out: tasks
sharing one rule with independent noise converge to the same predictions.
The signal is only evidence once the heads predict better than chance; the
benchmark reports the model's accuracy beside every grouping.

Example:

>>> logits = head_logits(model, probe_images)   # [B, T, K]
>>> affinity = prediction_affinity(logits)       # [T, T], 1 on the diagonal
"""

import numpy as np

from mtl_keras.task_losses import INVALID_LOGIT


class TrunkFeatures:
    """Each task's trunk features on a set of inputs, computed once, and the heads read from them.

    An unrouted trunk computes the same features for every task, so they are
    computed once for all tasks; a routed trunk once per task asked for.
    The heads are applied as `TaskHeads` applies them, one estimator at a
    time (a dense product, no per-pair gather), in float32.

    Args:
        model: a `MultiTaskModel`.
        inputs: images, or a dict with `"image"` (a `"task"` key is ignored).
        batch_size: inference batch size of the trunk.
    """

    def __init__(self, model, inputs, batch_size=256):
        self.model = model
        if isinstance(inputs, dict):
            inputs = {k: v for k, v in inputs.items() if k != "task"}
            n = len(next(iter(inputs.values())))
            self.chunks = [{k: v[s:s + batch_size] for k, v in inputs.items()} for s in range(0, n, batch_size)]
        else:
            self.chunks = [inputs[s:s + batch_size] for s in range(0, len(inputs), batch_size)]
        self.cache = {}

    def of(self, task):
        """`[B, features]` float32 trunk features of task `task`."""
        key = task if self.model.routed else None
        if key not in self.cache:
            self.cache[key] = np.concatenate(
                [np.asarray(self.model.task_features(chunk, task), dtype=np.float32) for chunk in self.chunks])
        return self.cache[key]

    def hidden(self, task, owner):
        """Task `task`'s features through head `owner`'s estimator: what an output layer reads."""
        heads = self.model.task_heads
        h = self.of(task)
        for layer in self.model.heads[owner].estimator_layers:
            h = np.asarray(heads.activation(h @ np.asarray(layer.kernel.value) + np.asarray(layer.bias.value)))
        return h

    def logits(self, task):
        """`[B, num_outputs]` logits of task `task` through its current estimator."""
        output = self.model.heads[task].output_layer
        hidden = self.hidden(task, self.model.estimator_of_task[task])
        return hidden @ np.asarray(output.kernel.value) + np.asarray(output.bias.value)


def head_logits(model, probe, batch_size=256):
    """Every task head's logits on every probe input.

    Args:
        model: a `MultiTaskModel`.
        probe: inputs: an image array, or a dict with `"image"` (a `"task"`
            key is ignored: every head runs on every input).
        batch_size: inference batch size of the trunk.

    Returns:
        `[B, T, max_outputs]` float64 logits; columns past a task's outputs
        hold what the model puts there (`task_losses.gather_task_logits`).
    """
    features = TrunkFeatures(model, probe, batch_size)
    table = model.table
    widths = [int(w) for w in table.num_outputs]
    multiclass = [bool(m) for m in np.asarray(table.is_multiclass)]
    out = None
    for t in range(len(widths)):
        logits = features.logits(t)
        if out is None:
            out = np.zeros((len(logits), len(widths), int(table.max_outputs)))
        out[:, t, :] = INVALID_LOGIT if multiclass[t] else 0.0
        out[:, t, :widths[t]] = logits
    return out


def _centred(logits, widths):
    """Per task, its own outputs centred over the probe: a list of `[B, K_t]`."""
    return [logits[:, t, :k] - logits[:, t, :k].mean(axis=0, keepdims=True) for t, k in enumerate(widths)]


def prediction_affinity(logits, widths=None, max_block_bytes=256 * 2**20):
    """Linear CKA between the tasks' centred head logits on a probe batch.

    Args:
        logits: `[B, T, K]` (see `head_logits`).
        widths: outputs of each task (the first `widths[t]` of the K columns
            are task t's); default all K.
        max_block_bytes: memory of the largest block of cross products held
            at once (the computation runs over blocks of tasks).

    Returns:
        `[T, T]` float64 in [0, 1], 1 on the diagonal (0 for a head whose
        logits do not vary over the probe).
    """
    logits = np.asarray(logits, dtype=np.float64)
    b, t, k = logits.shape
    widths = [k] * t if widths is None else [int(w) for w in widths]
    # Columns past a task's width are zero after this: they add nothing to
    # any cross product, so every pair is one block of one matrix product.
    centred = np.zeros((b, t, k))
    for i, (c, w) in enumerate(zip(_centred(logits, widths), widths)):
        centred[:, i, :w] = c
    flat = centred.reshape(b, t * k)
    numerator = np.empty((t, t))
    step = max(1, int(max_block_bytes // max(8 * k * t * k, 1)))
    for start in range(0, t, step):
        stop = min(start + step, t)
        cross = flat[:, start * k:stop * k].T @ flat  # [(stop-start) K, T K]: every A_i^T B_j
        numerator[start:stop] = (cross.reshape(stop - start, k, t, k) ** 2).sum(axis=(1, 3))
    self_norm = np.sqrt(np.diag(numerator))
    denom = np.outer(self_norm, self_norm)
    affinity = np.divide(numerator, denom, out=np.zeros((t, t)), where=denom > 0)
    np.fill_diagonal(affinity, 1.0)
    return np.clip(affinity, 0.0, 1.0)
