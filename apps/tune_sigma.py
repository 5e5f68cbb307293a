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

Writes into --output (default runs/tune_sigma/<timestamp>): tuning.json
(every trial, the best hyperparameters, the reload check, per-alphabet test
accuracy), objective_vs_sigma.png, best_model.keras and TensorBoard logs of
each trial under tensorboard/.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from mtl_keras import conv_backbone, routing_layers, vgg_filters  # noqa: E402
from mtl_keras.data import OMNIGLOT_DIR_ENV, load_omniglot  # noqa: E402
from mtl_keras.distribute import STRATEGIES, get_strategy, prepare_for_replicas  # noqa: E402
from mtl_keras.reporting import per_task, text_table, write_json  # noqa: E402
from mtl_keras.tuning import (  # noqa: E402
    OBJECTIVE_NAME,
    TUNERS,
    SigmaHyperModel,
    check_best_model,
    make_tuner,
    plot_objective,
    trials_table,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None,
                   help=f"folder with the Omniglot zips (or set {OMNIGLOT_DIR_ENV}); default: the usual places")
    d.add_argument("--archives", choices=("full", "small"), default="full",
                   help="'full' = 50 alphabets; 'small' = the 8 alphabets of the _small zips (quick runs)")
    d.add_argument("--tfds-dir", default=None, help="where the prepared TFDS dataset is cached")
    d.add_argument("--tasks", type=int, default=None, help="use the first K alphabets (default: all)")
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--batch-size", type=int, default=64,
                   help="smaller than the training app's default: short trials need more steps")
    s = p.add_argument_group("search")
    s.add_argument("--tuner", choices=TUNERS, default="bayesian")
    s.add_argument("--trials", type=int, default=10, help="trials (Bayesian / random; Hyperband sizes its own)")
    s.add_argument("--epochs", type=int, default=4, help="epochs per trial (Hyperband: the largest budget)")
    s.add_argument("--sigma-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    s.add_argument("--sigma-step", type=float, default=None, help="search sigma on a grid of this step")
    s.add_argument("--widths", type=int, nargs="*", default=None,
                   help="also tune the first block's filters over these values")
    s.add_argument("--lr", type=float, default=2e-3, help="fixed learning rate (when --lr-range is not given)")
    s.add_argument("--lr-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="also tune the learning rate, log-uniformly in [LOW, HIGH]")
    s.add_argument("--executions-per-trial", type=int, default=1,
                   help="train each trial this many times (different initial weights) and average the "
                        "objective: trial-to-trial noise is large on short budgets")
    s.add_argument("--overwrite", action="store_true", help="start the search afresh instead of resuming")
    m = p.add_argument_group("model")
    m.add_argument("--width", type=int, default=32, help="filters of the first block when --widths is not given")
    m.add_argument("--depth", type=int, default=4)
    m.add_argument("--routing-mode", choices=("partition", "independent"), default="partition")
    m.add_argument("--bn-momentum", type=float, default=0.9,
                   help="batch-norm moving-average momentum (Keras' 0.99 needs several hundred steps before "
                        "validation accuracy means anything; short trials need less)")
    m.add_argument("--head-units", type=int, nargs="*", default=[128])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--strategy", choices=STRATEGIES, default="default",
                   help="tf.distribute strategy for every trial (see mtl_keras.distribute)")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="run folder (default runs/tune_sigma/<timestamp>); reuse to resume")
    o.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras fit verbosity per trial")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    keras.utils.set_random_seed(args.seed)
    output = Path(args.output or ROOT / "runs" / "tune_sigma" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    output.mkdir(parents=True, exist_ok=True)
    strategy = get_strategy(args.strategy)

    data = load_omniglot(
        data_dir=args.data_dir, tasks=args.tasks, image_size=args.image_size, batch_size=args.batch_size,
        tfds_dir=args.tfds_dir, archives=args.archives, seed=args.seed,
    )
    # --batch-size is the global batch; with several replicas no replica
    # may get an empty batch (see prepare_for_replicas).
    train = prepare_for_replicas(data.train, args.batch_size, strategy, training=True)
    validation = prepare_for_replicas(data.validation, args.batch_size, strategy)
    test = prepare_for_replicas(data.test, args.batch_size, strategy)
    tasks = data.tasks
    input_shape = (args.image_size, args.image_size, 1)
    print(f"Omniglot: {len(tasks)} alphabets, {data.num_examples} examples; "
          f"{args.tuner} search over sigma in [{args.sigma_range[0]}, {args.sigma_range[1]}]"
          + (f", width in {args.widths}" if args.widths else "")
          + (f", learning rate in {args.lr_range}" if args.lr_range else ""))

    def build_backbone(sigma, seed, width=args.width):
        backbone = conv_backbone(input_shape, len(tasks), sigma=sigma, filters=vgg_filters(width, args.depth),
                                 routing_mode=args.routing_mode, seed=seed)
        # Trials are short: with Keras' default momentum (0.99) the moving
        # statistics used in validation are still mostly their initial
        # values after a few epochs of a small dataset, and every trial
        # scores chance. The momentum is part of each layer's config, so
        # saved models keep it.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = args.bn_momentum
        return backbone

    hypermodel = SigmaHyperModel(
        build_backbone, tasks,
        sigma=tuple(args.sigma_range), sigma_step=args.sigma_step,
        widths=args.widths or None,
        learning_rate=tuple(args.lr_range) if args.lr_range else args.lr,
        seed=args.seed, head_units=args.head_units,
    )
    tuner = make_tuner(
        args.tuner, hypermodel, output / "tuner", project_name="sigma",
        max_trials=args.trials, max_epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
        executions_per_trial=args.executions_per_trial,
        distribution_strategy=None if args.strategy == "default" else strategy,
    )
    done_before = sum(1 for t in trials_table(tuner) if t["score"] is not None)
    if done_before:
        print(f"Resuming the search in {output / 'tuner'}: {done_before} trial(s) already done.")
    tuner.search(
        train, validation_data=validation, epochs=args.epochs, verbose=args.verbose,
        callbacks=[keras.callbacks.TensorBoard(str(output / "tensorboard"))],
    )
    search_seconds = time.time() - started

    trials = trials_table(tuner)
    best_hp = trials[0]["hyperparameters"]
    model, check = check_best_model(tuner, validation)
    if not check["match"]:
        raise RuntimeError(
            f"The reloaded best model scores {check['reloaded_score']:.6f} on validation, but its trial scored "
            f"{check['trial_score']:.6f} (expected {check['check'].replace('_', ' ')}): the checkpoint did not "
            "restore the trained model."
        )
    model_path = output / "best_model.keras"
    model.save(model_path)
    reloaded = keras.models.load_model(model_path)
    probe = next(iter(data.validation))[0]
    same_masks = all(np.array_equal(a.masks, b.masks) for a, b in
                     zip(routing_layers(model.backbone), routing_layers(reloaded.backbone)))
    same_outputs = bool(np.allclose(model.predict(probe, verbose=0), reloaded.predict(probe, verbose=0), atol=1e-5))
    test_logs = model.evaluate(test, return_dict=True, verbose=0)
    plot_path = plot_objective(
        trials, output / "objective_vs_sigma.png",
        title=f"Omniglot, {len(tasks)} alphabets: {args.tuner} search ({len(trials)} trials)",
    )

    report = {
        "app": "tune_sigma",
        "tuner": args.tuner,
        "objective": OBJECTIVE_NAME,
        "tasks": len(tasks),
        "archives": args.archives,
        "epochs_per_trial": args.epochs,
        "seed": args.seed,
        "best_hyperparameters": best_hp,
        "best_val_mean_accuracy": trials[0]["score"],
        "best_trial_id": trials[0]["trial_id"],
        "reload_check": {**check, "keras_file_same_masks": same_masks, "keras_file_same_outputs": same_outputs},
        "test_mean_accuracy": test_logs["mean_accuracy"],
        "test_accuracy": per_task(test_logs, tasks, "accuracy"),
        "trials": trials,
        "tuner_directory": str(output / "tuner"),
        "best_model_path": str(model_path),
        "plot_path": str(plot_path),
        "wall_time_seconds": round(time.time() - started, 1),
        "search_seconds": round(search_seconds, 1),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    write_json(output / "tuning.json", report)

    rows = []
    for t in trials:
        hp = t["hyperparameters"]
        rows.append([t["trial_id"], f"{hp['sigma']:.3f}", hp.get("width", args.width),
                     f"{hp['learning_rate']:.2e}", "-" if t["score"] is None else f"{t['score']:.4f}"])
    print()
    print(text_table(rows, ["trial", "sigma", "width", "learning rate", OBJECTIVE_NAME]))
    print(f"\nbest sigma {best_hp['sigma']:.3f}: {OBJECTIVE_NAME} {trials[0]['score']:.4f}, "
          f"test mean accuracy {test_logs['mean_accuracy']:.4f} (reloaded model reproduces its trial: "
          f"{check['match']}) | {report['wall_time_seconds']:.0f} s")
    print(f"report: {output / 'tuning.json'}\nplot: {plot_path}")
    return report


if __name__ == "__main__":
    main()
