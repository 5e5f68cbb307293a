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


def head_logits(model, probe, batch_size=256):
    """Every task head's logits on every probe input.

    Args:
        model: a `MultiTaskModel`.
        probe: inputs: an image array, or a dict with `"image"` (a `"task"`
            key is ignored: every head runs on every input).
        batch_size: inference batch size.

    Returns:
        `[B, T, max_outputs]` float64 logits.
    """
    if isinstance(probe, dict):
        probe = {k: v for k, v in probe.items() if k != "task"}
        n = len(next(iter(probe.values())))
    else:
        n = len(probe)
    out = []
    for start in range(0, n, batch_size):
        chunk = ({k: v[start:start + batch_size] for k, v in probe.items()} if isinstance(probe, dict)
                 else probe[start:start + batch_size])
        out.append(np.asarray(model(chunk, training=False), dtype=np.float64))
    return np.concatenate(out, axis=0)


def _centred(logits, widths):
    """Per task, its own outputs centred over the probe: a list of `[B, K_t]`."""
    return [logits[:, t, :k] - logits[:, t, :k].mean(axis=0, keepdims=True) for t, k in enumerate(widths)]


def prediction_affinity(logits, widths=None):
    """Linear CKA between the tasks' centred head logits on a probe batch.

    Args:
        logits: `[B, T, K]` (see `head_logits`).
        widths: outputs of each task (the first `widths[t]` of the K columns
            are task t's); default all K.

    Returns:
        `[T, T]` float64 in [0, 1], 1 on the diagonal (0 for a head whose
        logits do not vary over the probe).
    """
    logits = np.asarray(logits, dtype=np.float64)
    _, t, k = logits.shape
    widths = [k] * t if widths is None else [int(w) for w in widths]
    centred = _centred(logits, widths)
    cross = [[c_i.T @ c_j for c_j in centred] for c_i in centred]
    self_norm = np.array([np.linalg.norm(cross[i][i]) for i in range(t)])
    affinity = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            denom = self_norm[i] * self_norm[j]
            affinity[i, j] = float(np.sum(cross[i][j] ** 2)) / denom if denom > 0 else 0.0
    np.fill_diagonal(affinity, 1.0)
    return np.clip(affinity, 0.0, 1.0)
