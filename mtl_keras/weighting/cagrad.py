"""CAGrad: the update that most improves the worst task, near the average gradient."""

import tensorflow as tf
from keras import ops

from mtl_keras.weighting.base import EqualWeighting, register_weighting
from mtl_keras.weighting.task_gradients import check_every_n_steps as _check_every
from mtl_keras.weighting.task_gradients import DEFAULT_TASK_CHUNK_SIZE, combined_trunk_gradients
from mtl_keras.weighting.task_gradients import check_per_task_gradients as _check_route
from mtl_keras.weighting.task_gradients import check_task_chunk_size as _check_chunk


def cagrad_weights(gram, present, c=0.4, steps=250, step_size=8.0):
    """The simplex weights `w` of CAGrad's dual problem.

    Minimises `F(w) = w^T A b + c sqrt(w^T A w)` over the simplex of the
    present tasks, where `A = G G^T / |g0|^2` (the Gram matrix normalised by
    the squared norm of the average gradient `g0 = G^T b`) and `b` is uniform
    over present tasks. The paper solves it with SLSQP on the CPU; here,
    inside the step, by `steps` rounds of exponentiated gradient (step size
    `step_size / sqrt(k + 1)` on the range-normalised gradient), keeping the
    best iterate: `O(steps T^2)` time.

    Args:
        gram: `[T, T]` Gram matrix `G G^T` of the per-task gradients.
        present: `[T]` bool.
        c: CAGrad's `c` (radius of the ball around `g0`, relative to `|g0|`).
        steps: solver iterations.
        step_size: initial solver step.

    Returns:
        `(w [T], g0_sq_norm)`.
    """
    p = ops.cast(present, gram.dtype)
    b = p / ops.maximum(ops.sum(p), 1.0)
    g0_sq = ops.sum(b * ops.matmul(gram, b))
    a = gram / (g0_sq + 1e-12)
    ab = ops.matmul(a, b)

    def objective(w):
        q = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(a, w)), 0.0) + 1e-8)
        return ops.sum(w * ab) + c * q, q

    def body(k, w, best_w, best_f):
        f, q = objective(w)
        better = f < best_f
        best_w = ops.where(better, w, best_w)
        best_f = ops.where(better, f, best_f)
        grad = ab + c * ops.matmul(a, w) / q
        # Absent tasks keep weight 0; normalise the step by the gradient's range.
        big = ops.cast(1e30, grad.dtype)
        lo = ops.min(ops.where(p > 0, grad, big))
        hi = ops.max(ops.where(p > 0, grad, -big))
        scale = step_size / ops.sqrt(ops.cast(k, grad.dtype) + 1.0) / (hi - lo + 1e-12)
        w = w * ops.exp(-ops.where(p > 0, grad - lo, 0.0) * scale)
        w = w / ops.sum(w)
        return k + 1, w, best_w, best_f

    init = (tf.constant(0), b, b, ops.cast(1e30, gram.dtype))
    _, w, best_w, best_f = tf.while_loop(lambda k, *_: k < steps, body, init)
    f_last, _ = objective(w)
    w = ops.where(f_last < best_f, w, best_w)
    return w, g0_sq


def cagrad_combine(grads, present, c=0.4, rescale=True, steps=250):
    """Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone, Liu, NeurIPS 2021).

    `d = g0 + c |g0| / |g_w| g_w`, with `g_w = G^T w` and `w` from
    `cagrad_weights`: the direction within distance `c |g0|` of the average
    gradient `g0` that maximises the least improvement over the tasks.
    With `rescale` (the paper's default), `d / (1 + c^2)`.

    Args:
        grads: `[T, N]` per-task gradients (zero rows for absent tasks).
        present: `[T]` bool.
        c: the paper's `c` (0.4 in the paper's multi-task experiments).
        rescale: divide by `1 + c^2`.
        steps: iterations of the weight solver.

    Returns:
        `[N]` combined gradient, on the scale of the average gradient.
    """
    p = ops.cast(present, grads.dtype)
    grads = grads * p[:, None]
    gram = ops.matmul(grads, ops.transpose(grads))
    w, g0_sq = cagrad_weights(gram, present, c=c, steps=steps)
    b = p / ops.maximum(ops.sum(p), 1.0)
    g0 = ops.matmul(b[None, :], grads)[0]
    gw = ops.matmul(w[None, :], grads)[0]
    gw_norm = ops.sqrt(ops.sum(w * ops.matmul(gram, w)) + 1e-20)
    d = g0 + (c * ops.sqrt(g0_sq + 1e-20) / (gw_norm + 1e-12)) * gw
    return d / (1.0 + c * c) if rescale else d


@register_weighting("cagrad")
class CAGrad(EqualWeighting):
    """CAGrad (Liu, Liu, Jin, Stone, Liu: "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021).

    The trunk's update is the direction near the average gradient (within
    `c |g0|`) that maximises the worst task's local improvement, see
    `cagrad_combine`; the heads get their ordinary gradients. `c = 0` is
    plain averaging; the paper uses `c = 0.4` for multi-task supervised
    learning, and rescales by `1 / (1 + c^2)`.

    Cost: per-task gradients of the trunk *weights* (computed as for
    `PCGrad`, see `per_task_gradients`: about 2-3x the step time of `equal`
    with `"grouped"`, about `min(T, pairs)` times with `"jacobian"`), `T x N` memory (N =
    trunk parameters), a `T x T` Gram matrix (`O(T^2 N)`) and a
    T-dimensional solve (`O(solver_steps T^2)`).

    With `every_n_steps = k > 1`, only every k-th step (by optimizer
    iteration) pays for the per-task gradients; the others take the plain
    equal-weighting gradient.

    Args:
        c: the conflict-aversion radius (default 0.4).
        rescale: divide the update by `1 + c^2` (default True).
        solver_steps: iterations of the inner solver.
        every_n_steps: how often to use CAGrad's direction (1 = always).
        per_task_gradients: `"auto"`, `"grouped"` or `"jacobian"` (see
            `mtl_keras.weighting.task_gradients`).
        task_chunk_size: with `"jacobian"`, tasks whose backward passes run
            vectorised at once (default 8; see `PCGrad`).

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="cagrad")
    """

    needs_task_gradients = True

    def __init__(
        self, c=0.4, rescale=True, solver_steps=250, every_n_steps=1, per_task_gradients="auto",
        task_chunk_size=DEFAULT_TASK_CHUNK_SIZE, **kwargs
    ):
        super().__init__(**kwargs)
        if c < 0:
            raise ValueError(f"CAGrad's c must be >= 0, got {c}.")
        self.c = float(c)
        self.rescale = bool(rescale)
        self.solver_steps = int(solver_steps)
        self.every_n_steps = _check_every(every_n_steps)
        self.per_task_gradients = _check_route(per_task_gradients)
        self.task_chunk_size = _check_chunk(task_chunk_size)

    def compute_gradients(self, tape, objective, variables, step):
        def combine(grads, present):
            return cagrad_combine(grads, present, self.c, self.rescale, self.solver_steps)

        return combined_trunk_gradients(
            tape, objective, variables, step, combine, self.every_n_steps, self.per_task_gradients,
            self.task_chunk_size,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "c": self.c,
            "rescale": self.rescale,
            "solver_steps": self.solver_steps,
            "every_n_steps": self.every_n_steps,
            "per_task_gradients": self.per_task_gradients,
            "task_chunk_size": self.task_chunk_size,
        }
