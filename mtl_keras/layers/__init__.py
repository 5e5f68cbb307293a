"""Custom Keras layers of mtl-keras."""

from mtl_keras.layers.closed_form_batch_norm import ClosedFormBatchNormalization
from mtl_keras.layers.same_conv import SameConv2D
from mtl_keras.layers.task_head import TaskHead
from mtl_keras.layers.task_heads import TaskHeads
from mtl_keras.layers.task_routing import TaskRouting, routing_masks
