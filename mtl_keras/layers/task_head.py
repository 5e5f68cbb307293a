"""TaskHead: a task's estimator (identical across tasks) and its own output layer."""

import keras

from mtl_keras.layers import stacked_dense


@keras.saving.register_keras_serializable(package="mtl_keras")
class TaskHead(keras.layers.Layer):
    """The per-task head on a shared trunk: an *estimator* and an *output layer*.

    The estimator is a stack of `Dense` layers with the same shape for every
    task (`hidden_units`), so the estimators of different tasks are
    interchangeable: Selective Sharing lets a group of tasks use one
    estimator (`drop_estimator` removes a head's own; `TaskHeads` then feeds
    it the features of the group's estimator) while every task keeps its own
    output layer of `num_outputs` units, since output sizes differ.

    Args:
        num_outputs: width of the task's output (classes, 1 logit, or
            regression targets).
        hidden_units: widths of the estimator's Dense layers; `()` makes the
            head a single output layer.
        activation: activation of the estimator's layers.
        dropout: dropout rate after each estimator layer.
        has_estimator: False for a head whose estimator was dropped in a
            merge (set by `drop_estimator`; stored in the config so a loaded
            model has the same layers as the saved one).
        kernel_regularizer: optional regularizer of every kernel.
        rows: set by `TaskHeads` only: `(estimator, output)` `RowBlock`
            pairs `(kernel, bias)` of its stacked variables; the head's
            layers are then views of those rows (`stacked_dense.Dense`)
            and own no variable. None (a head of its own): `keras.layers.Dense`s.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: features `[batch, features]`.
        training: whether dropout is active.

    Returns:
        Logits `[batch, num_outputs]`.

    Example:

    >>> head = TaskHead(num_outputs=26, hidden_units=(128,))
    >>> head(np.zeros((4, 64), "float32")).shape
    (4, 26)
    """

    def __init__(
        self,
        num_outputs,
        hidden_units=(128,),
        activation="relu",
        dropout=0.0,
        has_estimator=True,
        kernel_regularizer=None,
        rows=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_outputs = int(num_outputs)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        if any(u < 1 for u in self.hidden_units):
            raise ValueError(f"hidden_units must be positive ints, got {hidden_units!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.activation = keras.activations.get(activation)
        self.dropout = float(dropout)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        name = self.name
        self.dropout_layer = keras.layers.Dropout(self.dropout) if self.dropout else None
        if rows is not None:
            estimator, (kernel, bias) = rows
            self.estimator_layers = [stacked_dense.Dense(k, b, name=f"{name}_estimator_{i}")
                                     for i, (k, b) in enumerate(estimator)]
            self.output_layer = stacked_dense.Dense(kernel, bias, name=f"{name}_output")
            self.built = True
            return
        self.estimator_layers = [
            keras.layers.Dense(
                u, kernel_regularizer=self.kernel_regularizer, name=f"{name}_estimator_{i}"
            )
            for i, u in enumerate(self.hidden_units)
        ] if has_estimator else []
        self.output_layer = keras.layers.Dense(
            self.num_outputs, kernel_regularizer=self.kernel_regularizer, name=f"{name}_output"
        )

    @property
    def has_estimator(self):
        return bool(self.estimator_layers) or not self.hidden_units

    def build(self, input_shape):
        if self.built:  # a view of TaskHeads' rows, built with them
            return
        dim = input_shape[-1]
        for layer in self.estimator_layers:
            layer.build((None, dim))
            dim = layer.units
        self.output_layer.build((None, self.hidden_units[-1] if self.hidden_units else dim))
        self.built = True

    def estimate(self, inputs, training=False):
        """Runs the estimator alone: the features the output layer sees."""
        if not self.has_estimator:
            raise ValueError(
                f"TaskHead {self.name!r} shares another head's estimator (its own was dropped "
                "by a merge); run it through its TaskHeads, which routes it to its group's estimator."
            )
        x = inputs
        for layer in self.estimator_layers:
            x = self.activation(layer(x))
            if self.dropout_layer is not None:
                x = self.dropout_layer(x, training=training)
        return x

    def call(self, inputs, training=False):
        return self.output_layer(self.estimate(inputs, training=training))

    def drop_estimator(self):
        """Removes this head's estimator layers (their variables go with them).

        Used when Selective Sharing merges this task into a group whose
        estimator lives in another head.
        """
        # The list is Keras-tracked: clearing it also removes the layers (and
        # their variables) from this layer's sublayers, built or not.
        self.estimator_layers.clear()

    def estimator_variables(self):
        """The estimator's weights, in layer order (kernel, bias, ...): variables, or
        `RowBlock`s of the stacked variables for a head of a `TaskHeads`."""
        return [w for layer in self.estimator_layers for w in (layer.kernel, layer.bias)]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_outputs,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_outputs=self.num_outputs,
            hidden_units=list(self.hidden_units),
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout,
            has_estimator=self.has_estimator,
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
        )
        return config

