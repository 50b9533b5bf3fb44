"""4.2 Loss functions: sum of squares, cross entropy, minibatches (the notebook's cells 1-10)."""

import numpy as np

from distnum import load_mnist
from distnum.data import DataError
from distnum.functions import cross_entropy_error, mean_squared_error

t = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
y1 = np.array([0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0])  # "2" is most likely
y2 = np.array([0.1, 0.05, 0.1, 0.0, 0.05, 0.1, 0.0, 0.6, 0.0, 0.0])  # "7" is most likely

print("----- Mean Squared Error -----")
print("Example 1:", round(mean_squared_error(y1, t), 12))
print("Example 2:", round(mean_squared_error(y2, t), 12))

print("----- Cross Entropy Error -----")
print("Example 1:", round(cross_entropy_error(y1, t), 12))
print("Example 2:", round(cross_entropy_error(y2, t), 12))

# 4.2.3-4.2.4: a random minibatch, and the batch cross entropy with one-hot or index labels
# (the notebook's version reshaped t where it meant y, and failed on one-hot labels).
try:
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, one_hot_label=True)
except DataError as error:
    raise SystemExit(f"skipping the MNIST part: {error}") from None
print(x_train.shape)
print(t_train.shape)
batch_mask = np.random.choice(x_train.shape[0], 10)
x_batch, t_batch = x_train[batch_mask], t_train[batch_mask]
uniform = np.full((10, 10), 0.1)
print("batch cross entropy, uniform guess, one-hot labels:", cross_entropy_error(uniform, t_batch))
print("the same, labels as indices:", cross_entropy_error(uniform, t_batch.argmax(axis=1)))
