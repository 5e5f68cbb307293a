"""Presets are the one source of the apps' defaults; flags are made from them."""

import argparse

import pytest

from mtl_keras.presets import PRESETS, TrainConfig, add_config_arguments, config_from_args, get_preset


def _parse(argv, **kwargs):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, **kwargs)
    return config_from_args(parser.parse_args(argv))


def test_flags_default_to_the_preset():
    assert _parse([]) == get_preset("default") == TrainConfig()
    tuning = _parse([], preset="tuning")
    assert tuning == PRESETS["tuning"]
    assert (tuning.bn_momentum, tuning.batch_size, tuning.epochs) == (0.9, 64, 4)


def test_flags_override_and_types():
    config = _parse(["--epochs", "3", "--head-units", "64", "32", "--sigma", "1", "--no-jit-compile",
                     "--routing-mode", "independent"])
    assert config.epochs == 3 and config.head_units == (64, 32) and config.sigma == 1.0
    assert config.routing_mode == "independent" and config.jit_compile is False


def test_groups_and_exclusions_keep_the_preset_value():
    config = _parse([], groups=("data",), preset="comparison")
    assert config.bn_momentum == 0.9
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, groups=("data",), exclude=("tasks",))
    with pytest.raises(SystemExit):
        parser.parse_args(["--tasks", "3"])


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--lr", "-1"], ["--image-size", "0"],
                                  ["--batch-size", "-4"], ["--routing-mode", "x"], ["--weighting", "nope"],
                                  ["--augment-shift", "-0.1"], ["--label-smoothing", "nan"],
                                  ["--warmup-fraction", "-1"], ["--lr-schedule", "step"], ["--sigma", "2"],
                                  ["--head-dropout", "1"], ["--decay-fraction", "x"]])
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert "argument" in capsys.readouterr().err


def test_unknown_preset():
    with pytest.raises(ValueError, match="available"):
        get_preset("nope")


def test_build_model_follows_the_config():
    import keras

    from mtl_keras import Task, TaskSet
    from mtl_keras.experiments.training import build_model

    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "binary", 1)])
    config = get_preset("default").replace(width=4, depth=2, head_units=(8,), bn_momentum=0.8, lr=0.01, sigma=0.5)
    model = build_model(config.replace(lr_schedule="constant"), tasks, (16, 16, 1), name="m")
    norms = [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 2 and all(l.momentum == 0.8 for l in norms)
    assert model.task_heads.hidden_units == (8,) and abs(float(model.optimizer.learning_rate) - 0.01) < 1e-9
    hard = build_model(config.replace(lr_schedule="constant"), tasks, (16, 16, 1), sigma=1.0)
    assert not hard.routed and model.routed


def test_zero_turns_augmentation_and_smoothing_off():
    config = _parse(["--augment-shift", "0", "--augment-rotation", "0", "--augment-scale", "0",
                     "--label-smoothing", "0", "--warmup-fraction", "0"])
    assert not config.augmentation().enabled and config.label_smoothing == 0.0
    on = _parse(["--augment-shift", "0.1", "--augment-rotation", "5", "--augment-scale", "0"])
    assert (on.augmentation().shift, on.augmentation().rotation, on.augmentation().enabled) == (0.1, 5.0, True)
