"""The PyTorch tutorial's own code ("Training a Classifier"), kept as it writes it: its network,
its transform, its training loop and its test loop. Benchmarks measure against it, and a test
checks that a run's `cifar_net.pth` works in it.

    python tests/tutorial.py RUN_ID /path/to/test   # test/<class>/*.jpg

scores the run's `cifar_net.pth` with the tutorial's test loop and prints it beside the run's
own test accuracy, with and without test-time augmentation.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from torch import nn

transform = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
)


class Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train_epoch(net: nn.Module, trainloader: torch.utils.data.DataLoader) -> float:
    """Seconds for one epoch of the tutorial's training loop, its loss printout included."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    started = time.perf_counter()
    running_loss = 0.0
    for i, (inputs, labels) in enumerate(trainloader):
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if i % 2000 == 1999:
            print(f"  [tutorial, {i + 1:5d}] loss: {running_loss / 2000:.3f}", flush=True)
            running_loss = 0.0
    return time.perf_counter() - started


def predict_test_set(
    path: str, testloader: torch.utils.data.DataLoader, num_classes: int
) -> list[int]:
    """The tutorial's test: load the saved weights into its Net, and label every test image."""
    net = Net(num_classes)
    net.load_state_dict(torch.load(path))
    predictions = []
    with torch.no_grad():
        for images, _labels in testloader:
            outputs = net(images)
            _, predicted = torch.max(outputs.data, 1)
            predictions += predicted.tolist()
    return predictions


def image_folder_loader(folder: str, num_workers: int = 2) -> torch.utils.data.DataLoader:
    """The tutorial's test loader, over an image folder (<class>/*) instead of CIFAR's pickles:
    its classes in sorted order, as a run reads an image folder."""
    testset = torchvision.datasets.ImageFolder(folder, transform=transform)
    return torch.utils.data.DataLoader(
        testset, batch_size=4, shuffle=False, num_workers=num_workers
    )


def main(run_id: str, folder: str) -> None:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="cifar_net.pth")
    testloader = image_folder_loader(folder)
    labels = [label for _, label in testloader.dataset.samples]
    predictions = predict_test_set(path, testloader, len(testloader.dataset.classes))
    correct = sum(p == t for p, t in zip(predictions, labels, strict=True))
    metrics = mlflow.get_run(run_id).data.metrics
    print(
        f"The tutorial's test loop on run {run_id}'s cifar_net.pth: "
        f"{correct}/{len(labels)} = {correct / len(labels):.2%}; the run's test accuracy: "
        f"{metrics['test_accuracy_without_tta']:.2%} without test-time augmentation, "
        f"{metrics['test_accuracy']:.2%} with it"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
