"""Planted-families benchmark of Selective Sharing's task grouping.

    python apps/grouping_benchmark.py --output runs/grouping          # full run (~5 min on 2 cores)
    python apps/grouping_benchmark.py --output runs/grouping --quick  # < 2 min
    python apps/grouping_benchmark.py --output runs/grouping --real --no-sweep  # + Omniglot sets (~1 min a run)

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

With `--real`, the real-image planted sets too (`mtl_keras.experiments.grouping_real`):
binary labelling rules over Omniglot characters (read from the local archives
with `mtl_keras.data.omniglot_arrays`, never downloaded), families of tasks
sharing a rule with independent label noise, correlated rules, unequal
families and a null set; every signal is scored on the same trained model,
beside the model's held-out accuracy. Results go to `grouping.json`'s
`"real"` entry, written after every (set, noise) so a long run keeps what it
finished.

Writes `OUTPUT/grouping.json` (`{"rules": {NAME: {"ari_mean", "ari_per_seed"}},
"sweeps": ..., "setting": ..., "provenance": ...}`), `OUTPUT/grouping.png` (ARI
per rule and the sweeps) and `OUTPUT/affinity_seed0.png` (gradient affinity
with dendrogram). The experiment itself is `mtl_keras.experiments.grouping`.
Bad input ends the app with a line "grouping_benchmark: error: ..." and
status 2.
"""

import argparse
import functools
import time

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.experiments.grouping import (
    GROUPING_SETTINGS, HEAD_UNITS, HIDDEN, SETTING, plot_grouping, run_setting, run_sweeps, summarise,
)
from mtl_keras.experiments.grouping_real import SETS, TRAINING, run_real, signal_names, summarise_real
from mtl_keras.experiments.provenance import RunProvenance, run_directory
from mtl_keras.reporting import text_table, write_json
from mtl_keras.sharing import SelectiveSharing, plot_affinity


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
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic planted problem")
    p.add_argument("--real", action="store_true", help="also the real-image (Omniglot) planted sets")
    p.add_argument("--real-sets", default=",".join(SETS), help="comma-separated, of: " + ", ".join(SETS))
    p.add_argument("--real-noise", default="0.1,0.2", help="label flip probabilities, comma-separated")
    p.add_argument("--real-seeds", type=int, default=5)
    p.add_argument("--real-first-seed", type=int, default=0)
    p.add_argument("--characters", type=int, default=40, help="Omniglot characters the rules label")
    p.add_argument("--character-seed", type=int, default=0,
                   help="seed of the draw of the characters (the same for every --real-seeds seed; "
                        "another value gives other characters, e.g. for a held-out check)")
    p.add_argument("--image-size", type=int, default=20)
    p.add_argument("--archives", default="full", help="Omniglot archives: full or small")
    p.add_argument("--omniglot-dir", default=None, help="folder of the Omniglot zips (default: search)")
    p.add_argument("--epochs", type=int, default=TRAINING["epochs"], help="epochs of each real-image run")
    p.add_argument("--regroup", nargs="+", default=None, metavar="EVIDENCE_DIR",
                   help="only re-run the gate's variants on saved evidence folders (OUTPUT/evidence of --real runs); "
                        "writes OUTPUT/regroup.json")
    return p.parse_args(argv)


@exit_on_user_error("grouping_benchmark")
def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    output = run_directory("grouping", args.output)
    if args.regroup:
        return regroup(args, argv, output, started)
    defaults = SelectiveSharing(verbose=0)
    setting = {key: getattr(args, key) for key in SETTING}
    seeds = list(range(3 if args.quick else args.seeds))
    log = functools.partial(print, flush=True)
    rules, sweeps, real = {}, {}, {}
    with RunProvenance(argv, __file__) as provenance:
        if not args.no_synthetic:
            per_seed = run_setting(setting, seeds, defaults)
            rules = summarise(per_seed)
            labels = [f"t{i}:f{k}" for i, k in enumerate(per_seed[0]["families"])]
            plot_affinity(per_seed[0]["_affinity"], labels, output / "affinity_seed0.png",
                          title="Planted families, seed 0: gradient affinity (label t<task>:f<family>)",
                          groups=per_seed[0]["similarity"]["groups"])
            if not args.no_sweep:
                sweeps = run_sweeps(setting, defaults, args.quick, log=log)
            plot_grouping(rules, sweeps, output / "grouping.png")
        if args.real:
            real = run_real_sets(args, output, log)

    report = {
        "app": "grouping_benchmark",
        "real": real,
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
    if rows:
        print(text_table(rows, ["rule / baseline", "ARI mean", "per seed"]))
    if real:
        print(real_table(real["results"]))
    v = rules.get("variance", {})
    if v.get("cross_family_fraction_mean") is not None:
        print(f"variance rule: {v['cross_family_fraction_mean']:.2f} of its merged groups mix only different families")
    print(f"wrote {output / 'grouping.json'} in {report['wall_time_seconds']:.0f} s")
    return report


def run_real_sets(args, output, log):
    """Every (set, noise) over the seeds; `grouping.json` is rewritten after each."""
    from mtl_keras.data.omniglot_arrays import load_omniglot_arrays

    arrays = load_omniglot_arrays(args.archives, args.image_size, max_characters=args.characters,
                                  data_dir=args.omniglot_dir, seed=args.character_seed)
    train = arrays.drawers <= 15
    training = {**TRAINING, "epochs": args.epochs}
    seeds = list(range(args.real_first_seed, args.real_first_seed + args.real_seeds))
    real = {"setting": {"archives": args.archives, "characters": int(arrays.characters.max() + 1),
                        "character_seed": args.character_seed,
                        "images": len(arrays.images), "image_size": args.image_size,
                        "train": "drawers 1-15", "accuracy_on": "drawers 16-20, against the clean rule",
                        "seeds": seeds, "training": training,
                        "sets": {k: SETS[k] for k in args.real_sets.split(",")}},
            "results": {}}
    for name in args.real_sets.split(","):
        for noise in [float(v) for v in args.real_noise.split(",")]:
            evidence = output / "evidence"
            evidence.mkdir(exist_ok=True)
            runs = [run_real(arrays.images, arrays.characters, train, name, noise, seed, training, log=log,
                             save_dir=evidence) for seed in seeds]
            real["results"][f"{name}@{noise}"] = {**summarise_real(runs), "runs": runs}
            write_json(output / "grouping_real_partial.json", real)
    return real


def regroup(args, argv, output, started):
    """The gate's variants on saved evidence: `OUTPUT/regroup.json` and a table."""
    import pathlib

    from mtl_keras.experiments.grouping_real import regroup_saved

    with RunProvenance(argv, __file__) as provenance:
        paths = [p for folder in args.regroup for p in sorted(pathlib.Path(folder).glob("*.npz"))]
        results = regroup_saved(paths)
    report = {"app": "grouping_benchmark", "regroup": results, "evidence": args.regroup,
              "wall_time_seconds": round(time.time() - started, 1), "provenance": provenance.record}
    write_json(output / "regroup.json", report)
    names = [n for n in next(iter(results.values())) if n != "seeds"]
    rows = [[k, r["seeds"]] + [f"{r[n]['ari_mean']:.3f} / {r[n]['merged_fraction_mean']:.3f}" for n in names]
            for k, r in results.items()]
    print(text_table(rows, ["set@noise", "seeds"] + [f"{n} ARI / merged" for n in names]))
    return report


def real_table(results):
    """ARI mean per (set, noise) and signal, with the share merged and the model's accuracy."""
    names = signal_names()
    rows = []
    for key, r in results.items():
        rows.append([key, round(r["accuracy_mean"], 3)] + [round(r[n]["ari_mean"], 3) for n in names]
                    + [round(r[names[0]]["merged_fraction_mean"], 3), round(r[names[1]]["merged_fraction_mean"], 3)])
    return text_table(rows, ["set@noise", "accuracy"] + names + [f"merged {names[0]}", f"merged {names[1]}"])


if __name__ == "__main__":
    main()
