"""Where one training step of the benchmark model spends its time, by kind of op.

Builds one case of `apps/benchmark.py` (the `benchmark` preset's model on
synthetic data), warms it up, records `--steps` training steps with
TensorFlow's profiler and sums the ops' durations by kind: convolutions,
matmuls, pooling, data movement (gathers, stacks, transposes), the
optimizer's update, and the remaining elementwise ops and reductions
(batch norm, ReLU, routing masks, losses). Writes `profile.json` and
`profile.md` (with the run's provenance) into `--output`; the raw
TensorFlow profile stays in `--output`/trace for TensorBoard.

    python apps/profile_step.py --case routing --num-tasks 50 --output runs/profile

Run it alone: other work on the machine changes where time goes. Bad input
ends the app with a line "profile_step: error: ..." and status 2.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import mtl_keras  # noqa: F401  (first: sets TensorFlow's environment defaults before it loads)
import keras

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.experiments import benchmarking, op_profile
from mtl_keras.experiments.provenance import RunProvenance, describe, run_directory
from mtl_keras.presets import PRECISIONS, TrainConfig, add_config_arguments, config_from_args
from mtl_keras.reporting import markdown_table, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="routing",
                   help="plain, routing, plain_k, routing_k or w:<weighting>[:<argument>=<value>...] "
                        "(as apps/benchmark.py)")
    p.add_argument("--num-tasks", type=int, default=50, help="task count T")
    add_config_arguments(p, preset="benchmark", exclude=[f.name for f in dataclasses.fields(TrainConfig)
                                                        if f.name not in benchmarking.MODEL_FLAGS])
    p.add_argument("--precision", default=TrainConfig.precision, choices=PRECISIONS, help="Keras dtype policy")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile the step")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (tracing)")
    p.add_argument("--top", type=int, default=15, help="single ops listed")
    p.add_argument("--output", default=None, help="folder (default runs/profile_step/<timestamp>)")
    return p.parse_args(argv)


def report_markdown(report):
    s = report["summary"]
    rows = [[k, f"{v['ms_per_call']:.1f}", f"{v['share']:.1%}"] for k, v in s["kinds"].items()]
    ops = [[o["op"], o["type"], o["kind"], f"{o['ms_per_call']:.2f}"] for o in s["top_ops"]]
    return "\n".join([
        f"# Where a training step goes: {report['case']}, T = {report['num_tasks']}, {report['precision']}"
        + (" + XLA" if report["jit_compile"] else ""),
        "",
        f"Command: `{report['provenance']['command']}`",
        "",
        f"Provenance: {describe(report['provenance'])}.",
        "",
        f"{s['calls']} profiled steps: {s['wall_ms_per_call']:.1f} ms of wall time per step, "
        f"{s['op_ms_per_call']:.1f} ms of op time (two executor threads can run ops at once); "
        f"the step's counted FLOPs ran at {report['gflops_per_second']:.1f} GFLOP/s.",
        "",
        markdown_table(rows, ["kind", "op ms per step", "share of op time"]),
        "",
        markdown_table(ops, ["op", "type", "kind", "ms per step"]),
        "",
    ])


@exit_on_user_error("profile_step")
def main(argv=None):
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.num_tasks < 1:
        raise ValueError(f"--steps, --warmup and --num-tasks must be >= 1, got {args.steps}, {args.warmup}, "
                        f"{args.num_tasks}.")
    settings = benchmarking.resolve_settings(config_from_args(args), num_tasks=[args.num_tasks])
    # Refuses an unknown case or weighting before any model is built.
    benchmarking.plan(dataclasses.replace(settings, cases=[args.case], variants=False))
    spec = benchmarking.case_spec(settings, args.case, args.num_tasks, args.precision, args.jit_compile)
    output = run_directory("profile_step", args.output)
    provenance = RunProvenance(argv, program="apps/profile_step.py")
    with provenance:
        keras.utils.set_random_seed(0)
        model = benchmarking.case_model(spec)
        data = benchmarking.make_data(spec)
        model.fit(data, epochs=1, steps_per_epoch=args.warmup, verbose=0, recalibrate_batch_norm=False)
        iterator = iter(data)
        xplane, wall = op_profile.profile_calls(model.train_function, (iterator,), args.steps,
                                                str(Path(output) / "trace"))
        summary = op_profile.summarize(op_profile.op_times(xplane), args.steps, wall, top=args.top,
                                       optimizer_scope=model.optimizer.name + "/")
        flops = benchmarking.case_flops_per_step(model, spec)
    report = {"case": args.case, "num_tasks": args.num_tasks, "precision": args.precision,
              "jit_compile": args.jit_compile, "summary": summary, "train_flops_per_step": flops,
              "gflops_per_second": flops / (summary["wall_ms_per_call"] / 1e3) / 1e9,
              "xplane": str(xplane), "provenance": provenance.record}
    write_json(Path(output) / "profile.json", report)
    md = report_markdown(report)
    (Path(output) / "profile.md").write_text(md)
    print(md)
    print(f"wrote {output}/profile.json, profile.md ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
