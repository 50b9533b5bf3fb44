"""4.4 The gradient and gradient descent, with learning rates too large and too small
(the notebook's cells 14-18)."""

import numpy as np

from distnum.gradient import gradient_descent, numerical_gradient


def function_2(x):
    return np.sum(x**2)


for point in ([3.0, 4.0], [0.0, 2.0], [3.0, 0.0]):
    print(f"numerical_gradient(f2, {point}) =", numerical_gradient(function_2, np.array(point)))

init_x = np.array([-3.0, 4.0])
print("lr = 0.1:  ", gradient_descent(function_2, init_x, lr=0.1, step_num=100))
print("lr = 10.0 (too large):", gradient_descent(function_2, init_x, lr=10.0, step_num=100))
print("lr = 1e-10 (too small):", gradient_descent(function_2, init_x, lr=1e-10, step_num=100))
