"""distnum: exact central-difference gradients, sharded over Ray: the chapter-4 network,
chapter 6's deeper ones, any function."""

from importlib import import_module

from distnum.ray_logs import quiet_ray_logs

# where each public name lives; imported when first asked for, so that `import distnum`
# costs nothing (numpy, numba and Ray take seconds) until a name is used
_PUBLIC = {
    "SimpleNet": "distnum.models",
    "TwoLayerNet": "distnum.models",
    "MultiLayerNet": "distnum.models",
    "load_mnist": "distnum.data",
    "TrainConfig": "distnum.training",
    "train": "distnum.training",
    "plot_run": "distnum.plot",
    "numerical_gradient": "distnum.function_gradient",
}
__all__ = list(_PUBLIC)

# before any ray.init(), the caller's own included: see distnum/ray_logs.py (only logging)
quiet_ray_logs()


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'distnum' has no attribute {name!r}")
