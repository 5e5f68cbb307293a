"""A benchmark report (`benchmarking.run_benchmark`) as benchmark.json, benchmark.md and terminal text."""

from pathlib import Path

from mtl_keras.experiments.benchmarking import variant_name
from mtl_keras.experiments.provenance import describe
from mtl_keras.reporting import markdown_table, text_table, write_json

CASE_HEADERS = ["case", "T", "precision", "step (ms)", "examples/s", "× reference", "× plain",
                "peak RSS (MiB)", "train RSS (MiB)", "parameters", "GFLOP/s (of peak)"]


def _fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def _target_value(t):
    if t.get("kind") == "percent":
        return f"{t['value']:+.1%}"
    if t.get("kind") == "fraction":
        return f"{t['value']:.1%}"
    if t.get("kind") == "mib":
        return f"{t['value']:,.0f} MiB"
    return f"{t['value']:.2f}x"


def _met(t, yes="yes", no="NO"):
    return "–" if t["met"] is None else (yes if t["met"] else no)


def sharing_lines(sharing, markdown=False):
    """One line per Selective Sharing measurement: its numbers, `name = value`."""
    if not sharing.get("ok", True):
        return f"the Selective Sharing measurement failed: {sharing.get('error')}"
    lines = []
    for name, d in sharing.items():
        if not isinstance(d, dict):
            continue
        ratios = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in ratios.items())
        lines.append(f"- {name}: {shown}" if markdown else f"  {name}: {shown}")
    return "\n".join(lines)


def _flop_rate(r):
    if "achieved_flops_per_second" not in r:
        return "–"
    share = f" ({r['fraction_of_peak']:.0%})" if r.get("fraction_of_peak") is not None else ""
    return f"{r['achieved_flops_per_second'] / 1e9:.0f}{share}"


def peak_line(peak):
    """The measured matmul peaks, one sentence."""
    if not peak:
        return ""
    if not peak.get("ok"):
        return f"The matmul peak measurement failed: {peak.get('error')}."
    rates = ", ".join(f"{d} {v['flops_per_second'] / 1e9:.0f} GFLOP/s" for d, v in peak.items() if isinstance(v, dict))
    float32 = peak["float32"]
    sizes = ", ".join(f"{n}²" for n in float32.get("by_size", {float32["size"]: None}))
    return (f"Matmul peak of this machine, measured in this run (the best of {sizes} matrices; float32 best at "
            f"{float32['size']}²): {rates}.")


def markdown(report):
    """The report as Markdown: provenance, targets, the case table, variants, Selective Sharing."""
    rows = []
    for r in report["results"]:
        name = f"{r['case']} (k={r['tasks_per_step']})" if r["case"] in ("plain_k", "routing_k") else r["case"]
        if r["ok"]:
            rows.append([name, r["num_tasks"], variant_name(r), f"{r['step_seconds'] * 1000:.0f}",
                         f"{r['examples_per_second']:.0f}", _fmt(r.get("ratio_vs_reference"), ".3f"),
                         _fmt(r.get("ratio_vs_plain"), ".3f"), f"{r['peak_rss_mib']:.0f}",
                         f"{r['train_rss_mib']:.0f}", f"{r['parameters']:,}", _flop_rate(r)])
        else:
            rows.append([name, r["num_tasks"], variant_name(r), "failed", r["error"], "", "", "", "", "", ""])
    lines = ["| target | measured | target | met |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        lines.append(f"| {name} | {_target_value(t)} | {t['target']} | {_met(t)} |")
    text = [
        "# Training speed and memory",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}.",
        "",
        f"Provenance: {describe(report['provenance'])}.",
        "",
        f"Setup: {report['setup']}",
        "",
        "## Targets",
        "",
        "\n".join(lines),
        "",
    ]
    if rows:
        text += [
            "## Step time, throughput and memory",
            "",
            "`× reference` = step time / the plain model's at the same T on the same data (plain_k for "
            "routing_k); `× plain` = / the plain model's on one-task-per-example data. Step time: median "
            "over the timed steps. Peak RSS: the case's process high-water mark (`ru_maxrss`); train "
            "RSS: the part reached after building the model. GFLOP/s: the convolutions' and dense layers' "
            "multiply-adds a step needs (forward and backward, `mtl_keras.experiments.efficiency`) per second, "
            "and in brackets as a share of the matmul peak of the case's compute type.",
            "",
            peak_line(report.get("matmul_peak")),
            "",
            markdown_table(rows, CASE_HEADERS),
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


def text_report(report):
    """A short terminal summary: the case table, targets, fastest variants, Selective Sharing, provenance."""
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
        out.append("selective sharing:")
        out.append(sharing_lines(report["sharing"]))
    out.append(f"provenance: {describe(report['provenance'])}")
    return "\n".join(out)


def write_report(report, output):
    """Writes `benchmark.json` and `benchmark.md` into the folder `output`; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "benchmark.json", output / "benchmark.md"
    write_json(json_path, report)
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path
