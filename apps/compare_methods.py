"""Compare many-task methods on Omniglot against single-task learning (Δm).

Trains every configuration of --configs on the same data, seeds and budget
and writes a table of mean test accuracy (mean ± std over seeds), per-task
accuracy, Δm against single-task learning, parameter count and wall time:

    python apps/compare_methods.py                      # docs/RESULTS.md's seed-0 table (~40 min on 2 cores)
    python apps/compare_methods.py --configs stl,hard,tr0.5,tr0.5+pcgrad --tasks 10 --seeds 0 1 2
    python apps/compare_methods.py --preset default --configs stl --seeds 0 1   # STL at the main app's recipe

Single-task results are cached in --cache-dir per task, keyed by a hash of
everything they depend on, so later comparisons compute Δm without
retraining them. `--reuse DIR...` takes the runs of earlier comparisons of
the same budget instead of training them again (to add seeds, or to put
several comparisons in one table; `--reuse-only` trains nothing). Writes
into --output: results.md, results.csv, per_task.csv, results.json (with
the run's provenance: commit, command, machine load) and results.png. Bad
input ends the app with a line "compare_methods: error: ..." and status 2.
"""

import argparse

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.data.omniglot_flags import add_omniglot_arguments, load_omniglot_from_args
from mtl_keras.experiments.comparison import (
    CONFIGURATION_GRAMMAR, DEFAULT_CONFIGS, SingleTaskBudget, compare, resolve_configs,
)
from mtl_keras.experiments.comparison_tables import summary_table
from mtl_keras.experiments.provenance import PACKAGE_ROOT, RunProvenance, run_directory
from mtl_keras.presets import add_config_arguments, config_from_args
from mtl_keras.reporting import ensure_writable_dir, text_table

# --configs sets sigma, weighting and sharing per run and --seeds the seeds, so
# flags for them would be ignored; routing_mode stays the preset's because the
# budget line that --reuse matches does not name it.
NOT_FLAGS = ("sigma", "routing_mode", "weighting", "sharing", "sharing_epoch", "sharing_options", "seed", "strategy",
             "precision", "optimizer")  # precision, optimizer: the single-task baselines build their own models
# docs/RESULTS.md's v0.1 table was made with "comparison" (BN momentum 0.9: the
# train app's 0.99 needed more steps at v0.1's 12 epochs); "default" is the
# main app's recipe, for comparisons at it.
COMPARISON_PRESETS = ("comparison", "default")


def parse_args(argv=None):
    # The preset sets the other flags' defaults, so it is read first.
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=COMPARISON_PRESETS, default="comparison")
    preset = first.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(description=__doc__ + "\n" + CONFIGURATION_GRAMMAR,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=COMPARISON_PRESETS, default="comparison",
                   help="the recipe every configuration trains with, the defaults of the flags below: "
                        "comparison (v0.1's recipe with BN momentum 0.9, that of docs/RESULTS.md's v0.1 "
                        "table) or default (apps/train_omniglot.py's recipe)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated configurations (default: {DEFAULT_CONFIGS}); configurations "
                        "whose weighting or sharing rule is not available are skipped with a warning "
                        "when they come from the default list, and are an error when named explicitly")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_omniglot_arguments(p)
    add_config_arguments(p, preset=preset, exclude=NOT_FLAGS)
    stl = SingleTaskBudget()
    p.add_argument("--stl-epochs", type=int, default=stl.epochs, help="most epochs of each single-task model")
    p.add_argument("--stl-batch-size", type=int, default=stl.batch_size,
                   help="batch size of each single-task model")
    p.add_argument("--stl-patience", type=int, default=stl.patience,
                   help="early stopping on mean validation accuracy for single-task models, from epoch 6, "
                        "best epoch restored (0: off)")
    p.add_argument("--output", default=None, help="folder of the tables (default runs/compare/<timestamp>)")
    p.add_argument("--cache-dir", default=str(PACKAGE_ROOT / "runs" / "stl_cache"),
                   help="single-task result cache (shared between runs)")
    p.add_argument("--reuse", nargs="+", default=[], metavar="DIR",
                   help="earlier --output folders of the same budget: their (configuration, seed) runs are "
                        "taken instead of training again, e.g. to add seeds to a comparison")
    p.add_argument("--reuse-only", action="store_true",
                   help="train nothing: build the table from the --reuse runs alone (configurations have "
                        "as many seeds as were run)")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="0 silent, 1 a line per run, 2 also Keras progress bars")
    return p.parse_args(argv)


@exit_on_user_error("compare_methods")
def main(argv=None):
    args = parse_args(argv)
    config = config_from_args(args)
    configs, skipped = resolve_configs(args.configs)
    # Folders that cannot be written fail now, not after the training they would hold.
    output = run_directory("compare", args.output)
    ensure_writable_dir(args.cache_dir, "--cache-dir")
    for name, why in skipped:
        print(f"skipping {name}: {why}")

    def load_data(seed):
        return load_omniglot_from_args(args, config, seed=seed)

    result = compare(
        configs, args.seeds, load_data, config,
        data_description={"data": "omniglot", "archives": args.archives},
        cache_dir=args.cache_dir, output=output,
        provenance=RunProvenance(argv, program=__file__),
        stl=SingleTaskBudget(args.stl_epochs, args.stl_batch_size, args.stl_patience),
        data_title="Omniglot, {num_tasks} alphabets", data_label=f"{args.archives} archives", reuse=args.reuse, reuse_only=args.reuse_only,
        skipped=skipped, verbose=args.verbose,
    )
    if args.verbose:
        output = result["output"]
        print()
        print(text_table(*summary_table(result["rows"], len(result["tasks"]))))
        print(f"\ntables: {output}/results.md, {output}/results.csv, {output}/per_task.csv, {output}/results.png")
    return result


if __name__ == "__main__":
    main()
