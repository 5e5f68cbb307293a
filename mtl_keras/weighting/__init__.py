"""Loss weighting and gradient combination methods, selectable by name.

| name          | method                           | extra cost per step                                |
| ------------- | -------------------------------- | -------------------------------------------------- |
| `equal`       | mean of the weighted task losses | none                                               |
| `uncertainty` | Kendall et al., CVPR 2018        | none (T learned log-variances)                     |
| `dwa`         | Liu et al., CVPR 2019            | none (per-epoch loss averages)                     |
| `gradnorm`    | Chen et al., ICML 2018           | none (norms w.r.t. the shared features)            |
| `famo`        | Liu et al., NeurIPS 2023         | one forward pass ("same_batch", the paper's) or    |
|               |                                  | none ("next_batch"); O(T) state                    |
| `pcgrad`      | Yu et al., NeurIPS 2020          | per-task trunk gradients: ~1 extra forward+backward |
|               |                                  | ("grouped", trunks without batch norm/dropout) or  |
|               |                                  | ~min(T, pairs) backward passes ("jacobian", any    |
|               |                                  | trunk), `task_chunk_size` of them at a time        |
| `cagrad`      | Liu et al., NeurIPS 2021         | as `pcgrad`, plus a T x T solve                    |

Gradient methods take `every_n_steps=k` to pay for per-task gradients on
every k-th step only, and `task_chunk_size` to bound the memory of the
`"jacobian"` route whatever T; see `mtl_keras.weighting.task_gradients`.

Example:

>>> MultiTaskModel(backbone, tasks, weighting="pcgrad")
>>> available_weightings()
['cagrad', 'dwa', 'equal', 'famo', 'gradnorm', 'pcgrad', 'uncertainty']
"""

from mtl_keras.weighting.base import (
    EqualWeighting,
    Weighting,
    available_weightings,
    get_weighting,
    register_weighting,
)
from mtl_keras.weighting.cagrad import CAGrad, cagrad_combine
from mtl_keras.weighting.dwa import DynamicWeightAverage, dwa_weights
from mtl_keras.weighting.famo import FAMO, famo_logit_gradient, famo_loss_weights
from mtl_keras.weighting.gradnorm import GradNorm, gradnorm_weight_gradient
from mtl_keras.weighting.pcgrad import PCGrad, pcgrad_combine
from mtl_keras.weighting.uncertainty import UncertaintyWeighting
