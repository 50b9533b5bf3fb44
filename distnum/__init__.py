"""distnum: exact central-difference gradients for the chapter-4 network, sharded over Ray."""

from distnum.data import load_mnist
from distnum.models import SimpleNet, TwoLayerNet

__all__ = ["SimpleNet", "TwoLayerNet", "load_mnist"]
