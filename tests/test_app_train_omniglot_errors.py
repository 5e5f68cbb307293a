"""apps/train_omniglot.py refuses what cannot succeed: a clear message, exit status 2, no report, no export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apps import train_omniglot
from small_archives import small_omniglot_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One prepared small-archive dataset for the runs of this module."""
    return tmp_path_factory.mktemp("tfds")


def small_run(tfds_dir, out, *flags):
    return [
        "--data-dir", str(small_omniglot_dir()), "--archives", "small", "--tfds-dir", str(tfds_dir),
        "--tasks", "2", "--epochs", "1", "--image-size", "8", "--width", "4", "--depth", "2",
        "--head-units", "8", "--output", str(out / "run"), "--export-dir", str(out / "saved"), "--verbose", "0",
        *flags,
    ]


def assert_nothing_written(out):
    assert not (out / "run" / "report.json").exists()
    assert not (out / "run" / "model.keras").exists()
    # The export root is created (and checked writable) before training; no
    # version, finished or staged, may appear in it.
    assert not (out / "saved").exists() or not any((out / "saved").iterdir())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--lr=-1e-3"], "argument --lr: must be > 0, got -1e-3"),
        (["--image-size", "0"], "argument --image-size: must be > 0, got 0"),
        (["--image-size=-8"], "argument --image-size: must be > 0, got -8"),
        (["--batch-size", "0"], "argument --batch-size: must be > 0, got 0"),
        (["--sigma", "1.5"], r"sigma (the sharing ratio) must be a number in [0, 1], got 1.5"),
        (["--sigma", "nan"], r"sigma (the sharing ratio) must be a number in [0, 1], got nan"),
        (["--head-dropout", "1"], r"--head-dropout must be a number in [0, 1), got 1.0"),
        (["--decay-fraction", "1.5"], r"--decay-fraction must be a number in [0, 1], got 1.5"),
        (["--warmup-fraction", "1"], r"--warmup-fraction must be a number in [0, 1), got 1.0"),
        (["--label-smoothing", "1"], r"--label-smoothing must be a number in [0, 1), got 1.0"),
        (["--sharing", "similarity"], "--sharing similarity merges the task heads' estimators, and the heads "
                                      "have none: add --head-units 128"),
        (["--sharing-options", "proposal=threshold"], "--sharing-options proposal=threshold has no sharing to "
                                                      "go to: add --sharing predictions"),
        (["--sharing", "predictions", "--head-units", "8", "--sharing-options", "proposl=threshold"],
         "--sharing-options: 'proposl' is not an option of Selective Sharing here; use some of ["),
        (["--sharing", "predictions", "--head-units", "8", "--sharing-options", "proposal=nearest"],
         "Unknown proposal 'nearest'"),
        (["--sharing", "predictions", "--head-units", "8", "--sharing-options", "proposal"],
         "bad option 'proposal'; write each option as <argument>=<value>"),
    ],
)
def test_flags_out_of_range_are_argparse_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        train_omniglot.parse_args(flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_nan_loss_ends_the_run_with_its_tasks_named_and_no_report_or_export(tfds_dir, tmp_path):
    """--lr 1e30 blows the weights up at the first step; the second step's losses are NaN."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "train_omniglot.py"), *small_run(tfds_dir, tmp_path, "--lr", "1e30")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_omniglot: error: The training loss of task(s) ")
    assert "'Balinese'" in last and "went NaN or infinite in epoch 1" in last and "must not be used or exported" in last
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path)


def test_fewer_training_examples_than_one_global_batch_on_two_replicas(tfds_dir, tmp_path, capsys):
    # conftest.py gives this process two logical CPUs, so "mirrored" has 2 replicas.
    with pytest.raises(SystemExit) as exit_:
        train_omniglot.main(small_run(tfds_dir, tmp_path, "--strategy", "mirrored", "--batch-size", "4096"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "train_omniglot: error: The training data has 644 examples, fewer than one global batch of 4096 "
        "(2 replica(s)), so no step would run: use a batch size of at most 644 (a multiple of 2; --batch-size), "
        "more data (e.g. more --tasks), or one replica."
    )
    assert_nothing_written(tmp_path)


def test_missing_archives_end_the_run_with_the_data_modules_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_omniglot.main(small_run(tmp_path / "tfds", tmp_path, "--data-dir", str(tmp_path / "absent"),
                                      "--no-download"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("train_omniglot: error: Omniglot archives not found in data_dir=")
    assert_nothing_written(tmp_path)
