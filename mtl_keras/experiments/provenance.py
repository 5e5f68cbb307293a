"""Where a result came from: the code, the command, the machine and what else ran beside it.

Every results file the apps write carries a `provenance` record, so a number
in the docs can be traced to a commit and a command, and a timing can be
judged by how loaded the machine was while it ran. On a 2-core machine a
benchmark that overlaps a test suite measures the contention: the record says
so from the machine's own counters (load average, other processes' CPU time)
instead of anyone's memory of it.

Example:

>>> with RunProvenance() as prov:
...     result = train()
>>> write_json("report.json", {"result": result, "provenance": prov.record})
"""

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mtl_keras.reporting import ensure_writable_dir

PACKAGE_ROOT = Path(__file__).resolve().parents[2]

# Another process that used more than this share of one core during the run
# is named as heavy: a test suite, a training job or a benchmark, not a shell.
HEAVY_CPU_SHARE = 0.25


def git_commit(path=PACKAGE_ROOT):
    """`(commit, dirty)` of the checkout holding the package, or `(None, None)` outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def command_line(argv=None, program=None):
    """The command that reproduces this run, e.g. `python apps/benchmark.py --quick`.

    Args:
        argv: the app's arguments (default `sys.argv[1:]`).
        program: the script (default `sys.argv[0]`), shown relative to the
            checkout when it lies inside it.
    """
    program = Path(program or sys.argv[0])
    try:
        program = program.resolve().relative_to(PACKAGE_ROOT)
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", str(program)] + [str(a) for a in args])


def run_directory(kind, output=None, root=None, flag="--output"):
    """The run folder, created and checked writable (`ensure_writable_dir`), before any work is done.

    `output` if given (by the command-line flag `flag`, named in the error),
    else `<root>/<kind>/<timestamp>` (root: `runs/` of the checkout).
    """
    given = output is not None
    if not given:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = Path(root or PACKAGE_ROOT / "runs") / kind / stamp
    return ensure_writable_dir(output, flag if given else None)


def _process_stats():
    """`(pid, name, fields after the name)` of every process readable in /proc (Linux; none elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name is in parentheses and may itself hold spaces.
        yield int(entry.name), stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def _cpu_seconds_by_process():
    """`{pid: (name, user+system CPU seconds)}` of every process readable in /proc."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return {pid: (name, (int(fields[11]) + int(fields[12])) / ticks) for pid, name, fields in _process_stats()}


def _own_process_tree():
    """This process and its descendants (their CPU time is the run's own)."""
    children = {}
    for pid, _, fields in _process_stats():
        children.setdefault(int(fields[1]), []).append(pid)
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(children.get(pid, ()))
    return mine


def machine_description():
    """One line: CPU, cores, GPUs, Python, TensorFlow (and whether its oneDNN kernels are on) and Keras."""
    # Imported here: recording the commit, command and load needs no TensorFlow.
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"{'GPU: ' + ', '.join(g.name for g in gpus) if gpus else 'no GPU'}, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}{_onednn_note()}, "
            f"Keras {keras.__version__}")


def _onednn_note():
    """` (oneDNN on)` / ` (oneDNN off)`: which kernels the CPU ops ran, or nothing if TensorFlow does not say."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own check, not public API
        return " (oneDNN on)" if _pywrap_util_port.IsMklEnabled() else " (oneDNN off)"
    except (ImportError, AttributeError):
        return ""


class RunProvenance:
    """Records a run's provenance: use as a context manager around the measured work.

    `record` (a dict, complete after the `with` block) holds: `git_commit`,
    `git_dirty` (uncommitted changes to tracked files), `command`, `machine`,
    `started`/`finished` (local time), `wall_seconds`, `load_average_before`
    and `load_average_after` (1, 5, 15 minutes), `other_processes_cpu_seconds`
    (CPU time used by every process outside this run's own tree while it ran)
    and `heavy_processes` (those among them above `HEAVY_CPU_SHARE` of one
    core), and `quiet` (see `is_quiet`).

    Args:
        argv: the app's arguments, for `command` (default `sys.argv[1:]`).
        program: the script, for `command` (default `sys.argv[0]`).
    """

    def __init__(self, argv=None, program=None):
        self.record = {"command": command_line(argv, program)}
        commit, dirty = git_commit()
        self.record.update(git_commit=commit, git_dirty=dirty, machine=machine_description())
        self._start = None
        self._cpu_before = {}

    def __enter__(self):
        self._start = time.time()
        self._cpu_before = _cpu_seconds_by_process()
        self.record.update(
            started=datetime.datetime.now().isoformat(timespec="seconds"),
            load_average_before=[round(x, 2) for x in os.getloadavg()],
        )
        return self

    def __exit__(self, *exc):
        self.finish()
        return False

    def finish(self):
        """Completes `record` (called by the `with` block; callable once by hand instead)."""
        wall = time.time() - self._start
        mine = _own_process_tree()
        heavy, others = [], 0.0
        for pid, (name, cpu) in _cpu_seconds_by_process().items():
            if pid in mine:
                continue
            used = cpu - self._cpu_before.get(pid, (name, 0.0))[1]
            if used <= 0:
                continue
            others += used
            if used > HEAVY_CPU_SHARE * wall:
                heavy.append({"pid": pid, "name": name, "cpu_seconds": round(used, 1)})
        self.record.update(
            finished=datetime.datetime.now().isoformat(timespec="seconds"),
            wall_seconds=round(wall, 1),
            load_average_after=[round(x, 2) for x in os.getloadavg()],
            other_processes_cpu_seconds=round(others, 1),
            heavy_processes=sorted(heavy, key=lambda p: -p["cpu_seconds"]),
        )
        self.record["quiet"] = is_quiet(self.record)
        return self.record


def _others_share(record):
    """The CPU time other processes used during the run, as a share of one core."""
    wall = max(record.get("wall_seconds") or 0.0, 1e-9)
    return record.get("other_processes_cpu_seconds", 0.0) / wall


def is_quiet(record, cores=None):
    """Whether a run had the machine to itself: no heavy process beside it and other
    processes together used under a tenth of one core over the run."""
    return not record.get("heavy_processes") and _others_share(record) < 0.1


def describe(record):
    """One sentence for the docs: commit, load before/after and what else ran."""
    heavy = record.get("heavy_processes") or []
    if heavy:
        beside = "beside it ran " + ", ".join(f"{p['name']} ({p['cpu_seconds']} CPU s)" for p in heavy)
    elif not is_quiet(record):
        # Many short processes (a test suite, one-off scripts) are each below
        # the heavy share, yet together they loaded the machine.
        beside = (f"no single process was heavy, but together they used {_others_share(record):.0%} of one "
                  "core on average: the machine was not quiet")
    else:
        beside = "nothing else heavy ran beside it"
    # Processes that started and ended within the run are not seen at all.
    beside += " (processes that started and ended during the run are not counted)"
    commit = (record.get("git_commit") or "unknown")[:10] + (" (uncommitted changes)" if record.get("git_dirty") else "")
    return (f"commit {commit}; load average {record['load_average_before'][0]} before, "
            f"{record['load_average_after'][0]} after; other processes used "
            f"{record['other_processes_cpu_seconds']} CPU s in {record['wall_seconds']} s; {beside}")
