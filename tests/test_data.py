from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import CLASSES, TEST_PER_CLASS, TINY, TRAIN_PER_CLASS, encode, synthetic_images

from cifar_experiments import data
from cifar_experiments.cli import cli


def test_torchvision_imports_with_the_installed_torch():
    # A torch/torchvision mismatch fails here ("operator torchvision::nms does not exist").
    import torchvision
    from torchvision.datasets import CIFAR10  # noqa: F401

    assert torchvision.__version__


def test_image_folder_is_read_as_uint8_tensors(image_folder):
    dataset = data.load_dataset(image_folder)
    assert dataset.classes == CLASSES
    assert dataset.train.images.shape == (3 * TRAIN_PER_CLASS, 3, 32, 32)
    assert dataset.train.images.dtype == torch.uint8
    assert dataset.train.labels.tolist() == [i for i in range(3) for _ in range(TRAIN_PER_CLASS)]
    assert dataset.test is not None and len(dataset.test) == 3 * TEST_PER_CLASS
    first = synthetic_images(TRAIN_PER_CLASS, 0, seed=len("train"))[0]
    assert torch.equal(dataset.train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_image_folder_decode_is_cached(image_folder, monkeypatch):
    first = data.load_dataset(image_folder)
    monkeypatch.setattr(data, "_decode_files", lambda *a: pytest.fail("decoded again"))
    second = data.load_dataset(image_folder)
    assert torch.equal(first.train.images, second.train.images)
    assert first.digest == second.digest


def test_cifar_python_folder_and_its_parent_are_both_accepted(cifar_python_folder):
    for path in (cifar_python_folder, cifar_python_folder / data.CIFAR10_FOLDER):
        dataset = data.load_dataset(path)
        assert dataset.classes == CLASSES
        assert len(dataset.train) == 3 * TRAIN_PER_CLASS  # two batch files, concatenated
        assert dataset.test is not None and len(dataset.test) == 3 * TEST_PER_CLASS


def test_truncated_cifar_batch_is_a_clear_error(cifar_python_folder, tmp_path):
    broken = tmp_path / data.CIFAR10_FOLDER
    broken.mkdir()
    for name in ("batches.meta", "data_batch_1"):
        (broken / name).write_bytes((cifar_python_folder / data.CIFAR10_FOLDER / name).read_bytes())
    (broken / "data_batch_2").write_bytes(pickle.dumps({b"data": b"x"})[:10])
    with pytest.raises(data.DataError, match="data_batch_2"):
        data.load_dataset(tmp_path)


def copy_of_cifar_folder(source: Path, destination: Path) -> Path:
    """A copy of the fixture's cifar-10-batches-py/ under `destination`, to spoil one file of."""
    folder = destination / data.CIFAR10_FOLDER
    shutil.copytree(source / data.CIFAR10_FOLDER, folder)
    return folder


class Payload:
    """What a booby-trapped pickle holds: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("file", ["batches.meta", "data_batch_2", "test_batch"])
def test_a_cifar_batch_that_carries_code_is_refused_in_one_line_and_never_runs_it(
    cifar_python_folder, tmp_path, file
):
    folder = copy_of_cifar_folder(cifar_python_folder, tmp_path)
    marker = tmp_path / "the-code-ran"
    with open(folder / file, "wb") as f:
        pickle.dump({b"data": Payload(f"touch {marker}"), b"labels": [0]}, f)
    result = CliRunner().invoke(cli, ["train", *TINY, "--data", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert f"cannot read {folder / file}: it carries code (posix.system)" in result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    assert not marker.exists(), "the pickled command ran"


def test_a_batch_pickled_as_cifar_ships_it_is_read(cifar_python_folder, tmp_path):
    """CIFAR's own files are Python 2 pickles (protocol 2) that name numpy.core.multiarray."""
    folder = copy_of_cifar_folder(cifar_python_folder, tmp_path)
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    shipped = pickle.dumps({b"data": pixels, b"labels": [1, 2], b"batch_label": b"batch 9",
                            b"filenames": [b"a.png", b"b.png"]}, protocol=2)  # fmt: skip
    shipped = shipped.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in shipped
    (folder / "test_batch").write_bytes(shipped)
    test = data.load_dataset(tmp_path).test
    assert test.labels.tolist() == [1, 2]
    assert test.images.flatten().tolist() == pixels.flatten().tolist()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "neither a CIFAR-10 python folder"),
        ({"train/cat/readme.txt": b"no images"}, "has no images"),
        ({"train/.keep": b""}, "no class folders"),
        ({"train/cat/a.png": "png", "test/cow/b.png": "png"}, "classes not in train/: cow"),
        ({"train/cat/a.png": b"not really a png"}, "a.png: not a readable image"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, layout, message):
    for relative, content in layout.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            encode(synthetic_images(1, 0, 0)[0], "PNG") if content == "png" else content
        )
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(tmp_path)


def test_download_failure_says_to_pass_data(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DataError, match="pass --data") as raised:
        data.load_dataset(None)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_image_gives_32x32_rgb_from_any_size_and_mode(mode, fmt):
    from PIL import Image

    image = Image.fromarray(synthetic_images(1, 1, 0)[0]).resize((71, 45)).convert(mode)
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        image = image.convert("RGB")
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = data.decode_image(buffer.getvalue())
    assert decoded.shape == (3, 32, 32) and decoded.dtype == torch.uint8


def test_decode_image_rejects_non_images():
    with pytest.raises(ValueError, match="not a readable image"):
        data.decode_image(b"GIF89a but then nothing")


def _labelled(counts: list[int]) -> data.ImageSet:
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32)
    return data.ImageSet(images.contiguous(), labels)


def test_split_is_stratified_reproducible_and_disjoint():
    images = _labelled([100, 50, 30])
    train, val = data.stratified_split(images, 0.2, seed=7)
    assert torch.bincount(val.labels).tolist() == [20, 10, 6]
    again_train, again_val = data.stratified_split(images, 0.2, seed=7)
    assert torch.equal(val.images, again_val.images) and torch.equal(
        train.labels, again_train.labels
    )
    _, other_val = data.stratified_split(images, 0.2, seed=8)
    assert not torch.equal(val.images, other_val.images)
    ids = lambda s: set(s.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and len(ids(train) | ids(val)) == len(images)


def test_a_small_split_still_holds_out_every_class():
    train, val = data.stratified_split(_labelled([2, 2, 2]), 0.1, seed=0)
    assert torch.bincount(val.labels).tolist() == torch.bincount(train.labels).tolist() == [1] * 3


def test_a_class_too_small_to_split_is_a_clear_error():
    with pytest.raises(data.DataError, match="every class"):
        data.stratified_split(_labelled([1, 2, 2]), 0.1, seed=0)


def test_augmented_training_batches_keep_shapes_and_labels_and_only_move_pixels():
    images = torch.from_numpy(synthetic_images(64, 0, 3)).permute(0, 3, 1, 2).contiguous()
    labelled = data.ImageSet(images, torch.arange(64))
    batches = list(
        data.TrainingSet(labelled, augment=True).batches(16, torch.Generator().manual_seed(0))
    )
    assert [b.shape for b, _ in batches] == [(16, 3, 32, 32)] * 4
    assert all(b.dtype == torch.uint8 for b, _ in batches)
    out = torch.cat([b for b, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(64))  # every image once, label kept
    originals = images[labels]
    assert not torch.equal(out, originals)
    # The centre survives any shift of at most 2 pixels, possibly mirrored.
    flipped = 0
    for moved, original in zip(out, originals, strict=True):
        centre = original[:, 8:24, 8:24]
        windows = [moved[:, 8 + dy : 24 + dy, 8 + dx : 24 + dx] for dy in range(-2, 3)
                   for dx in range(-2, 3)]  # fmt: skip
        plain = any(torch.equal(w, centre) for w in windows)
        mirrored = any(torch.equal(w.flip(-1), centre) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 64


def test_each_image_is_flipped_every_other_epoch():
    images = torch.from_numpy(synthetic_images(32, 0, 5)).permute(0, 3, 1, 2).contiguous()
    training = data.TrainingSet(data.ImageSet(images, torch.arange(32)), augment=True)
    generator = torch.Generator().manual_seed(0)

    def mirrored_ids() -> set[int]:
        found = set()
        for batch, ids in training.batches(8, generator):
            for moved, i in zip(batch, ids.tolist(), strict=True):
                centre = images[i][:, 8:24, 8:24]
                windows = [moved[:, 8 + dy : 24 + dy, 8 + dx : 24 + dx] for dy in range(-2, 3)
                           for dx in range(-2, 3)]  # fmt: skip
                if not any(torch.equal(w, centre) for w in windows):
                    found.add(i)
        return found

    first, second, third = mirrored_ids(), mirrored_ids(), mirrored_ids()
    assert 0 < len(first) < 32
    assert second == set(range(32)) - first and third == first


@pytest.mark.parametrize("augment", [True, False])
def test_an_epoch_resumed_part_way_yields_the_batches_it_would_have(augment):
    images = torch.from_numpy(synthetic_images(40, 0, 7)).permute(0, 3, 1, 2).contiguous()
    labelled = data.ImageSet(images, torch.arange(40))

    def epoch(start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        training = data.TrainingSet(labelled, augment=augment)
        return list(training.batches(8, torch.Generator().manual_seed(3), start=start))

    whole, resumed = epoch(0), epoch(2)
    assert len(resumed) == 3
    for (images_a, labels_a), (images_b, labels_b) in zip(whole[2:], resumed, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_evaluation_batches_cover_every_image_once_in_order():
    images = _labelled([7, 6])
    seen = torch.cat([labels for _, labels in data.batches(images, 4)])
    assert seen.tolist() == images.labels.tolist()


def test_training_batches_are_full_and_shuffled():
    images = _labelled([7, 6])  # 13 images: 3 batches of 4, one image waits
    training = data.TrainingSet(images, augment=False)
    generator = torch.Generator().manual_seed(0)
    epochs = [list(training.batches(4, generator)) for _ in range(2)]
    assert all([len(y) for _, y in epoch] == [4, 4, 4] for epoch in epochs)
    orders = [torch.cat([y for _, y in epoch]) for epoch in epochs]
    assert not torch.equal(orders[0], orders[1])
    assert data.TrainingSet(images, augment=False).steps(64) == 1  # never zero steps


def test_normalization_centres_training_pixels():
    images = torch.from_numpy(synthetic_images(50, 1, 1)).permute(0, 3, 1, 2).contiguous()
    norm = data.Normalization.of(images)
    x = norm(images)
    assert np.allclose(x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    assert np.allclose(x.std(dim=(0, 2, 3)).numpy(), 1, atol=1e-2)


def test_decode_image_refuses_huge_canvases_before_decoding():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # ~25 kB file, 25 M pixels
    with pytest.raises(ValueError, match="too large to decode safely"):
        data.decode_image(buffer.getvalue())


def test_decode_image_reports_truncated_files():
    whole = encode(synthetic_images(1, 0, 0)[0], "PNG")
    with pytest.raises(ValueError, match="not a readable image"):
        data.decode_image(whole[: len(whole) // 2])
