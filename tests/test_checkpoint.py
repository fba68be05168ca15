"""Checkpoint files: written atomically, read back without running pickled code."""

import pytest
import torch
from helpers import fill

from cifar_experiments import checkpoint


def test_checkpoint_files_hold_only_tensors_and_plain_values(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save({"weights": torch.ones(2), "epoch": 3}, path)
    assert checkpoint.load(path)["epoch"] == 3
    assert not list(tmp_path.glob(".*partial"))  # written through a temporary file

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": checkpoint.FORMAT, "payload": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load(path)


def test_a_full_disk_fails_the_write_by_name_and_keeps_the_previous_checkpoint(small_disk):
    path = small_disk / "state.pt"
    checkpoint.save({"epoch": 1, "weights": torch.zeros(1000)}, path)
    filler = fill(small_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save({"epoch": 2, "weights": torch.ones(1000)}, path)
    assert checkpoint.load(path)["epoch"] == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "state.pt"], "no partial"
    filler.unlink()
    checkpoint.save({"epoch": 2, "weights": torch.ones(1000)}, path)
    assert checkpoint.load(path)["epoch"] == 2


def test_a_checkpoint_of_another_format_is_refused_by_name(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": checkpoint.FORMAT - 1, "progress": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this version"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_the_file_keeps_the_training_state_beside_what_the_run_was_asked(tmp_path):
    file = checkpoint.CheckpointFile(tmp_path / "run.pt", meta={"config": {"epochs": 2}})
    file.save({"progress": {"epoch": 2}})
    saved = checkpoint.load(file.path)
    assert saved["training"] == {"progress": {"epoch": 2}}
    assert saved["meta"] == {"config": {"epochs": 2}}


def test_an_unwritable_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoints"):
        checkpoint.check_writable(blocker / "sub")
    checkpoint.check_writable(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []  # the probe is gone
