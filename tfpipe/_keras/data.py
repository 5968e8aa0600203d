"""Private tf.data reads: what a dataset's last transformation is."""

from __future__ import annotations

import tensorflow as tf


def last_transformation(dataset: tf.data.Dataset) -> str:
    """The class name of `dataset`'s last transformation, `with_options` skipped (as
    TensorFlow's `inject_prefetch` rewrite skips it), for example `"_PrefetchDataset"`.

    TensorFlow 2.16-2.21: `with_options` makes an `_OptionsDataset` over `_input_dataset`.
    """
    while type(dataset).__name__ == "_OptionsDataset":
        dataset = dataset._input_dataset
    return type(dataset).__name__
