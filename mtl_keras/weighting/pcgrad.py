"""PCGrad: project each task's gradient off the gradients it conflicts with."""

import tensorflow as tf
from keras import ops

from mtl_keras.weighting.base import EqualWeighting, register_weighting
from mtl_keras.weighting.task_gradients import check_every_n_steps as _check_every
from mtl_keras.weighting.task_gradients import DEFAULT_TASK_CHUNK_SIZE, combined_trunk_gradients
from mtl_keras.weighting.task_gradients import check_per_task_gradients as _check_route
from mtl_keras.weighting.task_gradients import check_task_chunk_size as _check_chunk


def pcgrad_combine(grads, present, seed=0, iteration=0):
    """Projecting Conflicting Gradients (Yu et al., NeurIPS 2020, Algorithm 1).

    For every task i, in a random order of the other tasks j: when
    `g_i . g_j < 0`, replace `g_i` by `g_i - (g_i . g_j) / |g_j|^2 g_j`
    (`g_i` being the already-projected one, `g_j` the original). The
    result is the mean of the projected gradients over present tasks (the
    paper sums; we divide by the task count to keep `equal`'s scale).

    Every projected gradient stays a combination `sum_k A_ik g_k` of the
    original ones, and all the dot products the algorithm needs come from
    the Gram matrix `G G^T`; so the projections run on the `[T, T]`
    coefficients `A` (`O(T^3)`), and the `N`-dimensional work is one Gram
    matrix product (`O(T^2 N)`, a single matmul) and one combination
    (`O(T N)`).

    Args:
        grads: `[T, N]` per-task gradients (zero rows for absent tasks).
        present: `[T]` bool.
        seed: int, seed of the random projection orders.
        iteration: int tensor; with `seed`, fixes this step's orders (the
            same on every replica).

    Returns:
        `[N]` combined gradient.
    """
    num_tasks = int(grads.shape[0])
    present_f = ops.cast(present, grads.dtype)
    grads = grads * present_f[:, None]
    gram = ops.matmul(grads, ops.transpose(grads))
    sq_norms = ops.diagonal(gram)
    # A stateless draw, so every replica (and a 1-device replay) agrees.
    keys = tf.random.stateless_uniform(
        (num_tasks, num_tasks), seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(iteration, tf.int64)])
    )
    order = tf.argsort(keys, axis=1, stable=True)
    own = ops.arange(num_tasks, dtype="int32")

    def project(k, coefs):
        j = order[:, k]
        # (A_i . G) . g_j = sum_l A_il (g_l . g_j)
        dot = ops.sum(coefs * ops.transpose(ops.take(gram, j, axis=1)), axis=1)
        norm_j = ops.take(sq_norms, j)
        conflict = ops.logical_and(dot < 0, ops.logical_and(j != own, norm_j > 0))
        coef = ops.where(conflict, dot / ops.where(norm_j > 0, norm_j, 1.0), 0.0)
        return coefs - coef[:, None] * ops.one_hot(j, num_tasks, dtype=coefs.dtype)

    coefs = tf.while_loop(
        lambda k, _: k < num_tasks,
        lambda k, a: (k + 1, project(k, a)),
        (tf.constant(0), ops.eye(num_tasks, dtype=grads.dtype)),
    )[1]
    weights = ops.sum(coefs, axis=0) / ops.maximum(ops.sum(present_f), 1.0)
    return ops.matmul(weights[None, :], grads)[0]


@register_weighting("pcgrad")
class PCGrad(EqualWeighting):
    """PCGrad (Yu, Kumar, Gupta, Levine, Hausman, Finn: "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020).

    The trunk's gradient is `pcgrad_combine` of the tasks' trunk gradients
    (each task's gradient loses its component along any other task's
    gradient it conflicts with, in a random order); the heads get their
    ordinary gradients. The objective (and validation loss) is the equal
    weighting's. The paper has no hyper-parameters.

    Cost: per-task gradients of the trunk *weights*, `T x N` memory (N =
    trunk parameters), plus one `T x T` Gram matrix (`O(T^2 N)`, one matmul)
    for the projections. The per-task gradients come from
    (`per_task_gradients`, see `mtl_keras.weighting.task_gradients`):

    - `"grouped"` (the `"auto"` choice for trunks without batch norm or
      dropout): one extra forward + backward pass over per-task sub-batches,
      about 2-3x the step time of `equal` whatever T;
    - `"jacobian"` (the `"auto"` choice otherwise; exact with batch norm):
      one backward pass per task with a pair in the batch, vectorised
      `task_chunk_size` tasks at a time, about `min(T, pairs)` times.

    With `every_n_steps = k > 1`, only every k-th step (by optimizer
    iteration) pays for the per-task gradients; the others take the plain
    equal-weighting gradient, dividing the extra cost by about k.

    Args:
        seed: seed of the random projection orders (redrawn every step).
        every_n_steps: how often to do the gradient surgery (1 = always,
            the paper).
        per_task_gradients: `"auto"`, `"grouped"` or `"jacobian"`.
        task_chunk_size: with `"jacobian"`, tasks whose backward passes run
            vectorised at once (default 8): peak memory grows with it, not
            with T; None vectorises all tasks at once.

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="pcgrad")
    """

    needs_task_gradients = True

    def __init__(
        self, seed=0, every_n_steps=1, per_task_gradients="auto",
        task_chunk_size=DEFAULT_TASK_CHUNK_SIZE, **kwargs
    ):
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.every_n_steps = _check_every(every_n_steps)
        self.per_task_gradients = _check_route(per_task_gradients)
        self.task_chunk_size = _check_chunk(task_chunk_size)

    def compute_gradients(self, tape, objective, variables, step):
        def combine(grads, present):
            return pcgrad_combine(grads, present, self.seed, step.iteration)

        return combined_trunk_gradients(
            tape, objective, variables, step, combine, self.every_n_steps, self.per_task_gradients,
            self.task_chunk_size,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "seed": self.seed,
            "every_n_steps": self.every_n_steps,
            "per_task_gradients": self.per_task_gradients,
            "task_chunk_size": self.task_chunk_size,
        }
