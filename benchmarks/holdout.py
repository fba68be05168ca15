"""Split an image folder's training images into train/ and a held-out test/, per class.

    python benchmarks/holdout.py SOURCE DEST [--test-per-class 1000] [--seed 2026]

SOURCE is an image folder (SOURCE/train/<class>/*); DEST gets DEST/train/<class>/ and
DEST/test/<class>/ as hard links (copies where links cannot be made), so the benchmarks can
score images no run has trained on. The same seed picks the same images: each class's file
names are sorted, then `random.Random(seed)` samples its test images.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path


def link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    if args.destination.exists():
        parser.error(f"{args.destination} exists; choose a new folder")
    classes = sorted(d for d in (args.source / "train").iterdir() if d.is_dir())
    if not classes:
        parser.error(f"{args.source / 'train'} has no class folders")
    for class_dir in classes:
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        if len(files) <= args.test_per_class:
            parser.error(f"{class_dir} has {len(files)} images, too few to hold out "
                         f"{args.test_per_class}")  # fmt: skip
        test = set(random.Random(args.seed).sample(files, args.test_per_class))
        for path in files:
            split = "test" if path in test else "train"
            link_or_copy(path, args.destination / split / class_dir.name / path.name)
        print(f"{class_dir.name}: {len(files) - len(test)} train, {len(test)} test")


if __name__ == "__main__":
    main()
