"""Atomic saves: a `.keras` or `.weights.h5` file is written beside its target, then renamed.

Design: Keras 3 writes checkpoints in place (it truncates the target, then writes), so a
process killed half-way through `ModelCheckpoint` or `BackupAndRestore` destroys the previous
good file. While tfpipe runs a fit, the model's `save` and `save_weights` write to a temporary
file in the same folder (keeping the suffix Keras checks) and `os.replace` it over the target,
which is atomic on POSIX and Windows: the target is always either the old or the new file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import keras

from tfpipe._keras import lend_methods

_SAVES = ("save", "save_weights")


def _atomic(save: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(filepath: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(filepath, (str, os.PathLike)) or "://" in os.fspath(filepath):
            return save(filepath, *args, **kwargs)  # remote file systems: Keras as it is
        path = os.fspath(filepath)
        folder, name = os.path.split(path)
        temporary = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
        try:
            result = save(temporary, *args, **kwargs)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return result

    return wrapped


@contextlib.contextmanager
def atomic_saves(model: keras.Model) -> Iterator[None]:
    """Makes `model.save` and `model.save_weights` atomic while active."""
    with lend_methods(model, {name: _atomic(getattr(model, name)) for name in _SAVES}):
        yield
