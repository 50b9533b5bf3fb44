"""4.4.2 The gradient of a neural network: SimpleNet with the notebook's printed weights
(the notebook's cells 19-21)."""

import numpy as np

from distnum.gradient import numerical_gradient
from distnum.models import SimpleNet

net = SimpleNet(W=[[-0.53572577, 0.65692054, 0.1165997], [-0.37309075, -1.30970997, -0.51098734]])
print("net.W =", net.W)

x = np.array([0.6, 0.9])
p = net.predict(x)
print("p =", p)
print("np.argmax(p) =", np.argmax(p))

t = np.array([0, 0, 1])
print("net.loss(x, t) =", net.loss(x, t))


def f(W):  # W is a dummy: numerical_gradient nudges net.W in place, f reads it through net
    return net.loss(x, t)


dW = numerical_gradient(f, net.W)
print("dW =", dW)
