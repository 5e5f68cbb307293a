"""Every app ends a user error with one `<app>: error: ...` line and status 2; a bug keeps its traceback.

`mtl_keras.app_errors` in process, then each app as a script on a real bad input.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from mtl_keras.app_errors import EXIT_STATUS, TRACEBACK_VARIABLE, exit_on_user_error
from mtl_keras.callbacks import NonFiniteLossError
from mtl_keras.data.omniglot import OmniglotNotFoundError
from mtl_keras.reporting import ensure_writable_dir

ROOT = Path(__file__).resolve().parents[1]


def _ended_by(error, capsys):
    with pytest.raises(SystemExit) as exit_:
        with exit_on_user_error("app"):
            raise error
    assert exit_.value.code == EXIT_STATUS
    return capsys.readouterr().err


@pytest.mark.parametrize("error, line", [
    (ValueError("sigma must be in [0, 1], got 2."), "app: error: sigma must be in [0, 1], got 2.\n"),
    (NonFiniteLossError("The training loss of task(s) 'a' went NaN."),
     "app: error: The training loss of task(s) 'a' went NaN.\n"),
    (PermissionError(13, "Permission denied", "/x/report.json"), "app: error: Permission denied: /x/report.json\n"),
    (OmniglotNotFoundError("Omniglot archives not found in data_dir=/d: the folder does not exist.\nPut ..."),
     "app: error: Omniglot archives not found in data_dir=/d: the folder does not exist.\nPut ...\n"),
    # A failed graph check: its own message, without the graph trace around it.
    (tf.errors.InvalidArgumentError(None, None, "Graph execution error:\n\nassertion failed: [Task ids must be "
                                                "integers in [0, 2)] [3]\n\t [[{{node Assert}}]]"),
     "app: error: [Task ids must be integers in [0, 2)] [3]\n"),
])
def test_a_user_error_is_one_message_and_status_2(error, line, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)
    assert _ended_by(error, capsys) == line


def test_an_unwritable_folder_names_its_flag(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit):
        with exit_on_user_error("app"):
            ensure_writable_dir(tmp_path / "taken", "--output")
    assert capsys.readouterr().err == (
        f"app: error: Output folder {tmp_path / 'taken'} (given by --output) is a file, not a folder; "
        "choose another path.\n")


@pytest.mark.parametrize("bug", [KeyError("task"), TypeError("unsupported operand"), AssertionError("x"),
                                 RuntimeError("not a user error")])
def test_a_bug_keeps_its_traceback(bug):
    with pytest.raises(type(bug)):
        with exit_on_user_error("app"):
            raise bug


def test_the_traceback_of_a_user_error_on_request(monkeypatch):
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(ValueError, match="bad value"):
        with exit_on_user_error("app"):
            raise ValueError("bad value")


def test_as_a_decorator_it_passes_the_result_through():
    @exit_on_user_error("app")
    def main(argv=None):
        return argv

    assert main(["--x"]) == ["--x"]


# Each app on a real bad input, run as a user runs it. Every input is refused before any training.
APP_CASES = {
    "tune_sigma": (["--data-dir", "{tmp}/absent", "--no-download", "--archives", "small", "--tfds-dir", "{tmp}/tfds",
                    "--output", "{tmp}/run"],
                   "tune_sigma: error: Omniglot archives not found in data_dir={tmp}/absent: the folder does not "
                   "exist."),
    "compare_methods": (["--output", "{tmp}/taken", "--cache-dir", "{tmp}/cache", "--configs", "tr0.5"],
                        "compare_methods: error: Output folder {tmp}/taken (given by --output) is a file, not a "
                        "folder; choose another path."),
    "grouping_benchmark": (["--output", "{tmp}/run", "--noise", "-1", "--no-sweep", "--seeds", "1"],
                           "grouping_benchmark: error: noise must be >= 0, got -1.0."),
    "benchmark": (["--num-tasks", "0", "--quick", "--output", "{tmp}/run"],
                  "benchmark: error: num_tasks (--num-tasks) must be whole numbers >= 1, got [0]."),
    "recipe_ablation": (["--output", "{tmp}/taken", "--seeds", "0"],
                        "recipe_ablation: error: Output folder {tmp}/taken (given by --output) is a file, not a "
                        "folder; choose another path."),
    "train_omniglot": (["--data-dir", "{tmp}/absent", "--no-download", "--archives", "small",
                        "--tfds-dir", "{tmp}/tfds", "--output", "{tmp}/run", "--no-export"],
                       "train_omniglot: error: Omniglot archives not found in data_dir={tmp}/absent: the folder "
                       "does not exist."),
}


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory):
    """Every app of APP_CASES started at once (their imports are most of the time), each in its own folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", TRACEBACK_VARIABLE)}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    runs = {}
    for app, (flags, _) in APP_CASES.items():
        tmp = tmp_path_factory.mktemp(app)
        (tmp / "taken").write_text("someone's file")
        proc = subprocess.Popen([sys.executable, str(ROOT / "apps" / f"{app}.py"), *(f.format(tmp=tmp) for f in flags)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[app] = (proc, tmp)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


@pytest.mark.parametrize("app", sorted(APP_CASES))
def test_each_app_refuses_a_bad_input_with_one_line_and_status_2(app, app_runs):
    proc, tmp = app_runs[app]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STATUS, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if f"{app}: error:" in line]
    assert errors == [APP_CASES[app][1].format(tmp=tmp)], stderr[-3000:]
    assert (tmp / "taken").read_text() == "someone's file"
