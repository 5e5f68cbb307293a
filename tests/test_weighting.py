"""Loss weighting and gradient methods: each one's defining property, training, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import minimize

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.weighting import (
    available_weightings,
    cagrad_combine,
    dwa_weights,
    famo_logit_gradient,
    famo_loss_weights,
    get_weighting,
    gradnorm_weight_gradient,
    pcgrad_combine,
)
from mtl_keras.weighting.cagrad import cagrad_weights

METHODS = ["equal", "uncertainty", "dwa", "gradnorm", "famo", "pcgrad", "cagrad"]


def np_(x):
    return keras.ops.convert_to_numpy(x)


def make_model(
    tasks, weighting, sigma=0.5, batch_norm=True, optimizer=None, seed=0, head_units=(6,), **kwargs
):
    backbone = conv_backbone(
        (8, 8, 1), len(tasks), sigma=sigma, filters=(8, 8), seed=seed, batch_norm=batch_norm
    )
    model = MultiTaskModel(backbone, tasks, head_units=head_units, seed=seed, weighting=weighting, **kwargs)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1))
    return model


def class_tasks(n=3):
    return TaskSet([Task(f"t{i}", "multiclass", 3 + i) for i in range(n)])


def class_batch(n=24, num_tasks=3, present=None, seed=0):
    rng = np.random.default_rng(seed)
    present = list(range(num_tasks)) if present is None else present
    t = np.array([present[i % len(present)] for i in range(n)], "int32")
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y = np.array([rng.integers(0, 3 + k) for k in t], "float32")
    return {"image": x, "task": t}, y


# ---------------------------------------------------------------- registry
def test_registry_lists_methods_and_unknown_names_say_what_exists():
    assert set(METHODS) <= set(available_weightings())
    with pytest.raises(ValueError, match=r"Unknown weighting 'pcgard'.*'pcgrad'"):
        get_weighting("pcgard")
    with pytest.raises(ValueError, match="available"):
        make_model(class_tasks(), "nope")
    assert get_weighting("gradnorm", alpha=0.5).alpha == 0.5


# ------------------------------------------------------------------ pcgrad
def test_pcgrad_removes_the_conflicting_component():
    g1 = np.array([1.0, 0.0, 0.5], "float32")
    g2 = np.array([-1.0, 1.0, 0.0], "float32")  # g1 . g2 = -1 < 0
    g3 = np.zeros(3, "float32")  # an absent task
    grads = np.stack([g1, g2, g3])
    present = np.array([True, True, False])
    out = np_(pcgrad_combine(tf.constant(grads), tf.constant(present)))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    np.testing.assert_allclose(out, (p1 + p2) / 2, atol=1e-6)
    # Each projected gradient no longer conflicts with the other task.
    assert abs(p1 @ g2) < 1e-6 and abs(p2 @ g1) < 1e-6
    # Gradients that agree pass through unchanged: the mean, as `equal`.
    agree = np.stack([g1, g1 + [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(
        np_(pcgrad_combine(tf.constant(agree), tf.constant([True, True]))), agree.mean(0), atol=1e-6
    )


def test_pcgrad_projects_in_the_random_order_of_algorithm_1():
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(4, 6)).astype("float32")
    present = np.array([True] * 4)
    out = np_(pcgrad_combine(tf.constant(grads), tf.constant(present), seed=3, iteration=7))
    keys = tf.random.stateless_uniform((4, 4), seed=tf.constant([3, 7], tf.int64))
    order = np_(tf.argsort(keys, axis=1, stable=True))
    expected = []
    for i in range(4):
        g = grads[i].copy()
        for j in order[i]:
            if j != i and g @ grads[j] < 0:
                g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        expected.append(g)
    np.testing.assert_allclose(out, np.mean(expected, axis=0), atol=1e-5)


def captured_step(model, batch):
    """Runs one eager train step and returns (variables, gradients) as numpy."""
    seen = {}

    def observer(variables, grads, step):
        seen["vars"] = [v.path for v in variables]
        seen["grads"] = [None if g is None else np_(tf.convert_to_tensor(g)) for g in grads]
        seen["step"] = step

    model.gradient_observers.append(observer)
    model.train_step(batch)
    model.gradient_observers.remove(observer)
    return seen


@pytest.mark.parametrize(
    "route, batch_norm, sigma, several_per_example, chunk",
    [
        ("jacobian", True, 0.5, False, 8),  # exact with batch norm; the default chunk holds every task
        ("jacobian", True, 0.5, False, 2),  # two chunks of two tasks
        ("jacobian", True, 1.0, True, 1),  # one task at a time (a plain loop)
        ("jacobian", True, 0.5, False, None),  # all tasks in one vectorised pass
        ("grouped", False, 0.5, False, 8),  # one task per example, routed
        ("grouped", False, 1.0, True, 8),  # several tasks per example, shared trunk run once
    ],
)
def test_pcgrad_step_combines_exact_per_task_trunk_gradients(route, batch_norm, sigma, several_per_example, chunk):
    if several_per_example:
        tasks = TaskSet([Task(f"t{i}", "binary", 1, weight=1.0 + i) for i in range(4)])
        rng = np.random.default_rng(5)
        x = {"image": rng.random((10, 8, 8, 1)).astype("float32")}
        y = rng.integers(0, 2, (10, 4)).astype("float32")
        y[rng.random((10, 4)) < 0.3] = np.nan
        y[:, 2] = np.nan  # task 2 absent
    else:
        tasks = TaskSet([Task(f"t{i}", "multiclass", 3 + i, weight=1.0 + i) for i in range(4)])
        x, y = class_batch(n=18, num_tasks=4, present=[0, 1, 3])  # task 2 absent
    weighting = get_weighting("pcgrad", per_task_gradients=route, task_chunk_size=chunk)
    # Every labelled task of each example in every step: the pairs are the same in both passes.
    model = make_model(tasks, weighting, sigma=sigma, batch_norm=batch_norm, tasks_per_step=4)
    trunk = model.backbone.trainable_variables
    # Reference: one ordinary backward pass per task.
    with tf.GradientTape(persistent=True) as tape:
        _, out = model._step((x, y), training=True)
        weighted = [out.task_losses[t] * tasks[t].weight for t in range(4)]
    per_task = []
    for t in range(4):
        g = tape.gradient(weighted[t], trunk, unconnected_gradients="zero")
        per_task.append(np.concatenate([np.ravel(np_(gi)) for gi in g]))
    assert not np.any(per_task[2]) and np.any(per_task[1])
    iteration = int(model.optimizer.iterations.numpy())
    expected = np_(pcgrad_combine(tf.constant(np.stack(per_task), tf.float32), out.present, 0, iteration))
    seen = captured_step(model, (x, y))
    trunk_paths = {v.path for v in trunk}
    got = np.concatenate([np.ravel(g) for p, g in zip(seen["vars"], seen["grads"]) if p in trunk_paths])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # The absent task's head gets nothing; present heads get their gradients
    # (row t of the stacked estimator variables, task t's output units).
    grads = dict(zip(seen["vars"], seen["grads"]))
    heads = model.task_heads
    for variable in heads.stacked_estimator_variables():
        g = grads[variable.path]
        assert not np.any(g[2]) and np.any(g[1]), variable.path
    g = grads[heads.output_kernel.path]
    units = lambda t: slice(heads.table.offsets[t], heads.table.offsets[t] + heads.table.num_outputs[t])
    assert not np.any(g[units(2)]) and np.any(g[units(1)])


@pytest.mark.parametrize(
    "name, options",
    [
        ("pcgrad", {}),  # grouped per-task gradients (no batch norm)
        ("pcgrad", {"every_n_steps": 2, "per_task_gradients": "jacobian"}),
        ("cagrad", {}),
        ("famo", {}),  # the loss after the update from one more forward pass on each replica
        ("famo", {"loss_after_update": "next_batch"}),
        ("gradnorm", {}),
        ("uncertainty", {}),
        ("dwa", {}),
    ],
)
def test_two_replicas_take_the_one_replica_steps(name, options):
    tasks = class_tasks(4)
    x, y = class_batch(n=32, num_tasks=4, present=[0, 1, 2, 3, 0, 1], seed=2)
    # Replica 0 sees the first 8 examples of each batch of 16, replica 1 the rest,
    # so each replica holds a different share of every task.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    single = make_model(tasks, get_weighting(name, **options), batch_norm=False)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = make_model(tasks, get_weighting(name, **options), batch_norm=False)
    mirrored.set_weights(single.get_weights())
    epochs = 3 if name == "dwa" else 1  # DWA's weights move from the third epoch
    single.fit(ds, epochs=epochs, verbose=0, shuffle=False)
    mirrored.fit(ds, epochs=epochs, verbose=0, shuffle=False)
    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        single.weighting.current_weights(), mirrored.weighting.current_weights(), rtol=1e-5
    )


def trunk_gradient(model, batch):
    with tf.GradientTape() as tape:
        objective, _ = model._step(batch, training=True)
    return [np_(g) for g in tape.gradient(objective, model.backbone.trainable_variables)]


@pytest.mark.parametrize("name", ["pcgrad", "cagrad"])
def test_every_n_steps_uses_plain_gradients_in_between(name):
    # sigma = 1, no batch norm, no dropout: the trunk's forward pass is deterministic.
    tasks = TaskSet([Task("a", "regression", 1), Task("minus_a", "regression", 1)])
    model = make_model(
        tasks, get_weighting(name, every_n_steps=2), sigma=1.0, batch_norm=False, head_units=()
    )
    # Opposite targets through identical heads: the tasks' trunk gradients conflict.
    for a, b in zip(model.heads[0].output_layer.weights_as_blocks(), model.heads[1].output_layer.weights_as_blocks()):
        b.assign(a.value)
    rng = np.random.default_rng(4)
    images = rng.random((12, 8, 8, 1)).astype("float32")
    target = 4.0 * images.mean(axis=(1, 2, 3)) + 1.0
    x = {"image": np.concatenate([images, images]), "task": np.repeat([0, 1], 12).astype("int32")}
    y = np.concatenate([target, -target]).astype("float32")
    trunk = {v.path for v in model.backbone.trainable_variables}
    for iteration in range(2):
        plain = trunk_gradient(model, (x, y))
        seen = captured_step(model, (x, y))
        got = [g for p, g in zip(seen["vars"], seen["grads"]) if p in trunk]
        same = all(np.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, plain))
        assert same == (iteration == 1), iteration  # surgery at iteration 0 only
    with pytest.raises(ValueError, match="every_n_steps"):
        get_weighting(name, every_n_steps=0)
    with pytest.raises(ValueError, match="per_task_gradients"):
        get_weighting(name, per_task_gradients="fast")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="task_chunk_size must be a positive int"):
            get_weighting(name, task_chunk_size=bad)
    # Sub-batches per task would change batch norm's statistics: refused, clearly.
    with_bn = make_model(tasks, get_weighting(name, per_task_gradients="grouped"), batch_norm=True)
    with pytest.raises(ValueError, match="batch_norm=False"):
        with_bn.train_step((x, y))


# ------------------------------------------------------------------ cagrad
def scipy_cagrad_objective(grads, c):
    gram = grads @ grads.T
    b = np.ones(len(grads)) / len(grads)
    g0n = np.sqrt(b @ gram @ b)

    def f(w):
        return (w @ gram @ b + c * g0n * np.sqrt(w @ gram @ w + 1e-8)) / g0n**2

    res = minimize(
        f,
        b,
        bounds=[(0, 1)] * len(b),
        constraints={"type": "eq", "fun": lambda w: 1 - w.sum()},
    )
    return res.fun, f


def test_cagrad_improves_the_worst_task_within_its_ball():
    rng = np.random.default_rng(0)
    base = rng.normal(size=12)
    grads = np.stack([base + 2.0 * rng.normal(size=12) for _ in range(5)]).astype("float32")
    grads[0] *= 4.0  # a dominant task that conflicts with others
    present = np.ones(5, bool)
    c = 0.4
    w, _ = cagrad_weights(tf.constant(grads @ grads.T), tf.constant(present), c=c)
    best, f = scipy_cagrad_objective(grads.astype("float64"), c)
    assert f(np_(w).astype("float64")) <= best + 1e-3
    d = np_(cagrad_combine(tf.constant(grads), tf.constant(present), c=c, rescale=False))
    g0 = grads.mean(0)
    # Within distance c |g0| of the average gradient ...
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-4)
    # ... and the least-improved task improves more than with the average.
    assert (grads @ d).min() > (grads @ g0).min() + 1e-3
    # Rescaled by 1 / (1 + c^2); c = 0 is plain averaging.
    rescaled = np_(cagrad_combine(tf.constant(grads), tf.constant(present), c=c))
    np.testing.assert_allclose(rescaled, d / (1 + c * c), rtol=1e-5)
    np.testing.assert_allclose(
        np_(cagrad_combine(tf.constant(grads), tf.constant(present), c=0.0)), g0, rtol=1e-5, atol=1e-6
    )


def test_cagrad_ignores_absent_tasks():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(3, 8)).astype("float32")
    with_absent = np.concatenate([grads, np.zeros((1, 8), "float32")])
    a = np_(cagrad_combine(tf.constant(grads), tf.constant([True] * 3)))
    b = np_(cagrad_combine(tf.constant(with_absent), tf.constant([True] * 3 + [False])))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------- famo
class ReferenceFAMO:
    """The authors' FAMO (github.com/Cranial-XIX/FAMO, famo.py) in numpy: task
    logits w, Adam(lr 0.025, L2 decay 0.01) on them, losses bounded below by 0."""

    def __init__(self, n, lr=0.025, gamma=0.01):
        self.w, self.m, self.v, self.k = np.zeros(n), np.zeros(n), np.zeros(n), 0
        self.lr, self.gamma = lr, gamma

    def loss_weights(self, losses):
        # d/dtheta of sum(log(D) z / c), c = sum(z / D) held constant.
        z = np.exp(self.w - self.w.max()) / np.exp(self.w - self.w.max()).sum()
        d = losses + 1e-8
        return (z / d) / (z / d).sum()

    def update(self, before, after):
        delta = np.log(before + 1e-8) - np.log(after + 1e-8)
        z = np.exp(self.w - self.w.max()) / np.exp(self.w - self.w.max()).sum()
        g = z * delta - z * (z @ delta) + self.gamma * self.w  # softmax VJP, then torch Adam's weight_decay
        self.k += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m_hat, v_hat = self.m / (1 - 0.9**self.k), self.v / (1 - 0.999**self.k)
        self.w = self.w - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def per_task_losses_and_gradients(model, batch):
    """Each task's global loss and its gradient w.r.t. every trainable variable (training mode)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        _, out = model._step(batch, training=True)
        losses = [out.task_losses[t] for t in range(len(model.tasks))]
    grads = [tape.gradient(l, variables, unconnected_gradients="zero") for l in losses]
    return np_(out.global_task_losses), grads


def test_famo_steps_and_logits_follow_the_authors_algorithm():
    tasks = class_tasks(3)
    # No batch norm: the reference's losses come from extra forward passes here.
    model = make_model(tasks, "famo", sigma=1.0, batch_norm=False)
    x, y = class_batch(n=24, num_tasks=3, seed=1)
    ref = ReferenceFAMO(3)
    for step in range(4):
        before, grads = per_task_losses_and_gradients(model, (x, y))
        a = ref.loss_weights(before)
        np.testing.assert_allclose(np_(famo_loss_weights(model.weighting.logits, before, [True] * 3)), a, rtol=1e-5)
        expected = [sum(a[t] * np_(grads[t][i]) for t in range(3)) for i in range(len(grads[0]))]
        seen = captured_step(model, (x, y))
        for path, got, want in zip(seen["vars"], seen["grads"], expected):
            np.testing.assert_allclose(0 if got is None else got, want, rtol=1e-4, atol=1e-7, err_msg=path)
        after, _ = per_task_losses_and_gradients(model, (x, y))
        assert np.abs(after - before).max() > 1e-3  # the step moved the losses
        ref.update(before, after)
        np.testing.assert_allclose(np_(model.weighting.logits), ref.w, rtol=1e-4, atol=1e-5, err_msg=str(step))
    assert np.ptp(ref.w) > 0.01  # the logits moved apart: the check above compared something
    np.testing.assert_allclose(model.weighting.current_weights(), 3 * np.exp(ref.w) / np.exp(ref.w).sum(),
                               rtol=1e-4)


def test_famo_looks_at_the_updated_model_without_moving_batch_norm_statistics():
    tasks = class_tasks(3)
    x, y = class_batch(n=24, num_tasks=3, seed=1)
    famo, equal = (make_model(tasks, w, sigma=1.0, batch_norm=True) for w in ("famo", "equal"))
    equal.set_weights(famo.get_weights()[: len(equal.get_weights())])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
    for model in (famo, equal):  # one traced step each, as fit() runs it
        model.fit(ds, epochs=1, verbose=0, recalibrate_batch_norm=False)
    moving = [v.path for v in famo.backbone.non_trainable_variables if "moving" in v.path]
    assert moving
    for path in moving:
        a = [np_(v) for v in famo.backbone.non_trainable_variables if v.path == path][0]
        b = [np_(v) for v in equal.backbone.non_trainable_variables if v.path == path][0]
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=path)  # one forward's update, not two


def test_famo_weights_and_logit_steps_ignore_tasks_not_measured():
    logits = tf.constant([0.3, -0.2, 0.5, 1.0])
    losses = tf.constant([2.0, 0.5, 1.0, 9.0])
    present = tf.constant([True, True, True, False])
    a = np_(famo_loss_weights(logits, losses, present))
    ref = ReferenceFAMO(3)
    ref.w = np.array([0.3, -0.2, 0.5])
    np.testing.assert_allclose(a[:3], ref.loss_weights(np.array([2.0, 0.5, 1.0])), rtol=1e-5)
    assert a[3] == 0 and a[:3].sum() == pytest.approx(1.0)
    # The smallest loss gets the largest multiplier, at equal logits.
    even = np_(famo_loss_weights(tf.zeros(3), tf.constant([2.0, 0.5, 1.0]), tf.constant([True] * 3)))
    assert even[1] > even[2] > even[0]
    before, after = tf.math.log(losses), tf.math.log(tf.constant([1.0, 0.45, 0.9, 1.0]))
    g = np_(famo_logit_gradient(logits, before, after, present))
    z = np.exp([0.3, -0.2, 0.5]) / np.exp([0.3, -0.2, 0.5]).sum()
    delta = np.log([2.0, 0.5, 1.0]) - np.log([1.0, 0.45, 0.9])
    np.testing.assert_allclose(g[:3], z * (delta - z @ delta), rtol=1e-5)
    assert g[3] == 0 and g[0] > 0 > g[1]  # the task that fell fastest loses weight (its logit's gradient > 0)
    with pytest.raises(ValueError, match="loss_after_update"):
        get_weighting("famo", loss_after_update="later")


# ------------------------------------------------------------- uncertainty
def regression_data(n=96, noise=(0.0, 2.0), seed=0):
    """Two regression tasks of the same target, the second with noisy labels."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    t = (np.arange(n) % 2).astype("int32")
    clean = x.mean(axis=(1, 2, 3)) * 4.0
    y = clean + np.where(t == 1, noise[1], noise[0]) * rng.normal(size=n)
    return {"image": x, "task": t}, y.astype("float32")


def test_uncertainty_downweights_the_noisier_task():
    tasks = TaskSet([Task("clean", "regression", 1), Task("noisy", "regression", 1)])
    model = make_model(tasks, "uncertainty", sigma=1.0, optimizer=keras.optimizers.Adam(0.05))
    assert [v.path for v in model.weighting.trainable_weights] == [model.weighting.log_variance.path]
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(ds, epochs=8, verbose=0)
    s = np_(model.weighting.log_variance)
    w = model.weighting.current_weights()
    # Noisy labels keep the noisy task's loss high: its variance grows, its weight falls.
    assert s[1] > s[0] + 0.5 and w[1] < w[0]


# --------------------------------------------------------------------- dwa
def test_dwa_weights_follow_loss_descent_rates():
    last = tf.constant([0.5, 0.9, 1.0, 0.0])
    previous = tf.constant([1.0, 1.0, 1.0, 1.0])
    present = tf.constant([True, True, True, False])
    w = np_(dwa_weights(last, previous, present, temperature=2.0))
    r = np.array([0.5, 0.9, 1.0])
    np.testing.assert_allclose(w[:3], 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-6)
    assert w[3] == 0 and w[0] < w[1] < w[2]  # slowest descent, largest weight


def test_dwa_tracks_epoch_averages_inside_fit():
    tasks = class_tasks(3)
    model = make_model(tasks, "dwa", sigma=1.0)
    x, y = class_batch(n=24, num_tasks=3)
    # Two batches per epoch, each with every task 4 times: the mean over steps
    # of the per-step task losses is the epoch's per-task mean loss.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
    hist = model.fit(ds, validation_data=ds, epochs=3, verbose=0).history
    dwa = model.weighting
    assert float(dwa.completed_epochs.numpy()) == 3
    for i, name in enumerate(tasks.names):
        assert float(dwa.last_epoch_loss[i]) == pytest.approx(hist[f"{name}/loss"][-1], rel=1e-4)
        assert float(dwa.previous_epoch_loss[i]) == pytest.approx(hist[f"{name}/loss"][-2], rel=1e-4)
    r = np.array([hist[f"{n}/loss"][-1] / hist[f"{n}/loss"][-2] for n in tasks.names])
    np.testing.assert_allclose(dwa.current_weights(), 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-4)
    assert not any(k.startswith("epoch_boundary") for k in hist)


# ---------------------------------------------------------------- gradnorm
def test_gradnorm_weight_gradient_matches_the_paper():
    norms = tf.constant([4.0, 1.0, 2.0])
    weights = tf.constant([2.0, 0.5, 1.0])
    losses = tf.constant([1.0, 2.0, 1.0])
    initial = tf.constant([2.0, 2.0, 1.0])
    grad, target = gradnorm_weight_gradient(norms, weights, losses, initial, tf.constant([True] * 3), 1.5)
    rate = np.array([0.5, 1.0, 1.0])
    expected_target = np.mean([4, 1, 2]) * (rate / rate.mean()) ** 1.5
    np.testing.assert_allclose(np_(target), expected_target, rtol=1e-6)
    np.testing.assert_allclose(np_(grad), np.sign([4, 1, 2] - expected_target) * np.array([2.0, 2.0, 2.0]), rtol=1e-6)


def feature_grad_norms(model, batch):
    """Each task's |grad w.r.t. the features of w_t weight_t L_t|."""
    with tf.GradientTape() as tape:
        _, out = model._step(batch, training=False)
        weighted = keras.ops.sum(out.task_losses * out.task_weights * model.weighting.loss_weights)
    g = tape.gradient(weighted, out.features)
    sq = tf.math.unsorted_segment_sum(tf.reduce_sum(g**2, axis=1), out.pairs.task_ids, 2)
    return np.sqrt(np_(sq))


def norm_ratio_after_training(weighting, seed=1, epochs=40):
    """Task a's over task b's weighted gradient norm after full-batch training."""
    # Task a's loss weighs 10x: with fixed weights its gradient is ~10x larger.
    tasks = TaskSet([Task("a", "regression", 1, weight=10.0), Task("b", "regression", 1)])
    keras.utils.set_random_seed(seed)
    # No batch norm: the norms are probed in inference mode, where a trunk with
    # batch norm answers with whatever its moving statistics are (after 40 steps
    # at momentum 0.99 mostly their initial values, which inflated the fixed-weight
    # ratio to 12.5; re-estimated by fit(), 4.3), a matter apart from GradNorm.
    model = make_model(tasks, weighting, sigma=1.0, optimizer=keras.optimizers.Adam(0.05), head_units=(),
                       batch_norm=False)
    x, y = regression_data(n=64, noise=(0.3, 0.3), seed=seed)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(64), epochs=epochs, verbose=0)
    n = feature_grad_norms(model, (x, y))
    return n[0] / n[1], model.weighting.current_weights()


def test_gradnorm_equalises_gradient_norms_over_steps():
    ratio, w = norm_ratio_after_training(get_weighting("gradnorm", alpha=0.0))
    # Frozen loss weights (all 1): the same model without GradNorm's updates.
    fixed_ratio, fixed_w = norm_ratio_after_training(get_weighting("gradnorm", alpha=0.0, trainable=False))
    assert np.all(fixed_w == 1.0) and fixed_ratio > 5
    # The loss weights move against the task weights, and the norms meet.
    assert w[0] < 0.5 < 1.5 < w[1] and w.sum() == pytest.approx(2.0, rel=1e-5)
    assert 0.5 < ratio < 2.0


# ------------------------------------------------------- training + saving
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_and_round_trips_through_keras_files(name, tmp_path):
    tasks = TaskSet(
        [Task("a", "multiclass", 3), Task("b", "binary", 1), Task("c", "regression", 1)]
    )
    model = make_model(tasks, name, optimizer=keras.optimizers.Adam(0.01))
    rng = np.random.default_rng(0)
    x = {"image": rng.random((48, 8, 8, 1)).astype("float32"), "task": (np.arange(48) % 3).astype("int32")}
    y = np.where(x["task"] == 2, rng.normal(size=48), rng.integers(0, 2, 48)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    hist = model.fit(ds, epochs=3, verbose=0).history
    assert np.all(np.isfinite(hist["loss"]))
    assert hist["mean_loss"][-1] < hist["mean_loss"][0]
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded.weighting) is type(model.weighting)
    assert loaded.weighting.get_config() == model.weighting.get_config()
    for a, b in zip(model.weighting.weights, loaded.weighting.weights):
        np.testing.assert_allclose(np_(a), np_(b))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    loaded.fit(ds, epochs=1, verbose=0)  # and goes on training
