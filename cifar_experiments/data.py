"""Images in, uint8 tensors out: three sources, a stratified split, batches and augmentation.

Everything is decoded once and held in memory as (N, 3, 32, 32) uint8; training reads
batches by indexing that tensor, and augments whole batches with tensor operations.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import plain_pickle, speedups
from .recipes import AIRBENCH94

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR10_FOLDER = "cifar-10-batches-py"
# Larger images are refused before decoding: a small file can declare a huge canvas.
MAX_PIXELS = 4096 * 4096
# Bump when the cached tensors' layout changes, so old caches are not read.
CACHE_FORMAT = 1


class DataError(ValueError):
    """The data cannot be read; the message says what to do about it."""


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8, (N, 3, 32, 32)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    classes: tuple[str, ...]
    train: ImageSet
    test: ImageSet | None

    @cached_property
    def digest(self) -> str:
        """A short fingerprint of the pixels and labels, to tell datasets apart in MLflow."""
        h = hashlib.sha256()
        for part in (self.train, self.test):
            if part is not None:
                h.update(part.images.numpy().tobytes())
                h.update(part.labels.numpy().tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar-experiments"
    return Path(os.environ.get("CIFAR_EXPERIMENTS_CACHE", default))


def load_dataset(path: str | Path | None) -> Dataset:
    """Read a CIFAR-10 python folder, an image folder, or (no path) torchvision's download."""
    if path is None:
        return _download_cifar10(cache_dir())
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{path} is not a directory")
    for candidate in (root, root / CIFAR10_FOLDER):
        if (candidate / "batches.meta").is_file():
            return _read_cifar_python(candidate)
    if (root / "train").is_dir():
        return _read_image_folder(root)
    raise DataError(
        f"{path} holds neither a CIFAR-10 python folder ({CIFAR10_FOLDER}/ with batches.meta) "
        "nor an image folder with train/<class>/ images"
    )


def image_files(paths: list[Path]) -> list[Path]:
    """The image files among `paths`, a folder standing for every image beneath it."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
        else:
            found.append(path)
    return found


def decode_image(encoded: bytes) -> torch.Tensor:
    """Any image file's bytes -> (3, 32, 32) uint8 RGB, resized when it is another size.

    Raises ValueError, with a one-line reason, for anything that is not a sound image of
    at most MAX_PIXELS pixels (checked from the header, before decoding).
    """
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"image too large to decode safely ({width}x{height} pixels; "
                    f"the limit is {MAX_PIXELS:,})"
                )
            rgb = image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def encode_png(image: torch.Tensor) -> bytes:
    """(3, H, W) uint8 -> PNG bytes; for input examples and tests."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def held_out(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """The indices held out for validation, sorted: `val_fraction` of every class (at least one
    image of each, and one left to train on). Each class is shuffled by `seed` and the class
    alone, and its first images held out: a smaller fraction holds out a subset of what a
    larger one does, so runs on the same data and seed always share held-out images."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(val_fraction * len(members)))
        if count >= len(members):
            raise DataError(
                f"cannot hold out {val_fraction:.0%} of every class: class {label} has "
                f"{len(members)} image(s)"
            )
        order = np.random.default_rng([seed, int(label)]).permutation(len(members))
        chosen.append(members[order[:count]])
    return np.sort(np.concatenate(chosen))


def split_at(images: ImageSet, held: np.ndarray) -> tuple[ImageSet, ImageSet]:
    """The images not in `held` (indices), and those in it: training and validation."""
    kept = np.ones(len(images), dtype=bool)
    kept[held] = False

    def subset(idx: np.ndarray) -> ImageSet:
        rows = torch.from_numpy(idx)
        return ImageSet(images.images[rows], images.labels[rows])

    return subset(np.flatnonzero(kept)), subset(held)


def stratified_split(images: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out `val_fraction` of every class (see `held_out`): training and validation."""
    return split_at(images, held_out(images.labels.numpy(), val_fraction, seed))


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of training images, on the 0-1 scale.

    Computed from the training split and carried inside the logged model, so serving
    scales pixels exactly as training did.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, images: torch.Tensor) -> Normalization:
        """Exact statistics of uint8 images from each channel's histogram of 256 levels,
        without a float copy of the whole split."""
        levels = torch.arange(256, dtype=torch.float64) / 255
        means, stds = [], []
        for channel in images.transpose(0, 1):
            counts = torch.bincount(channel.flatten(), minlength=256).cpu().double()
            share = counts / counts.sum()
            mean = (share * levels).sum()
            means.append(mean.item())
            stds.append(((share * (levels - mean) ** 2).sum()).sqrt().item())
        return cls(tuple(means), tuple(stds))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, C, H, W) on the 0-255 scale, uint8 or float -> float32, centred and scaled
        per channel, in the networks' memory layout (speedups.memory_format).

        One multiply-add: a chain of float ops here cost as much as the tutorial Net's whole
        forward pass. Its factors span a whole image, not one value per channel, so that in
        channels-last memory it runs over long runs rather than three values at a time.
        """
        layout = speedups.memory_format()
        shift, scale = _normalization_factors(
            self.mean, self.std, tuple(images.shape[1:]), images.device, layout
        )
        pixels = images.contiguous(memory_format=layout).float()
        return torch.addcmul(shift, pixels, scale)


# What the PyTorch tutorial's code feeds its network: ToTensor, then Normalize with 0.5 and 0.5.
# The weights a run logs take their images this way, so the tutorial's own code can use them.
TUTORIAL_NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@functools.lru_cache(maxsize=16)
def _normalization_factors(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_shape: tuple[int, ...],
    device: torch.device,
    layout: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device and image size: copying them to a GPU every batch would wait for
    the GPU to finish its queued work each time."""
    shape, full = (1, -1, 1, 1), (1, *image_shape)
    mean_t = torch.tensor(mean, device=device).view(shape)
    std_t = torch.tensor(std, device=device).view(shape)
    shift = (-mean_t / std_t).expand(full).contiguous(memory_format=layout)
    scale = (1 / (255 * std_t)).expand(full).contiguous(memory_format=layout)
    return shift, scale


def batches(images: ImageSet, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of every image, for evaluation."""
    for start in range(0, len(images), batch_size):
        yield images.images[start : start + batch_size], images.labels[start : start + batch_size]


class TrainingSet:
    """A training split served as shuffled batches, optionally augmented: each image translated
    by up to `max_shift` pixels (reflecting at the border) and flipped every other epoch.

    For augmentation every image is padded once, in both orientations, so a batch is one
    gather of crops from uint8 memory: no per-image Python and no float work, a tenth of the
    cost of padding and flipping each batch.
    """

    def __init__(
        self, images: ImageSet, augment: bool, max_shift: int = AIRBENCH94.translate
    ) -> None:
        self.images, self.labels = images.images, images.labels
        self.crops = None
        if augment:
            h, w = images.images.shape[-2:]
            padded = torch.nn.functional.pad(images.images, (max_shift,) * 4, mode="reflect")
            both = torch.cat([padded, padded.flip(-1)])
            self.crops = both.unfold(2, h, 1).unfold(3, w, 1)  # 2N, C, dy, dx, H, W: a view
        self.max_shift = max_shift
        self.flipped: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def steps(self, batch_size: int) -> int:
        """Full batches per epoch. The remainder waits for another epoch (a different one
        each time): a small last batch would take a full-size, noisy step, and its batch
        statistics would be the ones validation sees."""
        return max(1, len(self) // batch_size)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator,
        start: int = 0,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of batches, all randomness drawn from `generator`. `start` skips batches,
        drawing what they would have drawn (an interrupted epoch resumes exactly). `part` (i, n)
        is process i's share of each batch when n train together: whatever n, the same draws."""
        (rank, size), n, device = part, len(self), self.labels.device
        order = torch.randperm(n, generator=generator).to(device)
        if self.crops is not None:
            # Alternating flips (airbench): random in the first epoch, then each image the
            # other way round from its last epoch, so consecutive epochs see both orientations.
            if self.flipped is None:
                self.flipped = torch.randint(0, 2, (n,), generator=generator).to(device)
            else:
                self.flipped = 1 - self.flipped
        steps, batch = self.steps(batch_size), min(batch_size, n)
        if self.crops is not None:
            # The whole epoch's shifts in one draw (the same numbers as a draw per batch) and
            # one copy: a copy to a GPU per batch would wait for its queued work every time.
            span = 2 * self.max_shift + 1
            shifts = torch.randint(0, span, (steps, 2, batch), generator=generator).to(device)
        for step in range(start, steps):
            idx = order[step * batch : (step + 1) * batch][rank::size]
            if self.crops is None or self.flipped is None:
                yield self.images[idx], self.labels[idx]
            else:
                dy, dx = shifts[step][:, rank::size]
                yield self.crops[idx + n * self.flipped[idx], :, dy, dx], self.labels[idx]


# --- sources -------------------------------------------------------------------------------


def _read_cifar_python(folder: Path) -> Dataset:
    meta = _unpickle(folder / "batches.meta")
    classes = tuple(
        name.decode() if isinstance(name, bytes) else name for name in meta[b"label_names"]
    )
    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files:
        raise DataError(f"{folder} has batches.meta but no data_batch_* files")
    test_file = folder / "test_batch"
    return Dataset(
        name="cifar10",
        source=str(folder),
        classes=classes,
        train=_concat([_read_cifar_batch(f) for f in train_files]),
        test=_read_cifar_batch(test_file) if test_file.is_file() else None,
    )


def _read_cifar_batch(path: Path) -> ImageSet:
    batch = _unpickle(path)
    try:
        pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, ValueError) as error:
        raise DataError(f"{path} is not a CIFAR-10 batch: {error}") from error
    if len(pixels) != len(labels):
        raise DataError(f"{path} has {len(pixels)} images but {len(labels)} labels")
    return ImageSet(torch.from_numpy(pixels.copy()), torch.from_numpy(labels))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            loaded = plain_pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: it holds a {type(loaded).__name__}")
    return loaded


def _read_image_folder(root: Path) -> Dataset:
    classes = tuple(sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/*)")
    train_files = _list_images(root / "train", classes)
    if not train_files:
        raise DataError(f"{root / 'train'} has no images (expected train/<class>/*.png or *.jpg)")
    test_files = _list_images(root / "test", classes) if (root / "test").is_dir() else []
    unknown = sorted({d.name for d in (root / "test").glob("*") if d.is_dir()} - set(classes))
    if unknown:
        raise DataError(f"{root / 'test'} has classes not in train/: {', '.join(unknown)}")

    key = _files_fingerprint(root, train_files + test_files)
    cache_file = cache_dir() / f"imagefolder-{key}.pt"
    if cache_file.is_file():
        cached = torch.load(cache_file, weights_only=True)
        train = ImageSet(*cached["train"])
        test = ImageSet(*cached["test"]) if cached["test"] is not None else None
        log.info("Read decoded images from cache %s", cache_file)
    else:
        train = _decode_files(train_files, "train")
        test = _decode_files(test_files, "test") if test_files else None
        _save_cache(cache_file, train, test)
    return Dataset(name=root.name, source=str(root), classes=classes, train=train, test=test)


def _list_images(split_dir: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if class_dir.is_dir():
            files += [
                (p, label)
                for p in sorted(class_dir.iterdir())
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            ]
    return files


def _files_fingerprint(root: Path, files: list[tuple[Path, int]]) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}\n{root}\n".encode())
    for path, label in files:
        stat = path.stat()
        h.update(
            f"{path.relative_to(root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()[:20]


def _decode_files(files: list[tuple[Path, int]], split: str) -> ImageSet:
    def decode(path: Path) -> torch.Tensor:
        try:
            return decode_image(path.read_bytes())
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: {error}") from error

    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(decode, (p for p, _ in files), chunksize=256)
        images = list(
            tqdm(decoded, total=len(files), desc=f"decoding {split}", unit="img", disable=None)
        )
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(torch.stack(images), labels)


def _save_cache(cache_file: Path, train: ImageSet, test: ImageSet | None) -> None:
    """Best effort: a cache that cannot be written only costs the next run a decode."""
    payload = {
        "train": (train.images, train.labels),
        "test": (test.images, test.labels) if test is not None else None,
    }
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        torch.save(payload, partial)
        partial.replace(cache_file)
    except OSError as error:
        log.warning("Could not cache decoded images in %s: %s", cache_file.parent, error)


def _download_cifar10(root: Path) -> Dataset:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=str(root), train=True, download=True)
    except Exception as error:  # urllib, ssl and torchvision each raise their own kind
        raise DataError(
            f"could not download CIFAR-10 into {root} ({type(error).__name__}: {error}); "
            "pass --data with a local copy (a CIFAR-10 python folder or an image folder)"
        ) from error
    return _read_cifar_python(root / CIFAR10_FOLDER)


def _concat(parts: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
