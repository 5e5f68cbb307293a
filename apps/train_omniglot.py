"""Train a many-task model on Omniglot: one task per alphabet (50 tasks by default).

    python apps/train_omniglot.py                       # all 50 alphabets, hard sharing (sigma 1)
    python apps/train_omniglot.py --tasks 10 --epochs 3 --sigma 0.5   # Task Routing

Writes into --output (default runs/omniglot/<timestamp>): TensorBoard logs,
report.json (per-task test accuracy by alphabet, mean, parameters, sigma,
seed, wall time, export path, provenance), accuracy.png, and exports a
SavedModel for TF Serving to saved_models/omniglot/<version>/ (--export-dir
to change). Data, model and training defaults are the "default" preset
(mtl_keras.presets). A run that cannot succeed (a NaN loss, bad data, missing
archives, a folder that cannot be written) prints why in a line
"train_omniglot: error: ..." and exits with status 2, with no report and no
export (mtl_keras.app_errors).
"""

import argparse
import tempfile
import time
from pathlib import Path

import mtl_keras  # noqa: F401  (first: sets TensorFlow's environment defaults before it loads)
import keras

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.data.omniglot import serving_preprocessing
from mtl_keras.data.omniglot_flags import add_omniglot_arguments, load_omniglot_from_args
from mtl_keras.distribute import (
    BackupAndRestore, backup_dir_for_worker, enable_determinism, epoch_stream, get_strategy, is_chief,
    prepare_for_replicas, resume_epoch, train_steps,
)
from mtl_keras.experiments.provenance import RunProvenance, run_directory
from mtl_keras.experiments.reports import task_table, training_report
from mtl_keras.experiments.training import build_model
from mtl_keras.export import export_for_serving
from mtl_keras.input_checks import require_one_global_batch
from mtl_keras.plots import plot_task_bars
from mtl_keras.presets import add_config_arguments, config_from_args
from mtl_keras.progress import CompactProgbar
from mtl_keras.reporting import ensure_writable_dir, write_json
from mtl_keras.sharing import selective_sharing, sharing_options
from mtl_keras.tensorboard import MultiTaskTensorBoard

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, preset="default")
    add_omniglot_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="run folder (default runs/omniglot/<timestamp>)")
    o.add_argument("--export-dir", default=str(ROOT / "saved_models" / "omniglot"),
                   help="SavedModel root for TF Serving; the next integer version is created inside")
    o.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    o.add_argument("--backup-dir", default=None,
                   help="BackupAndRestore folder: a killed run, started again with the same command, "
                        "resumes after its last finished epoch")
    o.add_argument("--deterministic", action="store_true",
                   help="deterministic TensorFlow ops: a resumed run ends with exactly the weights of an "
                        "uninterrupted one (may be slower)")
    o.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    args = p.parse_args(argv)
    # Refused here, before minutes of data preparation (the ranges of the
    # config's flags are checked as they are parsed, see mtl_keras.presets).
    if args.sharing != "none" and not args.head_units:
        p.error(f"--sharing {args.sharing} merges the task heads' estimators, and the heads have "
                "none: add --head-units 128 (an estimator of 128 units per task)")
    if args.sharing_options:
        if args.sharing == "none":
            p.error(f"--sharing-options {args.sharing_options} has no sharing to go to: add --sharing "
                    "predictions (or a grouping rule)")
        try:
            sharing_options(args.sharing, args.sharing_options)
        except ValueError as e:
            p.error(str(e))
    return args


def train_and_export(args, config, strategy, output, started):
    """Trains, evaluates, saves and exports; returns the report, the folder written to and the tasks."""
    chief = is_chief(strategy)
    data = load_omniglot_from_args(args, config)
    print(f"Omniglot: {len(data.tasks)} alphabets, {data.num_examples} examples, "
          f"{config.image_size}x{config.image_size} images")
    require_one_global_batch(data.num_examples["train"], config.batch_size, strategy.num_replicas_in_sync)
    train = prepare_for_replicas(data.train, config.batch_size, strategy, training=True)
    steps = train_steps(data.num_examples["train"], config.batch_size, strategy)
    validation = prepare_for_replicas(data.validation, config.batch_size, strategy)
    test = prepare_for_replicas(data.test, config.batch_size, strategy)
    # Seeded again here: preparing the data set on a first run draws from
    # the global RNGs, and the initial weights must not depend on whether it did.
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config, data.tasks, (config.image_size, config.image_size, 1), name="omniglot_mtl",
                            steps_per_epoch=steps)
    params_before = model.count_params()
    print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s) | {params_before:,} parameters | "
          f"sigma {config.sigma} | weighting {config.weighting} | sharing {config.sharing}")

    # Non-chief workers of a multi-worker job log aside; the chief's logs are the run's.
    tensorboard_dir = output / "tensorboard" if chief else Path(tempfile.mkdtemp(prefix="mtl_worker_tb_"))
    callbacks = [
        keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)),
        MultiTaskTensorBoard(str(tensorboard_dir), config={k: v for k, v in vars(args).items() if k != "_preset"}),
        CompactProgbar(),
    ]
    # Each worker backs up into its own folder; Selective Sharing's record of
    # merges goes beside that worker's BackupAndRestore state.
    backup_dir = backup_dir_for_worker(args.backup_dir, strategy) if args.backup_dir else None
    # A resumed run reads on from where the killed one's last finished epoch ended; batch
    # norm is re-estimated on a fresh pass, the same whether the run was resumed or not.
    one_pass = train
    train = epoch_stream(train, steps, start_epoch=resume_epoch(backup_dir) if backup_dir else 0)
    sharing = None
    if config.sharing != "none":
        # The probe is drawn from the validation split the same way on every
        # worker and in a resumed run, so all of them group on the same evidence;
        # the refit inputs come from the training split's first (seeded) pass,
        # the same on every worker, so the refitted weights agree between them.
        sharing = selective_sharing(
            config.sharing, validation=data.validation, train=data.train,
            start_epoch=min(config.sharing_epoch, config.epochs),
            log_dir=str(tensorboard_dir), plot_dir=str(output), backup_dir=backup_dir, seed=config.seed,
            verbose=int(args.verbose > 0), **sharing_options(config.sharing, config.sharing_options),
        )
        callbacks.insert(0, sharing)
    if backup_dir:
        callbacks.append(BackupAndRestore(backup_dir))
    history = model.fit(train, steps_per_epoch=steps, validation_data=validation, epochs=config.epochs,
                        callbacks=callbacks, verbose=args.verbose, shuffle=False, recalibrate_batch_norm=one_pass)
    train_seconds = time.time() - started
    test_logs = model.evaluate(test, return_dict=True, verbose=0)
    if not chief:
        # Multi-worker: every worker trained the same weights; only the chief writes.
        output = run_directory("omniglot", output / f"worker_{strategy.cluster_resolver.task_id}")
    model_path = output / "model.keras"
    model.save(model_path)
    export_path = None
    if not args.no_export and chief:
        # With the preprocessing, the export also takes the image files as they are (serving_bytes).
        export_path = export_for_serving(model, args.export_dir,
                                         preprocessing=serving_preprocessing(config.image_size))
        print(f"SavedModel for TF Serving: {export_path}")
    report = training_report(
        "train_omniglot", config, model, test_logs, history, strategy=strategy, parameters_at_start=params_before,
        sharing=sharing.report() if sharing is not None else None, num_examples=data.num_examples,
        train_seconds=train_seconds, wall_seconds=time.time() - started, export_path=export_path,
        model_path=model_path,
    )
    return report, output, data.tasks


@exit_on_user_error("train_omniglot")
def main(argv=None):
    args = parse_args(argv)
    config = config_from_args(args)
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    strategy = get_strategy(config.strategy)
    started = time.time()
    keras.utils.set_random_seed(config.seed)
    if args.deterministic:
        enable_determinism()
    # Folders that cannot be written fail now, not after the training they would hold.
    output = run_directory("omniglot", args.output)
    if not args.no_export:
        ensure_writable_dir(args.export_dir, "--export-dir")
    if args.backup_dir:
        ensure_writable_dir(args.backup_dir, "--backup-dir")
    with RunProvenance(argv, __file__) as provenance:
        report, output, tasks = train_and_export(args, config, strategy, output, started)
    report.update(command=provenance.record["command"], provenance=provenance.record)
    plot_task_bars(report["test_accuracy"], output / "accuracy.png",
                   title=f"Omniglot per-alphabet test accuracy (sigma={config.sigma}, "
                         f"mean {report['mean_test_accuracy']:.3f})",
                   reference=report["chance_accuracy"], reference_label="chance")
    write_json(output / "report.json", report)

    print()
    print(task_table(report, tasks, task_label="alphabet"))
    print(f"\nmean test accuracy {report['mean_test_accuracy']:.4f} over {len(tasks)} alphabets | "
          f"parameters {report['parameters']:,} | sigma {config.sigma} | seed {config.seed} | "
          f"{report['wall_time_seconds']:.0f} s")
    print(f"report: {output / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
