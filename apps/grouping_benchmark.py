"""Planted-families benchmark of Selective Sharing's task grouping.

    python apps/grouping_benchmark.py --output runs/grouping          # full run (~5 min on 2 cores)
    python apps/grouping_benchmark.py --output runs/grouping --quick  # < 2 min

Tasks come in known families (`mtl_keras.sharing.planted_families`: the
tasks of a family are functions of one shared latent factor, families are
independent). For each seed a small multi-task model trains for one epoch
(the callback's default evidence window) while a `GradientCollector`
accumulates every estimator's gradients; the grouping rules then run on those
gradients with `SelectiveSharing`'s default settings, and two baselines on the
same gradients: pairwise cosine similarity of the raw gradients with
agglomerative clustering (number of clusters by silhouette), and a random
grouping into as many groups as there are families. Scores are the Adjusted
Rand Index (ARI) against the planted families. The `variance` rule groups
*complementary* tasks on purpose, so its ARI is expected near or below 0; its
`cross_family_fraction` (share of its merged groups whose tasks all come from
different families) shows whether it does what it is meant to.

Sweeps (noise, family size, number of families, and a null problem with no
families at all, where the share of tasks merged should be ~0) show where
the grouping breaks.

Writes `OUTPUT/grouping.json` (`{"rules": {NAME: {"ari_mean", "ari_per_seed"}},
"sweeps": ..., "setting": ...}`), `OUTPUT/grouping.png` (ARI per rule and the
sweeps) and `OUTPUT/affinity_seed0.png` (gradient affinity with dendrogram).
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.cluster import AgglomerativeClustering  # noqa: E402
from sklearn.metrics import adjusted_rand_score, silhouette_score  # noqa: E402

from mtl_keras.reporting import text_table, write_json  # noqa: E402
from mtl_keras.sharing import (  # noqa: E402
    GradientCollector,
    SelectiveSharing,
    affinity_matrix,
    group_units,
    groups_to_labels,
    plot_affinity,
    planted_families,
    planted_model,
)

RULES = ("similarity", "variance")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for grouping.json and the PNGs")
    p.add_argument("--quick", action="store_true", help="3 seeds, a short sweep: under two minutes")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--families", type=int, default=5)
    p.add_argument("--family-size", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.5, help="target noise std relative to the signal")
    p.add_argument("--input-dim", type=int, default=16)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-sweep", action="store_true")
    return p.parse_args(argv)


def collect(setting, seed):
    """Trains one evidence window on a planted problem; returns (gradient sums, layout, families)."""
    keras.utils.set_random_seed(seed)
    problem = planted_families(
        num_families=setting["families"], family_size=setting["family_size"], noise=setting["noise"],
        input_dim=setting["input_dim"], num_examples=setting["examples"], seed=seed,
    )
    model = planted_model(problem, hidden=(64, 64), head_units=(16,), seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(setting["lr"]))
    collector = GradientCollector(model).attach()
    model.fit(problem.dataset(setting["batch_size"], seed=seed), epochs=1, verbose=0)
    sums, _, _ = collector.read()
    return sums, collector.layout, problem.families


def cosine_agglomerative(sums):
    """Baseline: cosine similarity of the raw gradients, average-linkage clustering, k by silhouette."""
    distance = np.clip(1.0 - affinity_matrix(sums), 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    n = len(sums)
    best = None
    for k in range(2, n):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
        score = silhouette_score(distance, labels, metric="precomputed")
        if best is None or score > best[0]:
            best = (score, labels)
    return best[1]


def evaluate(sums, layout, families, seed, defaults):
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


def run_setting(setting, seeds, defaults, keep_affinity=False):
    per_seed = []
    for seed in seeds:
        t0 = time.time()
        sums, layout, families = collect(setting, seed)
        result = evaluate(sums, layout, families, seed, defaults)
        result["seconds"] = time.time() - t0
        result["families"] = families
        per_seed.append(result)
    return per_seed


def summarise(per_seed, names=("similarity", "variance", "cosine_agglomerative", "random")):
    rules = {}
    for name in names:
        aris = [r[name]["ari"] for r in per_seed]
        entry = {"ari_mean": float(np.mean(aris)), "ari_per_seed": [round(a, 4) for a in aris]}
        if name in RULES:
            entry["merged_fraction_mean"] = float(np.mean([r[name]["merged_fraction"] for r in per_seed]))
            cross = [r[name]["cross_family_fraction"] for r in per_seed if r[name]["cross_family_fraction"] is not None]
            entry["cross_family_fraction_mean"] = float(np.mean(cross)) if cross else None
        rules[name] = entry
    return rules


def plot(rules, sweeps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    defaults = SelectiveSharing(verbose=0)
    setting = dict(families=args.families, family_size=args.family_size, noise=args.noise,
                   input_dim=args.input_dim, examples=args.examples, batch_size=args.batch_size, lr=args.lr)
    seeds = list(range(3 if args.quick else args.seeds))
    per_seed = run_setting(setting, seeds, defaults)
    rules = summarise(per_seed)
    labels = [f"t{i}:f{k}" for i, k in enumerate(per_seed[0]["families"])]
    plot_affinity(per_seed[0]["_affinity"], labels, output / "affinity_seed0.png",
                  title="Planted families, seed 0: gradient affinity (label t<task>:f<family>)",
                  groups=per_seed[0]["similarity"]["groups"])

    sweeps = {}
    if not args.no_sweep:
        if args.quick:
            grid = {"noise": [0.25, 1.0, 2.0], "family_size": [2, 8]}
            sweep_seeds = [0]
        else:
            grid = {"noise": [0.25, 0.5, 1.0, 2.0], "family_size": [2, 3, 4, 8], "families": [5, 10]}
            sweep_seeds = [0, 1, 2]
        for knob, values in grid.items():
            sweeps[knob] = []
            for value in values:
                runs = run_setting({**setting, knob: value}, sweep_seeds, defaults)
                point = {"value": value, **summarise(runs, ("similarity", "cosine_agglomerative", "random"))}
                point["merged_fraction"] = point["similarity"]["merged_fraction_mean"]
                sweeps[knob].append(point)
                print(f"  sweep {knob}={value}: similarity ARI {point['similarity']['ari_mean']:.3f}, "
                      f"cosine+agglomerative {point['cosine_agglomerative']['ari_mean']:.3f}", flush=True)
        # No families at all: every task has its own latent; nothing should merge.
        null = []
        for tasks in ([12] if args.quick else [12, 20]):
            runs = run_setting({**setting, "families": tasks, "family_size": 1, "input_dim": max(tasks, 16)},
                               sweep_seeds, defaults)
            point = {"value": tasks, **summarise(runs, ("similarity",))}
            point["merged_fraction"] = point["similarity"]["merged_fraction_mean"]
            null.append(point)
            print(f"  null problem, {tasks} unrelated tasks: share merged {point['merged_fraction']:.3f}", flush=True)
        sweeps["null"] = null
    plot(rules, sweeps, output / "grouping.png")

    report = {
        "app": "grouping_benchmark",
        "setting": {**setting, "seeds": seeds, "evidence": "1 epoch", "model": "dense trunk (64, 64), head_units (16,)"},
        "grouping_settings": {
            k: getattr(defaults, k) for k in ("signal", "factorizer", "n_components", "clusterer", "n_clusters",
                                              "threshold", "max_group_size")
        },
        "rules": rules,
        "sweeps": sweeps,
        "wall_time_seconds": round(time.time() - started, 1),
    }
    write_json(output / "grouping.json", report)
    rows = [[name, r["ari_mean"], " ".join(f"{a:.2f}" for a in r["ari_per_seed"])] for name, r in rules.items()]
    print(text_table(rows, ["rule / baseline", "ARI mean", "per seed"]))
    v = rules["variance"]
    if v.get("cross_family_fraction_mean") is not None:
        print(f"variance rule: {v['cross_family_fraction_mean']:.2f} of its merged groups mix only different families")
    print(f"wrote {output / 'grouping.json'} in {report['wall_time_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
