"""Reading CIFAR-10's python batches, which are pickles, without running code. A pickle may
name any function to call as it is read (os.system, say); this reader refuses every name that
such a batch does not hold, so a file that carries code is refused before any of it runs.
(torchvision's CIFAR10 calls pickle.load on these files as they come.)"""

from __future__ import annotations

import pickle
from typing import IO, Any

# What CIFAR-10's python batches are made of, besides dicts, lists, bytes and ints: numpy
# arrays, as numpy pickles them (older numpy named its module numpy.core, newer numpy._core).
_CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}  # fmt: skip


class _PlainUnpickler(pickle.Unpickler):
    """Dicts, lists, bytes, ints and numpy arrays; any other name is refused unread."""

    def find_class(self, module: str, name: str) -> Any:
        current = module.replace("numpy.core.", "numpy._core.", 1)
        if (current, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"it carries code ({module}.{name}), which CIFAR's batches never hold; refused "
                "without running it"
            )
        return super().find_class(current, name)


def load(file: IO[bytes]) -> Any:
    """What the pickle in `file` holds; pickle.UnpicklingError when it names anything else
    (nothing of it has run). Python 2's strings are read as bytes, as CIFAR's keys are."""
    return _PlainUnpickler(file, encoding="bytes").load()
