"""How much disk a sweep leaves behind: the same 20-trial airbench sweep twice, keeping every
checkpoint (`--keep-checkpoints`, what every run did before finished runs let go of theirs)
and as it runs by default, each in a folder of its own. Prints the bytes under the
checkpoint folder, the artifact store (mlruns/) and in all. The network's size, not the data,
makes a checkpoint, so tiny synthetic images serve.

    python benchmarks/sweep_disk.py [--trials 20] [--model airbench]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared toolbox
from helpers import cli_command, local_env, write_image_folder


def bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def sweep_footprint(folder: Path, images: Path, trials: int, model: str, *extra: str) -> dict:
    folder.mkdir()
    command = cli_command("sweep", "--data", str(images), "--model", model, "--trials",
                          str(trials), "--epochs", "1", "--batch-size", "16", "--pruner", "none",
                          "--confirm-top", "0", "--no-register", *extra)  # fmt: skip
    env = local_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}")
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return {
        "checkpoints": bytes_under(folder / "checkpoints"),
        "artifacts": bytes_under(folder / "mlruns"),
        "in all": bytes_under(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--model", default="airbench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = write_image_folder(Path(tmp) / "images", {"train": 40, "test": 4})
        before = sweep_footprint(Path(tmp) / "kept", images, args.trials, args.model,
                                 "--keep-checkpoints")  # fmt: skip
        after = sweep_footprint(Path(tmp) / "default", images, args.trials, args.model)
    print(f"{args.trials}-trial {args.model} sweep, MB left on disk:")
    for part in before:
        print(f"  {part:<12} every checkpoint kept {before[part] / 1e6:8.1f}   "
              f"by default {after[part] / 1e6:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
