"""Training speed and memory of many-task models, against the plain multi-head model.

    python apps/benchmark.py                      # full run (T = 10, 50, 100, 312)
    python apps/benchmark.py --quick              # smoke run (T = 10, 50; a few cases)
    python apps/benchmark.py --output docs/bench  # writes benchmark.json + benchmark.md there
    python apps/benchmark.py --sharing-only --sharing-tasks 10 50   # Selective Sharing alone

Measures, for synthetic data of Omniglot's shape (32x32x1 images, batch 128,
20 classes per task), the training step time (median over the timed steps,
after warm-up steps that include tracing), training examples/s and peak
memory of:

- plain        multi-head model, one shared unrouted trunk (sigma = 1)
- routing      Task Routing (sigma 0.5), one task per example
- plain_k      plain model on several-tasks-per-example data, k tasks per step
- routing_k    Task Routing on the same data, each example routed through k of its tasks
- w:<name>     Task Routing, one task per example, with each registered weighting method
               (with arguments: w:<name>:<argument>=<value>, e.g. w:famo:loss_after_update=next_batch)

at T in {10, 50, 100, 312} tasks, reported as ratios of step time against
the plain model at the same T (routing_k against plain_k, same data). Each
case's FLOP rate (convolutions and dense layers, forward and backward) is
reported against this machine's matmul peak, measured in the same run in
float32 and bfloat16 (`mtl_keras.experiments.efficiency`). It
also tries XLA (`jit_compile=True`) and mixed precision (float16 and
bfloat16) on plain and routing at T = 50, and measures Selective Sharing's
overhead in the train step and its one-pass gradient collection against
per-task tapes (`mtl_keras.experiments.sharing_speed`).

Memory: every case runs in its own Python process; "peak RSS" is that
process's resident-set high-water mark (`ru_maxrss`, which covers
TensorFlow's allocator, unlike `tracemalloc`), and "train RSS" is the part
of it reached after the model was built. On a GPU,
`tf.config.experimental.get_memory_info("GPU:0")["peak"]` is reported too.

Step times are medians, robust to a few slow steps; a machine shared with
other work still inflates them, so compare ratios measured in one run. The
report records the machine's load and the other processes' CPU time while
it ran (its provenance), so a reader can tell. Bad input ends the app with a
line "benchmark: error: ..." and status 2.
"""

import argparse
import dataclasses

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.experiments.benchmark_report import text_report, write_report
from mtl_keras.experiments.benchmarking import (
    FULL_TASKS,
    MODEL_FLAGS,
    BenchmarkSettings,
    resolve_settings,
    run_benchmark,
)
from mtl_keras.experiments.provenance import RunProvenance, run_directory
from mtl_keras.presets import TrainConfig, add_config_arguments, config_from_args, get_preset

# The README's default run: 16 epochs of ceil(22,722 / 128) = 178 batches of the Omniglot training
# split. One predictions check (once, at the default --sharing-epoch) is weighed against it.
DEFAULT_RUN_STEPS = get_preset("default").epochs * -(-22_722 // get_preset("default").batch_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchmarkSettings
    p.add_argument("--quick", action="store_true",
                   help="smoke run: T = 10, 50; plain, routing, plain_k, routing_k and one weighting; 3 timed steps")
    p.add_argument("--num-tasks", type=int, nargs="+", default=None, help=f"task counts (default {FULL_TASKS})")
    p.add_argument("--cases", default=None,
                   help="comma-separated cases (default: plain,routing,plain_k,routing_k and w:<each weighting>)")
    add_config_arguments(p, preset="benchmark", exclude=[f.name for f in dataclasses.fields(TrainConfig)
                                                        if f.name not in MODEL_FLAGS])
    p.add_argument("--classes", type=int, default=d.classes, help="classes per task (Omniglot alphabets: 14-55)")
    p.add_argument("-k", type=int, default=d.k, help="tasks per step for the several-tasks-per-example cases")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 15, quick 3)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (tracing, XLA compilation)")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                   help="also try XLA and mixed precision on plain and routing (default: on, off with --quick)")
    p.add_argument("--variant-tasks", type=int, default=d.variant_tasks)
    # Not `sharing`: that name is TrainConfig's sharing rule, which config_from_args would take.
    p.add_argument("--sharing", dest="measure_sharing", action=argparse.BooleanOptionalAction, default=d.sharing,
                   help="measure Selective Sharing's overhead and one-pass gradient collection")
    p.add_argument("--sharing-tasks", type=int, nargs="+", default=None,
                   help="task counts of the Selective Sharing measurements (default: overhead at 50, or the "
                        "largest --num-tasks; gradient collection at 10 and 50 where in --num-tasks)")
    p.add_argument("--sharing-only", action="store_true", help="measure Selective Sharing only, no cases")
    p.add_argument("--sharing-run-steps", type=int, default=DEFAULT_RUN_STEPS,
                   help="training steps of the run one predictions check is weighed against (default: the "
                        f"README's default Omniglot run, {DEFAULT_RUN_STEPS}; 0: skip that measurement)")
    p.add_argument("--time-budget", type=float, default=d.time_budget,
                   help="stop timing a case after this many seconds of timed steps (at least 2 steps)")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds per case (process start, tracing and steps) before it is killed; a case "
                        "killed or failed at some T is not run at larger T")
    p.add_argument("--memory-limit-mib", type=float, default=None,
                   help="kill a case past this RSS (default: 8 GiB or half the available memory, the smaller)")
    p.add_argument("--peak-sizes", type=int, nargs="+", default=list(d.peak_sizes),
                   help="sides of the square matrices whose best matmul rate is taken as the machine's peak")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="run the grid of cases this many times, round after round; a case's step is the median "
                        "of its rounds (steadier ratios on a machine whose speed drifts)")
    p.add_argument("--output", default=None,
                   help="folder for benchmark.json and benchmark.md (default runs/benchmark/<timestamp>)")
    return p.parse_args(argv)


@exit_on_user_error("benchmark")
def main(argv=None):
    args = parse_args(argv)
    settings = resolve_settings(
        config_from_args(args), quick=args.quick, num_tasks=args.num_tasks,
        cases=args.cases.split(",") if args.cases else None, steps=args.steps, variants=args.variants,
        memory_limit_mib=args.memory_limit_mib, classes=args.classes, k=args.k, warmup=args.warmup,
        variant_tasks=args.variant_tasks, time_budget=args.time_budget, timeout=args.timeout,
        sharing=args.measure_sharing, sharing_tasks=args.sharing_tasks, sharing_only=args.sharing_only,
        sharing_run_steps=args.sharing_run_steps or None, peak_sizes=tuple(args.peak_sizes), rounds=args.rounds,
    )
    output = run_directory("benchmark", args.output)
    report = run_benchmark(settings, RunProvenance(argv, program=__file__))
    print()
    print(text_report(report))
    json_path, md_path = write_report(report, output)
    print(f"\nwrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
