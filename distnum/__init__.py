"""distnum: exact central-difference gradients for the chapter-4 network, sharded over Ray."""

from distnum.data import load_mnist
from distnum.models import SimpleNet, TwoLayerNet
from distnum.ray_logs import quiet_ray_logs

__all__ = ["SimpleNet", "TwoLayerNet", "TrainConfig", "load_mnist", "plot_run", "train"]

# before any ray.init(), the caller's own included: see distnum/ray_logs.py
quiet_ray_logs()


def __getattr__(name: str):
    # distnum.train and TrainConfig import Ray: only when asked for
    if name in ("train", "TrainConfig"):
        from distnum import training

        return getattr(training, name)
    if name == "plot_run":  # matplotlib too
        from distnum.plot import plot_run

        return plot_run
    raise AttributeError(f"module 'distnum' has no attribute {name!r}")
