"""Training speed and memory of many-task models, against the plain multi-head model.

    python apps/benchmark.py                      # full run (T = 10, 50, 100, 312)
    python apps/benchmark.py --quick              # smoke run (T = 10, 50; a few cases)
    python apps/benchmark.py --output docs/bench  # also writes benchmark.json + benchmark.md

Measures, for synthetic data of Omniglot's shape (32x32x1 images, batch 128,
20 classes per task), the training step time (median over the timed steps,
after warm-up steps that include tracing), training examples/s and peak
memory of:

- plain        multi-head model, one shared unrouted trunk (sigma = 1)
- routing      Task Routing (sigma 0.5), one task per example (the trunk
               runs once per example, routed by that example's task)
- plain_k      plain model on several-tasks-per-example data, k tasks per step
- routing_k    Task Routing on the same data: each example is routed
               through k of its tasks (the trunk runs k times per example)
- w:<name>     Task Routing, one task per example, with each registered
               weighting method (`mtl_keras.weighting.available_weightings()`)

at T in {10, 50, 100, 312} tasks, reported as ratios of step time against
the plain model at the same T (routing_k against plain_k, same data). It
also tries XLA (`jit_compile=True`) and mixed precision (float16 and
bfloat16) on plain and routing at T = 50, and, when `benchmarks/sharing_speed.py`
is importable, the Selective Sharing overhead and one-pass gradient collection
against per-task tapes.

Memory: every case runs in its own Python process; "peak RSS" is that
process's resident-set high-water mark (`ru_maxrss`, which covers
TensorFlow's allocator, unlike `tracemalloc`), and "train RSS" is the part
of it reached after the model was built (peak minus the RSS before building
the model, i.e. without the interpreter, TensorFlow and the data). On a GPU,
`tf.config.experimental.get_memory_info("GPU:0")["peak"]` is reported too.

Step times are medians, robust to a few slow steps; a machine shared with
other work still inflates them, so compare ratios measured in one run.
"""

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FULL_TASKS = (10, 50, 100, 312)
QUICK_TASKS = (10, 50)
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
TARGET_ROUTING_OVERHEAD = 0.10  # routing step <= 1.10 x plain at T = 50
TARGET_TASK_SCALING = 2.0  # routing step at T = 312 <= 2 x at T = 10
TARGET_SHARING_SLOWDOWN = 0.05  # issue 3: Selective Sharing's collector <= 5% slower at T = 50
TARGET_COLLECTION_SPEEDUP = 10.0  # issue 3: one-pass collection >= 10x cheaper than per-task tapes at T = 50


# ------------------------------------------------------------------ worker
def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def make_data(spec):
    """Synthetic batches of Omniglot's shape, repeated; labels uniform over the classes."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    b, s, t, c = spec["batch_size"], spec["image_size"], spec["num_tasks"], spec["classes"]
    n = b * 4
    image = rng.random((n, s, s, 1), dtype=np.float32)
    if spec["data"] == "per_example":
        x = {"image": image, "task": rng.integers(0, t, n).astype("int32")}
        y = rng.integers(0, c, n).astype("int32")
    else:  # several tasks per example: every example labelled for every task
        x = {"image": image}
        y = rng.integers(0, c, (n, t)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(b, drop_remainder=True).cache().repeat()
    return ds.prefetch(2)


def run_case(spec):
    """Builds, warms up and times one model in this process; returns a result dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone, vgg_filters

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(spec["precision"])
    ds = make_data(spec)
    rss_before = _rss_kib()
    tasks = TaskSet([Task(f"task_{i}", "multiclass", spec["classes"]) for i in range(spec["num_tasks"])])
    backbone = conv_backbone(
        (spec["image_size"], spec["image_size"], 1), len(tasks), sigma=spec["sigma"],
        filters=vgg_filters(spec["width"], spec["depth"]), seed=0,
    )
    model = MultiTaskModel(backbone, tasks, head_units=spec["head_units"], weighting=spec["weighting"],
                           tasks_per_step=spec["tasks_per_step"], seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=spec["jit_compile"])

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)
            timed = self.times[warmup:]
            # Slow methods (T backward passes) get fewer timed steps, not hours.
            if len(timed) >= 2 and sum(timed) > spec["time_budget"]:
                self.model.stop_training = True

    timer = StepTimer()
    warmup, steps = spec["warmup"], spec["steps"]
    started = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, callbacks=[timer], verbose=0, shuffle=False)
    total = time.perf_counter() - started
    timed = np.array(timer.times[warmup:])
    if timed.size == 0:
        raise RuntimeError("no timed step ran; raise --steps")
    step = float(np.median(timed))
    pairs = spec["batch_size"] * (spec["tasks_per_step"] if spec["data"] == "multi" else 1)
    result = {
        "step_seconds": step,
        "step_seconds_mean": float(timed.mean()),
        "step_seconds_min": float(timed.min()),
        "first_step_seconds": float(timer.times[0]),  # includes tracing / XLA compilation
        "timed_steps": int(timed.size),
        "examples_per_second": spec["batch_size"] / step,
        "pairs_per_second": pairs / step,
        "parameters": int(model.count_params()),
        "wall_seconds": total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_model_mib": rss_before / 1024,
    }
    result["train_rss_mib"] = result["peak_rss_mib"] - result["rss_before_model_mib"]
    if tf.config.list_physical_devices("GPU"):
        result["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return result


def run_sharing(spec):
    """The Selective Sharing benchmarks of `benchmarks/sharing_speed.py`, if present."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sharing_speed

    def call(fn, *args, **quick):
        # --quick: fewer steps/repeats, for whichever of them the function takes.
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in quick.items() if k in params} if spec.get("quick") else {}
        return fn(*args, **kwargs)

    out = {"overhead": call(sharing_speed.sharing_overhead, spec["num_tasks"], steps=8, rounds=2)}
    for t in spec["collection_tasks"]:
        out[f"collection_vs_naive_T{t}"] = call(sharing_speed.collection_vs_naive, t, repeats=3)
    return out


def worker_main(spec_json):
    spec = json.loads(spec_json)
    try:
        result = run_sharing(spec) if spec.get("kind") == "sharing" else run_case(spec)
        result["ok"] = True
    except Exception as e:  # reported in the table, the benchmark goes on
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print("BENCHMARK_RESULT " + json.dumps(result, default=float), flush=True)


# ------------------------------------------------------------------ parent
def _child_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_in_subprocess(spec, timeout, memory_limit_mib):
    """Runs one case in a fresh process; kills it past `timeout` s or `memory_limit_mib` RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    started = time.time()
    killed = None
    while proc.poll() is None:
        time.sleep(0.25)
        if time.time() - started > timeout:
            killed = f"timeout after {timeout:.0f} s"
        elif _child_rss_mib(proc.pid) > memory_limit_mib:
            killed = f"over the memory limit of {memory_limit_mib:.0f} MiB"
        if killed:
            proc.kill()
            break
    stdout, stderr = proc.communicate()
    if killed:
        return {"ok": False, "error": f"killed: {killed}"}
    for line in stdout.splitlines():
        if line.startswith("BENCHMARK_RESULT "):
            return json.loads(line[len("BENCHMARK_RESULT "):])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"worker exited with code {proc.returncode}: {tail[:300]}"}


def case_spec(args, case, num_tasks, precision="float32", jit_compile=False):
    weighting = case[2:] if case.startswith("w:") else None
    multi = case in ("plain_k", "routing_k")
    return {
        "case": case,
        "num_tasks": num_tasks,
        "sigma": 1.0 if case.startswith("plain") else args.sigma,
        "weighting": weighting,
        "data": "multi" if multi else "per_example",
        "tasks_per_step": min(args.k, num_tasks) if multi else 1,
        "precision": precision,
        "jit_compile": jit_compile,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "classes": args.classes,
        "width": args.width,
        "depth": args.depth,
        "head_units": args.head_units,
        "warmup": args.warmup,
        "steps": args.steps,
        "time_budget": args.time_budget,
    }


def reference_case(case):
    return "plain_k" if case == "routing_k" else "plain"


def plan(args):
    """The list of case specs of this run."""
    from mtl_keras.weighting import available_weightings

    if args.cases:
        cases = args.cases.split(",")
    else:
        cases = ["plain", "routing", "plain_k", "routing_k"]
        cases += [f"w:{w}" for w in available_weightings() if w != "equal"]
    for c in cases:
        if c not in ("plain", "routing", "plain_k", "routing_k") and not c.startswith("w:"):
            raise SystemExit(f"Unknown case {c!r}: use plain, routing, plain_k, routing_k or w:<weighting>.")
        if c.startswith("w:") and c[2:] not in available_weightings():
            raise SystemExit(f"Unknown weighting in case {c!r}; available: {available_weightings()}.")
    specs = [case_spec(args, c, t) for t in args.num_tasks for c in cases]
    if args.variants:
        t = args.variant_tasks if args.variant_tasks in args.num_tasks else args.num_tasks[0]
        for c in ("plain", "routing"):
            for precision in PRECISIONS:
                for jit in (False, True):
                    if precision == "float32" and not jit:
                        continue  # the main grid has it
                    specs.append(case_spec(args, c, t, precision, jit))
    return specs


def variant_name(spec):
    v = spec["precision"] + (" +XLA" if spec["jit_compile"] else "")
    return v


def add_ratios(results):
    """Adds `ratio` (step time / reference step time) to every successful case."""
    ref = {}
    for r in results:
        if r["ok"] and r["precision"] == "float32" and not r["jit_compile"]:
            ref[(r["case"], r["num_tasks"])] = r["step_seconds"]
    for r in results:
        if not r["ok"]:
            continue
        base = ref.get((reference_case(r["case"]), r["num_tasks"]))
        r["ratio_vs_reference"] = r["step_seconds"] / base if base else None
        plain = ref.get(("plain", r["num_tasks"]))
        r["ratio_vs_plain"] = r["step_seconds"] / plain if plain else None
        same = ref.get((r["case"], r["num_tasks"]))
        r["ratio_vs_float32"] = r["step_seconds"] / same if same else None
    return results


def targets(results):
    """The issue's two speed targets, from the float32, no-XLA cases."""
    get = {(r["case"], r["num_tasks"]): r for r in results
           if r["ok"] and r["precision"] == "float32" and not r["jit_compile"]}
    out = {}
    if ("routing", 50) in get and ("plain", 50) in get:
        overhead = get[("routing", 50)]["step_seconds"] / get[("plain", 50)]["step_seconds"] - 1
        out["routing_overhead_T50"] = {"value": overhead, "target": f"<= {TARGET_ROUTING_OVERHEAD:.0%}",
                                       "met": overhead <= TARGET_ROUTING_OVERHEAD, "kind": "percent"}
    ts = sorted(t for c, t in get if c == "routing")
    if len(ts) >= 2:
        lo, hi = ts[0], ts[-1]
        scaling = get[("routing", hi)]["step_seconds"] / get[("routing", lo)]["step_seconds"]
        out[f"routing_step_T{hi}_over_T{lo}"] = {"value": scaling, "target": f"<= {TARGET_TASK_SCALING:g}x",
                                                 "met": scaling <= TARGET_TASK_SCALING, "kind": "ratio"}
    return out


def sharing_targets(sharing):
    """Issue 3's targets from `benchmarks/sharing_speed.py`'s dicts, when present."""
    out = {}
    if not sharing or not sharing.get("ok"):
        return out
    overhead = sharing.get("overhead") or {}
    if "slowdown" in overhead:
        t = overhead.get("num_tasks", "?")
        at50 = t == 50
        out[f"sharing_slowdown_T{t}"] = {
            "value": overhead["slowdown"], "kind": "percent",
            "target": f"<= {TARGET_SHARING_SLOWDOWN:.0%}" if at50 else "set at T=50 only",
            "met": overhead["slowdown"] <= TARGET_SHARING_SLOWDOWN if at50 else None,
        }
    for key, d in sharing.items():
        if key.startswith("collection_vs_naive") and isinstance(d, dict) and "naive_over_one_pass" in d:
            t = d.get("num_tasks", "?")
            target = TARGET_COLLECTION_SPEEDUP if t == 50 else None
            out[f"collection_naive_over_one_pass_T{t}"] = {
                "value": d["naive_over_one_pass"], "kind": "ratio",
                "target": f">= {TARGET_COLLECTION_SPEEDUP:g}x" if target else "set at T=50 only",
                "met": d["naive_over_one_pass"] >= target if target else None,
            }
    return out


def _target_value(t):
    return f"{t['value']:+.1%}" if t.get("kind") == "percent" else f"{t['value']:.2f}x"


def _met(t, yes="yes", no="NO"):
    return "–" if t["met"] is None else (yes if t["met"] else no)


def fastest_variant(results):
    """Per case at the variant T: which precision / XLA setting has the shortest step."""
    out = {}
    variants = [r for r in results if r["ok"] and (r["precision"] != "float32" or r["jit_compile"])]
    if not variants:
        return out
    t = variants[0]["num_tasks"]
    for case in ("plain", "routing"):
        mine = [r for r in results if r["ok"] and r["case"] == case and r["num_tasks"] == t]
        if mine:
            best = min(mine, key=lambda r: r["step_seconds"])
            out[case] = {"num_tasks": t, "fastest": variant_name(best), "step_seconds": best["step_seconds"],
                         "speedup_vs_float32": 1.0 / best["ratio_vs_float32"] if best.get("ratio_vs_float32") else None}
    return out


def _fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def markdown(report):
    from mtl_keras.reporting import markdown_table

    rows = []
    for r in report["results"]:
        name = r["case"] if r["case"] != "plain_k" and r["case"] != "routing_k" else f"{r['case']} (k={r['tasks_per_step']})"
        if r["ok"]:
            rows.append([name, r["num_tasks"], variant_name(r), f"{r['step_seconds'] * 1000:.0f}",
                         f"{r['examples_per_second']:.0f}", _fmt(r.get("ratio_vs_reference"), ".3f"),
                         _fmt(r.get("ratio_vs_plain"), ".3f"), f"{r['peak_rss_mib']:.0f}",
                         f"{r['train_rss_mib']:.0f}", f"{r['parameters']:,}"])
        else:
            rows.append([name, r["num_tasks"], variant_name(r), "failed", r["error"], "", "", "", "", ""])
    headers = ["case", "T", "precision", "step (ms)", "examples/s", "× reference", "× plain",
               "peak RSS (MiB)", "train RSS (MiB)", "parameters"]
    lines = [
        "| target | measured | target | met |",
        "|---|---|---|---|",
    ]
    for name, t in report["targets"].items():
        lines.append(f"| {name} | {_target_value(t)} | {t['target']} | {_met(t)} |")
    text = [
        "# Training speed and memory",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Load average at start: {report['load_at_start']}, "
        f"at end: {report['load_at_end']}.",
        "",
        f"Setup: {report['setup']}",
        "",
        "## Targets",
        "",
        "\n".join(lines),
        "",
        "## Step time, throughput and memory",
        "",
        "`× reference` = step time / the plain model's at the same T on the same data (plain_k for "
        "routing_k); `× plain` = / the plain model's on one-task-per-example data. Step time: median "
        "over the timed steps. Peak RSS: the case's process high-water mark (`ru_maxrss`); train "
        "RSS: the part reached after building the model.",
        "",
        markdown_table(rows, headers),
        "",
    ]
    if report["fastest"]:
        text += ["## XLA and mixed precision", ""]
        for case, f in report["fastest"].items():
            text.append(f"- {case} at T={f['num_tasks']}: fastest is **{f['fastest']}** "
                        f"({f['step_seconds'] * 1000:.0f} ms/step, {_fmt(f['speedup_vs_float32'])}x the float32 step).")
        text.append("")
    if report.get("sharing"):
        text += ["## Selective Sharing", "", sharing_lines(report["sharing"], markdown=True), ""]
    return "\n".join(text)


def sharing_lines(sharing, markdown=False):
    if not sharing.get("ok", True):
        return f"benchmarks/sharing_speed.py failed: {sharing.get('error')}"
    lines = []
    for name, d in sharing.items():
        if not isinstance(d, dict):
            continue
        ratios = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in ratios.items())
        lines.append(f"- {name}: {shown}" if markdown else f"  {name}: {shown}")
    return "\n".join(lines)


def text_report(report):
    from mtl_keras.reporting import text_table

    rows = []
    for r in report["results"]:
        if r["ok"]:
            rows.append([r["case"], r["num_tasks"], variant_name(r), f"{r['step_seconds'] * 1000:.0f}",
                         f"{r['examples_per_second']:.0f}", _fmt(r.get("ratio_vs_reference"), ".3f"),
                         f"{r['peak_rss_mib']:.0f}"])
        else:
            rows.append([r["case"], r["num_tasks"], variant_name(r), "failed", r["error"][:60], "", ""])
    out = [text_table(rows, ["case", "T", "precision", "step ms", "examples/s", "x reference", "peak RSS MiB"])]
    for name, t in report["targets"].items():
        out.append(f"target {name}: {_target_value(t)} (target {t['target']}): {_met(t, 'met', 'NOT met')}")
    for case, f in report["fastest"].items():
        out.append(f"fastest {case} at T={f['num_tasks']}: {f['fastest']} ({_fmt(f['speedup_vs_float32'])}x float32)")
    if report.get("sharing"):
        out.append("selective sharing (benchmarks/sharing_speed.py):")
        out.append(sharing_lines(report["sharing"]))
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: T = 10, 50; plain, routing, plain_k, routing_k and one weighting; 3 timed steps")
    p.add_argument("--num-tasks", type=int, nargs="+", default=None, help=f"task counts (default {FULL_TASKS})")
    p.add_argument("--cases", default=None,
                   help="comma-separated cases (default: plain,routing,plain_k,routing_k and w:<each weighting>)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=20, help="classes per task (Omniglot alphabets: 14-55)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-units", type=int, nargs="*", default=[128])
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("-k", type=int, default=4, help="tasks per step for the several-tasks-per-example cases")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 15, quick 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, XLA compilation)")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                   help="also try XLA and mixed precision on plain and routing (default: on, off with --quick)")
    p.add_argument("--variant-tasks", type=int, default=50)
    p.add_argument("--sharing", action=argparse.BooleanOptionalAction, default=True,
                   help="run benchmarks/sharing_speed.py if it exists")
    p.add_argument("--time-budget", type=float, default=15,
                   help="stop timing a case after this many seconds of timed steps (at least 2 steps)")
    p.add_argument("--timeout", type=float, default=420,
                   help="seconds per case (process start, tracing and steps) before it is killed; a case "
                        "killed or failed at some T is not run at larger T")
    p.add_argument("--memory-limit-mib", type=float, default=None,
                   help="kill a case past this RSS (default: 8 GiB or half the available memory, the smaller)")
    p.add_argument("--output", default=None, help="folder for benchmark.json and benchmark.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.num_tasks = args.num_tasks or list(QUICK_TASKS)
        args.steps = args.steps or 3
        args.variants = False if args.variants is None else args.variants
        if args.cases is None:
            from mtl_keras.weighting import available_weightings

            extra = [w for w in ("pcgrad", "uncertainty") if w in available_weightings()][:1]
            args.cases = ",".join(["plain", "routing", "plain_k", "routing_k"] + [f"w:{w}" for w in extra])
    args.num_tasks = args.num_tasks or list(FULL_TASKS)
    args.steps = args.steps or 15
    args.variants = True if args.variants is None else args.variants
    if args.memory_limit_mib is None:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        args.memory_limit_mib = min(8192.0, 0.5 * avail / 1024)
    return args


def machine():
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"{'GPU: ' + ', '.join(g.name for g in gpus) if gpus else 'no GPU'}, "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return None
    specs = plan(args)
    load_start = os.getloadavg()
    started = time.time()
    print(f"{len(specs)} cases, each in its own process; T = {args.num_tasks}", flush=True)
    results = []
    failed_at = {}
    for i, spec in enumerate(specs):
        key = (spec["case"], spec["precision"], spec["jit_compile"])
        if key in failed_at and spec["num_tasks"] > failed_at[key]:
            r = {"ok": False, "error": f"skipped: failed at T={failed_at[key]}"}
        else:
            r = run_in_subprocess(spec, args.timeout, args.memory_limit_mib)
            if not r["ok"]:
                failed_at[key] = spec["num_tasks"]
        results.append({**spec, **r})
        status = (f"{r['step_seconds'] * 1000:7.0f} ms/step {r['examples_per_second']:7.0f} ex/s "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB" if r["ok"] else f"FAILED {r['error']}")
        print(f"[{time.time() - started:5.0f} s] {i + 1}/{len(specs)} {spec['case']:<16} T={spec['num_tasks']:<4} "
              f"{variant_name(spec):<22} {status}", flush=True)
    add_ratios(results)
    sharing = None
    sharing_file = ROOT / "benchmarks" / "sharing_speed.py"
    if args.sharing and sharing_file.exists():
        collection = [t for t in (10, 50) if t in args.num_tasks] or [min(args.num_tasks)]
        spec = {"kind": "sharing", "num_tasks": 50 if 50 in args.num_tasks else max(args.num_tasks),
                "collection_tasks": collection, "quick": args.quick}
        sharing = run_in_subprocess(spec, args.timeout * 2, args.memory_limit_mib)
        print("selective sharing benchmark:", "done" if sharing.get("ok") else sharing.get("error"), flush=True)
    command = "python apps/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command.strip(),
        "machine": machine(),
        "load_at_start": [round(x, 2) for x in load_start],
        "load_at_end": [round(x, 2) for x in os.getloadavg()],
        "setup": (f"synthetic data, {args.image_size}x{args.image_size}x1 images, batch {args.batch_size}, "
                  f"{args.classes} classes per task, VGG width {args.width} depth {args.depth}, head units "
                  f"{args.head_units}, Task Routing sigma {args.sigma}, k = {args.k} tasks per step for the "
                  f"*_k cases, Adam, {args.warmup} warm-up + {args.steps} timed steps per case"),
        "wall_seconds": round(time.time() - started, 1),
        "results": results,
        "targets": {**targets(results), **sharing_targets(sharing)},
        "fastest": fastest_variant(results),
        "sharing": sharing,
    }
    print()
    print(text_report(report))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        from mtl_keras.reporting import write_json

        write_json(out / "benchmark.json", report)
        (out / "benchmark.md").write_text(markdown(report), encoding="utf-8")
        print(f"\nwrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    main()
