"""Planted task families on real images: does a grouping signal recover them?

Each *set* plants binary tasks with known families on labelled images (a
class per image, e.g. an Omniglot character): a family is a labelling rule
over the classes, its tasks are the rule with their own independent label
noise and their own 80% of the labels (`sharing.planted_label_families`).
The sets:

- `families`: 3 independent rules x 4 tasks;
- `correlated`: 3 rules x 4 tasks whose labels correlate about 0.45 (a
  signal must tell "same rule, independent noise" from "different but
  correlated rule");
- `unequal`: independent rules with 6, 3, 2 and 1 tasks;
- `null`: 12 tasks, each its own rule: nothing should merge.

For each (set, noise, seed) one small conv model (`conv_backbone`, no
routing, every task's head trained on every labelled example) trains
`epochs` epochs; then every signal is read off the *same* trained model and
scored by the Adjusted Rand Index (ARI) against the families and by the
share of tasks merged:

- `predictions+gate@<a>`: the heads' predictions on a probe batch
  (`sharing.predictions`), grouped at `min_affinity=a` through the merge gate
  (`sharing.gate.gated_grouping`), as `SelectiveSharing(signal="predictions")`
  does;
- `gram@epoch1`, `gram@last`: the authors' pipeline (`group_units`, similarity
  rule, the callback's defaults) on the estimator gradients of the first /
  last epoch;
- signal-only scores (agglomerative clustering, number of clusters by
  silhouette, no threshold: how well the affinity orders the tasks):
  `trunk_cosine` (cosine of per-task gradients of the shared trunk on the
  probe), `tag` (lookahead inter-task affinity, Fifty et al. 2021: the
  relative change of task j's probe loss after an SGD step of the trunk on
  task i's gradient), `predictions` (the CKA affinity).

The model's held-out accuracy (images of drawers it did not train on,
against the clean rule) is reported beside every grouping: a grouping made
while the model is at chance is not evidence.

The data comes in as arrays (`images`, `classes`, `split`); the app reads
Omniglot through `mtl_keras.data.omniglot_arrays`.
"""

import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import adjusted_rand_score

from mtl_keras.backbones import conv_backbone
from mtl_keras.experiments.grouping import best_silhouette_labels
from mtl_keras.model import MultiTaskModel
from mtl_keras.sharing import GradientCollector, group_units, groups_to_labels
from mtl_keras.sharing.gate import PredictionEvidence, gated_grouping
from mtl_keras.sharing.planted import planted_label_families
from mtl_keras.sharing.predictions import head_logits, prediction_affinity

SETS = {
    "families": dict(family_sizes=[4, 4, 4], correlation=0.0),
    "correlated": dict(family_sizes=[4, 4, 4], correlation=0.45),
    "unequal": dict(family_sizes=[6, 3, 2, 1], correlation=0.0),
    "null": dict(family_sizes=[1] * 12, correlation=0.0),
}
# The model and training of every run; the app records them beside the results.
TRAINING = dict(filters=(32, 64, 64), head_units=(32,), epochs=10, batch_size=32, lr=3e-3, label_fraction=0.8,
                probe=512)
MIN_AFFINITIES = (0.5, 0.7)
SIGNAL_ONLY = ("predictions", "trunk_cosine", "tag")


def _bce(logits, labels):
    mask = ~np.isnan(labels)
    y = tf.constant(np.nan_to_num(labels)[mask], tf.float32)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=tf.boolean_mask(logits, mask)))


def trunk_gradients(model, images, labels):
    """`[T, P]` each task's gradient of its probe loss w.r.t. the shared trunk's weights."""
    variables = model.backbone.trainable_variables
    x = tf.constant(images)
    rows = []
    for t in range(labels.shape[1]):
        with tf.GradientTape() as tape:
            loss = _bce(model(x, training=False)[:, t, 0], labels[:, t])
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    return np.array(rows)


def tag_affinity(model, images, labels, lr):
    """Lookahead affinity `Z[i, j] = 1 - L_j(trunk - lr * g_i) / L_j(trunk)` on a probe batch (Fifty et al.).

    Symmetrised as `(Z + Z^T) / 2`; one trunk step per task, restored after.
    """
    variables = model.backbone.trainable_variables
    x = tf.constant(images)
    t_count = labels.shape[1]

    def losses():
        out = model(x, training=False)[:, :, 0]
        return np.array([float(_bce(out[:, j], labels[:, j])) for j in range(t_count)])

    before = losses()
    z = np.zeros((t_count, t_count))
    saved = [v.numpy() for v in variables]
    for i in range(t_count):
        with tf.GradientTape() as tape:
            loss = _bce(model(x, training=False)[:, i, 0], labels[:, i])
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(lr * g)
        z[i] = 1.0 - losses() / np.maximum(before, 1e-12)
        for v, s in zip(variables, saved):
            v.assign(s)
    return (z + z.T) / 2


def _merged_fraction(groups, n):
    return sum(len(g) for g in groups if len(g) > 1) / n


def run_real(images, classes, train, set_name, noise, seed, training=None, log=None, save_dir=None):
    """One (set, noise, seed): trains a model, scores every signal.

    Args:
        images: `[N, S, S, 1]` float32.
        classes: `[N]` class of each image (the rules label classes).
        train: `[N]` bool, the training images; the others measure accuracy.
        set_name: a key of `SETS`.
        noise: label flip probability of every task.
        seed: seeds the planted labels, the model and the groupings.
        training: overrides of `TRAINING`.
        save_dir: if given, the probe logits, probe labels and families are
            saved there (`<set>_<noise>_seed<seed>.npz`) so other groupings
            can be tried on the same evidence without training again.

    Returns:
        `{"families", "accuracy", "train_accuracy", "seconds", signal: {"ari", "merged_fraction"[, "gate"]}}`.
    """
    cfg = {**TRAINING, **(training or {})}
    t0 = time.time()
    planted = planted_label_families(classes, noise=noise, label_fraction=cfg["label_fraction"], seed=seed,
                                     **SETS[set_name])
    families, n = planted.families, len(planted.families)
    keras.utils.set_random_seed(seed)
    backbone = conv_backbone(images.shape[1:], n, sigma=1.0, filters=tuple(cfg["filters"]), seed=seed)
    # Every example trains every labelled task's head (tasks_per_step = T):
    # the families must be learnt for any signal to find them.
    model = MultiTaskModel(backbone, planted.tasks, head_units=tuple(cfg["head_units"]), seed=seed,
                           tasks_per_step=n)
    model.compile(optimizer=keras.optimizers.Adam(cfg["lr"]))
    x_train, y_train = images[train], planted.y[train]
    dataset = tf.data.Dataset.from_tensor_slices(({"image": x_train}, y_train)).shuffle(
        len(x_train), seed=seed).batch(cfg["batch_size"])
    collector = GradientCollector(model).attach()
    model.fit(dataset, epochs=1, verbose=0)
    first = collector.read()[0]
    collector.detach()
    if cfg["epochs"] > 2:
        model.fit(dataset, epochs=cfg["epochs"] - 2, verbose=0)
    collector.reset()
    collector.attach()
    model.fit(dataset, epochs=1, verbose=0)
    last = collector.read()[0]
    collector.detach()

    out = {"families": families.tolist()}
    clean = planted.rules[:, classes]
    test_logits = head_logits(model, images[~train])[:, :, 0]
    out["accuracy"] = float(np.mean([((test_logits[:, t] > 0) == clean[families[t]][~train]).mean()
                                     for t in range(n)]))
    train_logits = head_logits(model, x_train)[:, :, 0]
    out["train_accuracy"] = float(np.mean([
        ((train_logits[:, t] > 0) == y_train[:, t])[~np.isnan(y_train[:, t])].mean() for t in range(n)]))

    def score(groups):
        return {"ari": float(adjusted_rand_score(families, groups_to_labels(groups, n))),
                "merged_fraction": _merged_fraction(groups, n)}

    probe_rows = np.random.default_rng(seed).permutation(len(x_train))[: cfg["probe"]]
    probe_x, probe_y = x_train[probe_rows], y_train[probe_rows]
    logits = head_logits(model, probe_x)
    if save_dir is not None:
        np.savez_compressed(f"{save_dir}/{set_name}_{noise}_seed{seed}.npz", logits=logits, labels=probe_y,
                            families=families)
    evidence = PredictionEvidence(logits)
    for a in MIN_AFFINITIES:
        result = gated_grouping(evidence, threshold=a, seed=seed)
        out[f"predictions+gate@{a}"] = {**score(result.groups), "gate": [c.as_dict() for c in result.checks]}
    for name, sums in (("gram@epoch1", first), ("gram@last", last)):
        out[name] = score(group_units(sums, collector.layout, seed=seed).groups)
    affinities = {
        "predictions": prediction_affinity(logits),
        "trunk_cosine": _cosine(trunk_gradients(model, probe_x, probe_y)),
        "tag": tag_affinity(model, probe_x, probe_y, cfg["lr"]),
    }
    for name, affinity in affinities.items():
        out[name] = {"ari": float(adjusted_rand_score(families, best_silhouette_labels(affinity)))}
        if name != "predictions":
            same = families[:, None] == families[None, :]
            off = ~np.eye(n, dtype=bool)
            out[name]["same_family_mean"] = float(affinity[same & off].mean()) if (same & off).any() else None
            out[name]["other_family_mean"] = float(affinity[~same].mean())
    out["seconds"] = time.time() - t0
    if log:
        log(f"  {set_name} noise {noise} seed {seed}: accuracy {out['accuracy']:.3f}, "
            + ", ".join(f"{k} {out[k]['ari']:.2f}" for k in signal_names()) + f" ({out['seconds']:.0f} s)")
    return out


# (proposal, min_affinity[, split_refused]); "silhouette@0.3" is SelectiveSharing's
# default, "silhouette@0.3/no-split" the gate before refused groups were split.
GATE_VARIANTS = (("threshold", 0.5), ("threshold", 0.7), ("silhouette", 0.3), ("silhouette", 0.3, False),
                 ("silhouette", 0.4), ("silhouette", 0.5))


def regroup_saved(paths, variants=GATE_VARIANTS, seed=0):
    """Other gate settings on saved probe evidence (`run_real(save_dir=...)`), without training again.

    Args:
        paths: `.npz` files written by `run_real`.
        variants: `(proposal, min_affinity)` or `(proposal, min_affinity, split_refused)` for
            `gated_grouping` (`split_refused` True by default, as there).
        seed: the gate's random state.

    Returns:
        `{"<set>@<noise>": {"<proposal>@<a>": {"ari_mean", "merged_fraction_mean", "ari_per_seed"}, "seeds"}}`.
    """
    per_key = {}
    for path in sorted(str(p) for p in paths):
        saved = np.load(path)
        families = saved["families"]
        name = path.rsplit("/", 1)[-1].rsplit("_seed", 1)[0]
        set_name, noise = name.rsplit("_", 1)
        evidence = PredictionEvidence(saved["logits"])
        row = {}
        for proposal, a, *split in variants:
            split = split[0] if split else True
            groups = gated_grouping(evidence, threshold=a, proposal=proposal, seed=seed, split_refused=split).groups
            row[f"{proposal}@{a}" + ("" if split else "/no-split")] = (float(adjusted_rand_score(families, groups_to_labels(groups, len(families)))),
                                      _merged_fraction(groups, len(families)))
        per_key.setdefault(f"{set_name}@{noise}", []).append(row)
    out = {}
    for key, rows in per_key.items():
        out[key] = {"seeds": len(rows)}
        for name in rows[0]:
            out[key][name] = {"ari_mean": float(np.mean([r[name][0] for r in rows])),
                              "merged_fraction_mean": float(np.mean([r[name][1] for r in rows])),
                              "ari_per_seed": [round(r[name][0], 3) for r in rows]}
    return out


def _cosine(rows):
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    return np.clip(rows @ rows.T, -1.0, 1.0)


def signal_names():
    return [f"predictions+gate@{a}" for a in MIN_AFFINITIES] + ["gram@epoch1", "gram@last"] + list(SIGNAL_ONLY)


def summarise_real(runs):
    """`{signal: {"ari_mean", "ari_per_seed", "merged_fraction_mean"?}, "accuracy_mean", ...}` over seeds."""
    out = {"accuracy_mean": float(np.mean([r["accuracy"] for r in runs])),
           "train_accuracy_mean": float(np.mean([r["train_accuracy"] for r in runs])),
           "seeds": len(runs)}
    for name in signal_names():
        entry = {"ari_mean": float(np.mean([r[name]["ari"] for r in runs])),
                 "ari_per_seed": [round(r[name]["ari"], 3) for r in runs]}
        if "merged_fraction" in runs[0][name]:
            entry["merged_fraction_mean"] = float(np.mean([r[name]["merged_fraction"] for r in runs]))
        out[name] = entry
    return out
