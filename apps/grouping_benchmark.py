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
"sweeps": ..., "setting": ..., "provenance": ...}`), `OUTPUT/grouping.png` (ARI
per rule and the sweeps) and `OUTPUT/affinity_seed0.png` (gradient affinity
with dendrogram). The experiment itself is `mtl_keras.experiments.grouping`.
Bad input ends the app with a line "grouping_benchmark: error: ..." and
status 2.
"""

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mtl_keras.app_errors import exit_on_user_error  # noqa: E402
from mtl_keras.experiments.grouping import (  # noqa: E402
    GROUPING_SETTINGS, HEAD_UNITS, HIDDEN, SETTING, plot_grouping, run_setting, run_sweeps, summarise,
)
from mtl_keras.experiments.provenance import RunProvenance, run_directory  # noqa: E402
from mtl_keras.reporting import text_table, write_json  # noqa: E402
from mtl_keras.sharing import SelectiveSharing, plot_affinity  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for grouping.json and the PNGs")
    p.add_argument("--quick", action="store_true", help="3 seeds, a short sweep: under two minutes")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--families", type=int, default=SETTING["families"])
    p.add_argument("--family-size", type=int, default=SETTING["family_size"])
    p.add_argument("--noise", type=float, default=SETTING["noise"], help="target noise std relative to the signal")
    p.add_argument("--input-dim", type=int, default=SETTING["input_dim"])
    p.add_argument("--examples", type=int, default=SETTING["examples"])
    p.add_argument("--batch-size", type=int, default=SETTING["batch_size"])
    p.add_argument("--lr", type=float, default=SETTING["lr"])
    p.add_argument("--no-sweep", action="store_true")
    return p.parse_args(argv)


@exit_on_user_error("grouping_benchmark")
def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    output = run_directory("grouping", args.output)
    defaults = SelectiveSharing(verbose=0)
    setting = {key: getattr(args, key) for key in SETTING}
    seeds = list(range(3 if args.quick else args.seeds))
    with RunProvenance(argv, __file__) as provenance:
        per_seed = run_setting(setting, seeds, defaults)
        rules = summarise(per_seed)
        labels = [f"t{i}:f{k}" for i, k in enumerate(per_seed[0]["families"])]
        plot_affinity(per_seed[0]["_affinity"], labels, output / "affinity_seed0.png",
                      title="Planted families, seed 0: gradient affinity (label t<task>:f<family>)",
                      groups=per_seed[0]["similarity"]["groups"])
        sweeps = {}
        if not args.no_sweep:
            sweeps = run_sweeps(setting, defaults, args.quick, log=functools.partial(print, flush=True))
        plot_grouping(rules, sweeps, output / "grouping.png")

    report = {
        "app": "grouping_benchmark",
        "setting": {**setting, "seeds": seeds, "evidence": "1 epoch",
                    "model": f"dense trunk {HIDDEN}, head_units {HEAD_UNITS}"},
        "grouping_settings": {k: getattr(defaults, k) for k in GROUPING_SETTINGS},
        "rules": rules,
        "sweeps": sweeps,
        "wall_time_seconds": round(time.time() - started, 1),
        "provenance": provenance.record,
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
