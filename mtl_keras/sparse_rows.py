"""Sparse row updates: the distinct rows of a gather, with or without XLA.

The heads' weights are stacked variables (`TaskHeads`) from which a step
gathers the rows of its batch's tasks; their gradient is a `tf.IndexedSlices`
over those rows, and `LazyAdam` updates only them. Both want each row once.
`tf.unique` finds them, but its output has a data-dependent size, which XLA
cannot compile; under XLA the rows are summed by a sort instead, into a
static shape padded with zero slices (`sum_duplicate_rows`).
"""

import tensorflow as tf


def in_xla():
    """Whether the function being traced is compiled by XLA (`tf.function(jit_compile=True)`)."""
    if tf.executing_eagerly():
        return False
    # TensorFlow's own test for an XLA context (the graph or one it is nested in).
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def distinct_rows(row):
    """`(rows, slot)`: the distinct entries of `row` and each entry's index into them.

    Under XLA every entry is its own (`rows = row`, `slot = range`), which
    XLA can compile; the duplicates are then summed where it matters
    (`sum_duplicate_rows`).
    """
    if in_xla():
        return row, tf.range(tf.shape(row)[0])
    rows, slot = tf.unique(row)
    return rows, slot


def sum_duplicate_rows(gradient):
    """The rows of a `tf.IndexedSlices` with duplicates summed.

    Returns:
        `(rows, values, valid)`. Eagerly and in graphs: `rows [R]` the
        distinct rows, `values [R, ...]` their summed slices and `valid`
        None. Under XLA, in static shape: `rows` and `values` hold as many
        entries as the slices in, the distinct rows in ascending order then
        padding (row 0, zero values) that `valid [P]` marks False.
    """
    indices = tf.cast(gradient.indices, "int32")
    if not in_xla():
        rows, slot = tf.unique(indices)
        # Already distinct (TaskHeads gathers each row once): tf.unique keeps
        # the order, so the slices are the sums as they are.
        values = tf.cond(tf.size(rows) == tf.size(indices), lambda: gradient.values,
                         lambda: tf.math.unsorted_segment_sum(gradient.values, slot, tf.shape(rows)[0]))
        return rows, values, None
    count = tf.shape(indices)[0]
    order = tf.argsort(indices, stable=True)
    ordered = tf.gather(indices, order)
    first = tf.concat([tf.ones((1,), tf.bool), ordered[1:] != ordered[:-1]], 0)
    segment = tf.cumsum(tf.cast(first, "int32")) - 1
    values = tf.math.unsorted_segment_sum(tf.gather(gradient.values, order), segment, count)
    valid = tf.range(count) < tf.reduce_sum(tf.cast(first, "int32"))
    rows = tf.where(valid, tf.math.unsorted_segment_max(ordered, segment, count), 0)
    return rows, values, valid
