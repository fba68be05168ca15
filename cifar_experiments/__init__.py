"""Train, track, register and serve CIFAR-10 classifiers with PyTorch and MLflow."""
