"""distnum: exact central-difference gradients for the chapter-4 network, sharded over Ray."""

from distnum.data import load_mnist
from distnum.models import SimpleNet, TwoLayerNet

__all__ = ["SimpleNet", "TwoLayerNet", "TrainConfig", "load_mnist", "train"]


def __getattr__(name: str):
    # distnum.train and TrainConfig import Ray: only when asked for
    if name in ("train", "TrainConfig"):
        from distnum import training

        return getattr(training, name)
    raise AttributeError(f"module 'distnum' has no attribute {name!r}")
