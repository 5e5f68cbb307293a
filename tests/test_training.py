"""experiments.training: trunks and models built from a TrainConfig."""

import keras
import keras_tuner

from mtl_keras import Task, TaskSet
from mtl_keras.backbones import routing_layers
from mtl_keras.experiments.training import backbone_builder
from mtl_keras.presets import get_preset
from mtl_keras.tuning import SigmaHyperModel

TASKS = TaskSet([Task("a", "multiclass", 3), Task("b", "binary", 1)])


def _norms(backbone):
    return [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_backbone_builder_takes_the_trial_values_and_the_rest_from_the_config():
    config = get_preset("tuning").replace(width=4, depth=2, routing_mode="independent")
    build = backbone_builder(config, (16, 16, 1), len(TASKS))
    trunk = build(sigma=0.25, seed=3)
    assert [l.filters for l in trunk.layers if isinstance(l, keras.layers.Conv2D)] == [4, 8]
    assert len(_norms(trunk)) == 2 and all(l.momentum == 0.9 for l in _norms(trunk))
    routing = routing_layers(trunk)
    assert [(l.sigma, l.seed, l.mode) for l in routing] == [(0.25, 3, "independent"), (0.25, 4, "independent")]
    wide = build(sigma=1.0, seed=3, width=6)
    assert [l.filters for l in wide.layers if isinstance(l, keras.layers.Conv2D)] == [6, 12]


def test_hypermodel_builds_on_it_with_the_config_momentum():
    config = get_preset("tuning").replace(width=4, depth=2)
    hypermodel = SigmaHyperModel(backbone_builder(config, (16, 16, 1), len(TASKS)), TASKS, sigma=[0.5],
                                 widths=(4, 8), seed=config.seed, head_units=(4,))
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    assert hp.values["width"] == 4 and all(l.momentum == 0.9 for l in _norms(model.backbone))
    assert [(l.sigma, l.seed) for l in routing_layers(model.backbone)] == [(0.5, config.seed), (0.5, config.seed + 1)]
