"""Search the sharing ratio sigma (and optionally width, learning rate) on Omniglot with KerasTuner.

    python apps/tune_sigma.py                                   # Bayesian optimisation, 10 trials
    python apps/tune_sigma.py --archives small --trials 4 --epochs 2   # about a minute
    python apps/tune_sigma.py --tuner hyperband --widths 16 32 --lr-range 3e-4 3e-3

Objective: `val_mean_accuracy`, the mean over alphabets of each alphabet's
validation accuracy, as the model logs it. Trials are kept in
`<output>/tuner/` (KerasTuner's directory): run the same command with the
same --output again to resume an interrupted search (--overwrite starts
over). At the end the best trial's model is reloaded from its checkpoint
(routing masks are weights, so it routes exactly as trained: the app checks
that it reproduces the trial's score), evaluated on the test split and saved.

--epochs is each trial's budget (Hyperband: the largest); --lr the learning
rate when --lr-range is not given. Data, model and training defaults are the
"tuning" preset (mtl_keras.presets).

Writes into --output (default runs/tune_sigma/<timestamp>): tuning.json
(every trial, the best hyperparameters, the reload check, per-alphabet test
accuracy, provenance), objective_vs_sigma.png, best_model.keras and
TensorBoard logs of each trial under tensorboard/. Bad input (missing or
corrupt archives, a folder that cannot be written, trials ending in a NaN
loss) ends the app with a line "tune_sigma: error: ..." and status 2.
"""

import argparse
import time

import mtl_keras  # noqa: F401  (first: sets TensorFlow's environment defaults before it loads)
import keras

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.data.omniglot_flags import add_omniglot_arguments, load_omniglot_from_args
from mtl_keras.distribute import get_strategy, prepare_for_replicas
from mtl_keras.experiments.provenance import RunProvenance, run_directory
from mtl_keras.experiments.training import backbone_builder
from mtl_keras.presets import add_config_arguments, config_from_args
from mtl_keras.reporting import per_task, write_json
from mtl_keras.tuning import (
    OBJECTIVE_NAME, TUNERS, SigmaHyperModel, check_best_model, check_saved_model, make_tuner, plot_objective,
    search, trials_table, trials_text_table,
)

# Searched, or fixed by the search: not flags of this app.
NOT_FLAGS = ("sigma", "head_dropout", "weighting", "sharing", "sharing_epoch", "sharing_options", "jit_compile",
             "precision", "optimizer")  # the tuner's hypermodel builds and compiles its own models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, preset="tuning", exclude=NOT_FLAGS)
    add_omniglot_arguments(p)
    s = p.add_argument_group("search")
    s.add_argument("--tuner", choices=TUNERS, default="bayesian")
    s.add_argument("--trials", type=int, default=10, help="trials (Bayesian / random; Hyperband sizes its own)")
    s.add_argument("--sigma-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    s.add_argument("--sigma-step", type=float, default=None, help="search sigma on a grid of this step")
    s.add_argument("--widths", type=int, nargs="*", default=None,
                   help="also tune the first block's filters over these values (else --width)")
    s.add_argument("--lr-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="also tune the learning rate, log-uniformly in [LOW, HIGH] (else --lr)")
    s.add_argument("--executions-per-trial", type=int, default=1,
                   help="train each trial this many times (different initial weights) and average the "
                        "objective: trial-to-trial noise is large on short budgets")
    s.add_argument("--overwrite", action="store_true", help="start the search afresh instead of resuming")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="run folder (default runs/tune_sigma/<timestamp>); reuse to resume")
    o.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras fit verbosity per trial")
    return p.parse_args(argv)


def run_search(args, config, output):
    """Runs (or resumes) the search, checks and saves the best model; returns the report."""
    started = time.time()
    strategy = get_strategy(config.strategy)
    data = load_omniglot_from_args(args, config)
    # --batch-size is the global batch; with several replicas no replica
    # may get an empty batch (see prepare_for_replicas).
    train = prepare_for_replicas(data.train, config.batch_size, strategy, training=True)
    validation = prepare_for_replicas(data.validation, config.batch_size, strategy)
    test = prepare_for_replicas(data.test, config.batch_size, strategy)
    tasks = data.tasks
    print(f"Omniglot: {len(tasks)} alphabets, {data.num_examples} examples; "
          f"{args.tuner} search over sigma in [{args.sigma_range[0]}, {args.sigma_range[1]}]"
          + (f", width in {args.widths}" if args.widths else "")
          + (f", learning rate in {args.lr_range}" if args.lr_range else ""))

    hypermodel = SigmaHyperModel(
        backbone_builder(config, (config.image_size, config.image_size, 1), len(tasks)), tasks,
        sigma=tuple(args.sigma_range), sigma_step=args.sigma_step, widths=args.widths or None,
        learning_rate=tuple(args.lr_range) if args.lr_range else config.lr, seed=config.seed,
        head_units=config.head_units, head_dropout=config.head_dropout, weighting=config.weighting,
    )
    tuner = make_tuner(
        args.tuner, hypermodel, output / "tuner", project_name="sigma",
        max_trials=args.trials, max_epochs=config.epochs, seed=config.seed, overwrite=args.overwrite,
        executions_per_trial=args.executions_per_trial,
        distribution_strategy=None if config.strategy == "default" else strategy,
    )
    done_before = sum(1 for t in trials_table(tuner) if t["score"] is not None)
    if done_before:
        print(f"Resuming the search in {output / 'tuner'}: {done_before} trial(s) already done.")
    search(tuner, train, validation_data=validation, epochs=config.epochs, verbose=args.verbose,
           callbacks=[keras.callbacks.TensorBoard(str(output / "tensorboard"))])
    search_seconds = time.time() - started

    trials = trials_table(tuner)
    model, check = check_best_model(tuner, validation, strict=True)
    model_path = output / "best_model.keras"
    check.update(check_saved_model(model, model_path, next(iter(data.validation))[0]))
    test_logs = model.evaluate(test, return_dict=True, verbose=0)
    plot_path = plot_objective(trials, output / "objective_vs_sigma.png",
                               title=f"Omniglot, {len(tasks)} alphabets: {args.tuner} search ({len(trials)} trials)")
    return {
        "app": "tune_sigma", "tuner": args.tuner, "objective": OBJECTIVE_NAME, "tasks": len(tasks),
        "archives": args.archives, "epochs_per_trial": config.epochs, "seed": config.seed,
        "best_hyperparameters": trials[0]["hyperparameters"], "best_val_mean_accuracy": trials[0]["score"],
        "best_trial_id": trials[0]["trial_id"], "reload_check": check,
        "test_mean_accuracy": test_logs["mean_accuracy"], "test_accuracy": per_task(test_logs, tasks, "accuracy"),
        "trials": trials, "tuner_directory": str(output / "tuner"), "best_model_path": str(model_path),
        "plot_path": str(plot_path), "wall_time_seconds": round(time.time() - started, 1),
        "search_seconds": round(search_seconds, 1),
    }


@exit_on_user_error("tune_sigma")
def main(argv=None):
    args = parse_args(argv)
    config = config_from_args(args)
    keras.utils.set_random_seed(config.seed)
    output = run_directory("tune_sigma", args.output)
    with RunProvenance(argv, __file__) as provenance:
        report = run_search(args, config, output)
    report.update(command=provenance.record["command"], provenance=provenance.record)
    write_json(output / "tuning.json", report)

    best = report["best_hyperparameters"]
    print()
    print(trials_text_table(report["trials"], width=config.width))
    print(f"\nbest sigma {best['sigma']:.3f}: {OBJECTIVE_NAME} {report['best_val_mean_accuracy']:.4f}, "
          f"test mean accuracy {report['test_mean_accuracy']:.4f} (reloaded model reproduces its trial: "
          f"{report['reload_check']['match']}) | {report['wall_time_seconds']:.0f} s")
    print(f"report: {output / 'tuning.json'}\nplot: {report['plot_path']}")
    return report


if __name__ == "__main__":
    main()
