"""4.5 TwoLayerNet: the class, its numerical gradient, and minibatch training on MNIST with
test evaluation per epoch (the notebook's cells 22-27, with its bugs fixed: x_train[batch_mask],
and the epoch length computed after batch_size is set).

    python examples/ch4_5_two_layer_net.py --iters 600

The whole run (10,000 iterations) is `distnum train`, which shards the gradient over Ray.
"""

import argparse
import time

import numpy as np

from distnum import TwoLayerNet, load_mnist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=10000)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
np.random.seed(args.seed)

# 4.5.1 the class
net = TwoLayerNet(input_size=784, hidden_size=100, output_size=10, seed=args.seed)
print("----- weights and biases -----")
for key in ("W1", "b1", "W2", "b2"):
    print(f"net.params['{key}'].shape =", net.params[key].shape)

x = np.random.rand(100, 784)
y = net.predict(x)
print("----- inference -----")
print("y[0] =", y[0])

t = np.random.rand(100, 10)  # as in the notebook: read as labels through their argmax
started = time.perf_counter()
grads = net.numerical_gradient(x, t)
print(f"----- gradient ({time.perf_counter() - started:.2f} s) -----")
for key in ("W1", "b1", "W2", "b2"):
    print(f"grads['{key}'] =", grads[key].shape)

# 4.5.2-4.5.3 minibatch training, evaluated on the test data once per epoch
(x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, one_hot_label=True)

iters_num = args.iters
train_size = x_train.shape[0]
batch_size = 100
learning_rate = 0.1
iter_per_epoch = max(train_size // batch_size, 1)

train_loss_list, train_acc_list, test_acc_list = [], [], []
network = TwoLayerNet(input_size=784, hidden_size=50, output_size=10, seed=args.seed)

for i in range(iters_num):
    batch_mask = np.random.choice(train_size, batch_size)
    x_batch = x_train[batch_mask]
    t_batch = t_train[batch_mask]

    grad = network.numerical_gradient(x_batch, t_batch)
    for key in grad:
        network.params[key] -= learning_rate * grad[key]

    train_loss_list.append(network.loss(x_batch, t_batch))

    if i % iter_per_epoch == 0 or i == iters_num - 1:
        train_acc = network.accuracy(x_train, t_train)
        test_acc = network.accuracy(x_test, t_test)
        train_acc_list.append(train_acc)
        test_acc_list.append(test_acc)
        print(
            f"iter {i}: loss {train_loss_list[-1]:.4f} | train_acc, test_acc | "
            f"{train_acc:.4f}, {test_acc:.4f}"
        )
