"""4.3 Numerical differentiation and partial derivatives (the notebook's cells 11-13)."""

from distnum.gradient import numerical_diff


def function_1(x):
    return 0.01 * x**2 + 0.1 * x


def function_tmp1(x0):  # f(x0, x1) = x0**2 + x1**2 at x1 = 4
    return x0**2 + 4.0**2


def function_tmp2(x1):  # ... and at x0 = 3
    return 3.0**2 + x1**2


print("numerical_diff(f1,  5) =", numerical_diff(function_1, 5))
print("numerical_diff(f1, 10) =", numerical_diff(function_1, 10))
print("numerical_diff(f2_tmp1, 3.0) =", numerical_diff(function_tmp1, 3.0))
print("numerical_diff(f2_tmp2, 4.0) =", numerical_diff(function_tmp2, 4.0))
