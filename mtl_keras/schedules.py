"""Learning-rate schedules over a whole run.

`WarmupStableDecay` holds the peak learning rate for most of the run and
decays it only at the end (Hu et al., 2024, "MiniCPM"; Hägele et al., 2024,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations"). Against cosine decay, which spends half the run below half
the peak, it keeps a short run learning at full speed while still ending
with the low-learning-rate phase that long runs gain from.

Example:

>>> schedule = WarmupStableDecay(2e-3, total_steps=1000, warmup_steps=30, decay_steps=300)
>>> [round(float(schedule(s)), 5) for s in (0, 15, 30, 500, 850, 1000)]
[0.0, 0.001, 0.002, 0.002, 0.001, 0.0]
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mtl_keras")
class WarmupStableDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0, the peak held, then linear decay to 0 at the last step.

    Args:
        peak_learning_rate: the learning rate between warm-up and decay.
        total_steps: the run's training steps; the rate is 0 from here on.
        warmup_steps: steps of linear warm-up from 0 (0: start at the peak).
        decay_steps: the last steps of the run, over which the rate falls
            linearly to 0 (0: no decay).

    Returns (when called with a step):
        The learning rate, a float32 scalar.
    """

    def __init__(self, peak_learning_rate, total_steps, warmup_steps=0, decay_steps=0, name="warmup_stable_decay"):
        super().__init__()
        total_steps, warmup_steps, decay_steps = int(total_steps), int(warmup_steps), int(decay_steps)
        if not peak_learning_rate > 0:
            raise ValueError(f"peak_learning_rate must be > 0; got {peak_learning_rate!r}.")
        if total_steps < 1 or warmup_steps < 0 or decay_steps < 0 or warmup_steps + decay_steps > total_steps:
            raise ValueError(
                "Need total_steps >= 1 and 0 <= warmup_steps + decay_steps <= total_steps; got "
                f"total_steps={total_steps}, warmup_steps={warmup_steps}, decay_steps={decay_steps}."
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = ops.convert_to_tensor(self.peak_learning_rate, "float32")
        rate = peak
        if self.warmup_steps:
            rate = ops.minimum(rate, peak * step / float(self.warmup_steps))
        if self.decay_steps:
            remaining = float(self.total_steps) - step
            rate = ops.minimum(rate, peak * remaining / float(self.decay_steps))
        return ops.maximum(rate, 0.0)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "name": self.name,
        }
