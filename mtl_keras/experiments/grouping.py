"""How well Selective Sharing's grouping recovers planted task families.

On a `planted_families` problem the true grouping is known. `collect` trains
a small model for one epoch (the callback's default evidence window) while a
`GradientCollector` sums every estimator's gradients; `evaluate` runs the
grouping rules on those sums with a `SelectiveSharing` callback's settings,
and two baselines on the same sums: cosine similarity of the raw gradients
with agglomerative clustering (number of clusters by silhouette), and a
random grouping into as many groups as there are families. Scores are the
Adjusted Rand Index (ARI) against the families.

A setting is a dict with `families`, `family_size`, `noise`, `input_dim`,
`examples`, `batch_size` and `lr` (the keys of `grouping.json`'s `setting`).

Example:

>>> defaults = SelectiveSharing(verbose=0)
>>> per_seed = run_setting(SETTING, seeds=[0, 1], defaults=defaults)
>>> summarise(per_seed)["similarity"]["ari_mean"]
"""

import time

import keras
import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score, silhouette_score

from mtl_keras.plots import pyplot
from mtl_keras.sharing.gate import PredictionEvidence, gated_grouping
from mtl_keras.sharing.predictions import head_logits
from mtl_keras.sharing import (
    GradientCollector,
    affinity_matrix,
    group_units,
    groups_to_labels,
    planted_families,
    planted_model,
)

RULES = ("similarity", "variance")
# The predictions signal through the merge gate, at the callback's defaults.
PREDICTIONS = "predictions+gate"
PROBE = 512
BASELINES = ("cosine_agglomerative", "random")

# The benchmark's default problem: five families of four tasks, noise at half
# the signal, enough examples for one epoch to separate the families.
SETTING = dict(families=5, family_size=4, noise=0.5, input_dim=16, examples=4096, batch_size=128, lr=3e-3)
HIDDEN, HEAD_UNITS = (64, 64), (16,)

# The callback settings the rules run with, recorded beside the results.
GROUPING_SETTINGS = ("signal", "factorizer", "n_components", "clusterer", "n_clusters", "threshold",
                     "max_group_size")


def collect(setting, seed, probe_logits=None):
    """Trains one evidence window on a planted problem; returns `(gradient sums, layout, families)`.

    With a list as `probe_logits`, the trained heads' logits on the first
    `PROBE` inputs are appended to it (for the predictions signal).
    """
    keras.utils.set_random_seed(seed)
    problem = planted_families(
        num_families=setting["families"], family_size=setting["family_size"], noise=setting["noise"],
        input_dim=setting["input_dim"], num_examples=setting["examples"], seed=seed,
    )
    model = planted_model(problem, hidden=HIDDEN, head_units=HEAD_UNITS, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(setting["lr"]))
    collector = GradientCollector(model).attach()
    model.fit(problem.dataset(setting["batch_size"], seed=seed), epochs=1, verbose=0)
    sums, _, _ = collector.read()
    if probe_logits is not None:
        probe_logits.append(head_logits(model, problem.x[:PROBE]))
    return sums, collector.layout, problem.families


def best_silhouette_labels(affinity):
    """Agglomerative (average linkage) labels on `1 - affinity`, number of clusters by silhouette."""
    distance = np.clip(1.0 - np.asarray(affinity, dtype=np.float64), 0.0, 2.0)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    best = None
    for k in range(2, len(distance)):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
        score = silhouette_score(distance, labels, metric="precomputed")
        if best is None or score > best[0]:
            best = (score, labels)
    return best[1]


def cosine_agglomerative(sums):
    """Baseline labels: cosine similarity of the raw gradients, average linkage, k by silhouette."""
    return best_silhouette_labels(affinity_matrix(sums))


def evaluate(sums, layout, families, seed, defaults):
    """Every rule and baseline on one seed's gradient sums.

    Args:
        sums, layout: `GradientCollector.read()`'s sums and the collector's layout.
        families: the planted family of each task.
        seed: seeds the rules' factorization and the random baseline.
        defaults: a `SelectiveSharing` whose grouping settings the rules use.

    Returns:
        `{rule: {"ari", "merged_fraction", "cross_family_fraction", "groups"},
        baseline: {"ari"}, "_affinity": the similarity rule's affinity}`.
        `cross_family_fraction` is the share of merged groups whose tasks
        all come from different families (None when nothing merged).
    """
    n = len(families)
    out = {}
    for rule in RULES:
        g = group_units(
            sums, layout, rule=rule, signal=defaults.signal, factorizer=defaults.factorizer,
            n_components=defaults.n_components, clusterer=defaults.clusterer, n_clusters=defaults.n_clusters,
            threshold=defaults.threshold, max_group_size=defaults.max_group_size, max_dim=defaults.max_dim, seed=seed,
        )
        merged = [m for m in g.groups if len(m) > 1]
        out[rule] = {
            "ari": float(adjusted_rand_score(families, groups_to_labels(g.groups, n))),
            "merged_fraction": sum(len(m) for m in merged) / n,
            "cross_family_fraction": (
                float(np.mean([len(set(families[m])) == len(m) for m in merged])) if merged else None
            ),
            "groups": g.groups,
        }
        if rule == "similarity":
            out["_affinity"] = g.affinity
    out["cosine_agglomerative"] = {"ari": float(adjusted_rand_score(families, cosine_agglomerative(sums)))}
    rng = np.random.default_rng(seed)
    random_labels = rng.integers(0, len(set(families.tolist())), n)
    out["random"] = {"ari": float(adjusted_rand_score(families, random_labels))}
    return out


def run_setting(setting, seeds, defaults):
    """`evaluate`'s result for each seed, with its `seconds` and `families`."""
    per_seed = []
    for seed in seeds:
        t0 = time.time()
        logits = []
        sums, layout, families = collect(setting, seed, probe_logits=logits)
        result = evaluate(sums, layout, families, seed, defaults)
        gated = gated_grouping(PredictionEvidence(logits[0]), threshold=defaults.min_affinity,
                               bootstrap=defaults.bootstrap, min_stability=defaults.min_stability,
                               null_permutations=defaults.null_permutations, proposal=defaults.proposal, seed=seed)
        merged = [m for m in gated.groups if len(m) > 1]
        result[PREDICTIONS] = {
            "ari": float(adjusted_rand_score(families, groups_to_labels(gated.groups, len(families)))),
            "merged_fraction": sum(len(m) for m in merged) / len(families),
            "cross_family_fraction": (
                float(np.mean([len(set(families[m])) == len(m) for m in merged])) if merged else None),
            "groups": gated.groups,
        }
        result["seconds"] = time.time() - t0
        result["families"] = families
        per_seed.append(result)
    return per_seed


def summarise(per_seed, names=None):
    """`{name: {"ari_mean", "ari_per_seed"[, "merged_fraction_mean", "cross_family_fraction_mean"]}}`."""
    if names is None:
        names = RULES + ((PREDICTIONS,) if PREDICTIONS in per_seed[0] else ()) + BASELINES
    rules = {}
    for name in names:
        aris = [r[name]["ari"] for r in per_seed]
        entry = {"ari_mean": float(np.mean(aris)), "ari_per_seed": [round(a, 4) for a in aris]}
        if name in RULES + (PREDICTIONS,):
            entry["merged_fraction_mean"] = float(np.mean([r[name]["merged_fraction"] for r in per_seed]))
            cross = [r[name]["cross_family_fraction"] for r in per_seed if r[name]["cross_family_fraction"] is not None]
            entry["cross_family_fraction_mean"] = float(np.mean(cross)) if cross else None
        rules[name] = entry
    return rules


def sweep_plan(quick=False):
    """`(grid {knob: values}, seeds, null problem sizes)` of the sweeps; `quick` is the short one."""
    if quick:
        return {"noise": [0.25, 1.0, 2.0], "family_size": [2, 8]}, [0], [12]
    return {"noise": [0.25, 0.5, 1.0, 2.0], "family_size": [2, 3, 4, 8], "families": [5, 10]}, [0, 1, 2], [12, 20]


def run_sweeps(setting, defaults, quick=False, log=print):
    """Where the grouping breaks: one knob of `setting` at a time, then problems with no families.

    Returns:
        `{knob: [{"value", name: summary, "merged_fraction"}], "null": [...]}`;
        on a null problem (every task its own latent) the similarity rule's
        `merged_fraction` should be about 0.
    """
    grid, seeds, null_sizes = sweep_plan(quick)
    sweeps = {}
    for knob, values in grid.items():
        sweeps[knob] = []
        for value in values:
            runs = run_setting({**setting, knob: value}, seeds, defaults)
            point = {"value": value, **summarise(runs, ("similarity",) + BASELINES)}
            point["merged_fraction"] = point["similarity"]["merged_fraction_mean"]
            sweeps[knob].append(point)
            log(f"  sweep {knob}={value}: similarity ARI {point['similarity']['ari_mean']:.3f}, "
                f"cosine+agglomerative {point['cosine_agglomerative']['ari_mean']:.3f}")
    null = []
    for tasks in null_sizes:
        runs = run_setting({**setting, "families": tasks, "family_size": 1, "input_dim": max(tasks, 16)},
                           seeds, defaults)
        point = {"value": tasks, **summarise(runs, ("similarity", PREDICTIONS))}
        point["merged_fraction"] = point["similarity"]["merged_fraction_mean"]
        null.append(point)
        log(f"  null problem, {tasks} unrelated tasks: share merged {point['merged_fraction']:.3f} (similarity), "
            f"{point[PREDICTIONS]['merged_fraction_mean']:.3f} ({PREDICTIONS})")
    sweeps["null"] = null
    return sweeps


def plot_grouping(rules, sweeps, path):
    """ARI of every rule and baseline (bars, seeds as dots), then one panel per sweep (PNG)."""
    plt = pyplot()
    panels = 1 + len(sweeps)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4))
    axes = np.atleast_1d(axes)
    names = list(rules)
    ax = axes[0]
    ax.bar(range(len(names)), [rules[n]["ari_mean"] for n in names], color="#4C72B0")
    for i, n in enumerate(names):
        ax.scatter([i] * len(rules[n]["ari_per_seed"]), rules[n]["ari_per_seed"], color="black", s=12, zorder=3)
    ax.axhline(0.9, color="#C44E52", linestyle="--", linewidth=1, label="target 0.9")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_ylabel("ARI vs planted families")
    ax.set_ylim(-0.3, 1.05)
    ax.set_title("default setting")
    ax.legend(fontsize=8)
    for ax, (knob, sweep) in zip(axes[1:], sweeps.items()):
        xs = [p["value"] for p in sweep]
        if knob == "null":
            ax.plot(xs, [p["merged_fraction"] for p in sweep], "o-", label="similarity")
        else:
            for name, style in (("similarity", "o-"), ("cosine_agglomerative", "s--"), ("random", "x:")):
                ax.plot(xs, [p[name]["ari_mean"] for p in sweep], style, label=name)
        ax.set_xlabel(knob if knob != "null" else "tasks (no families)")
        ax.set_ylabel("share of tasks merged (should be 0)" if knob == "null" else "ARI")
        ax.set_ylim(-0.3 if knob != "null" else -0.05, 1.05)
        ax.set_title(f"sweep: {knob}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
