"""The `train` command as a user meets it: what lands in MLflow, and what bad input gets."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import CLASSES, TINY, assert_every_point_once, encode, fill, synthetic_images

import cifar_experiments
from cifar_experiments import checkpoint, engine, interrupts
from cifar_experiments.cli import cli
from cifar_experiments.recipes import RECIPES


def train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def all_runs() -> pd.DataFrame:
    return mlflow.search_runs(search_all_experiments=True)


def artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_closing_line_names_run_accuracy_and_links_its_page_in_the_training_view(
    in_finished_store,
):
    result, client, run_id = in_finished_store
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"Run {run_id} finished: test accuracy ")
    experiment_id = client.get_run(run_id).info.experiment_id
    assert last.endswith(
        f"Browse it: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}, then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
        "?workflowType=machine_learning"
    )


def test_the_experiment_opens_as_model_training_in_the_ui(finished_run):
    _, client, run_id = finished_run
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_is_finished_with_every_param(finished_run):
    _, client, run_id = finished_run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    params = run.data.params
    assert params["epochs"] == "2" and params["batch_size"] == "8" and params["augment"] == "True"
    for derived in ("device", "parameter_count", "train_size", "val_size", "test_size",
                    "torch_version", "seed", "num_classes"):  # fmt: skip
        assert derived in params, derived
    assert params["parameter_count"] == str(62006 - 7 * 85)  # 3 classes, not 10
    assert "" not in params.values() and "resume" not in params
    assert (params["train_size"], params["val_size"], params["test_size"]) == ("27", "3", "12")


def test_metric_histories_have_steps(finished_run):
    _, client, run_id = finished_run
    history = lambda name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]  # noqa: E731
    # 27 images in batches of 8: 3 full batches an epoch, the 3 left over wait their turn.
    assert [s for s, _ in history("train/loss")] == list(range(1, 7))
    for name in ("train/epoch_loss", "train/accuracy", "val/loss", "val/accuracy", "train/lr",
                 "train/epoch_seconds", "train/images_per_second", "val/accuracy_cat"):  # fmt: skip
        assert [s for s, _ in history(name)] == [1, 2], name
    for name in ("test_loss", "test_accuracy", "test_precision_macro", "test_recall_macro",
                 "test_f1_macro", "test_accuracy_without_tta",
                 *(f"test_accuracy_{c}" for c in CLASSES)):  # fmt: skip
        assert len(history(name)) == 1, name


def test_artifacts_model_dataset_and_description(in_finished_store):
    _, client, run_id = in_finished_store
    paths = artifact_paths(client, run_id)
    for split in ("val", "test"):
        for name in ("confusion_matrix.png", "confusion_matrix.json",
                     "classification_report.txt", "classification_report.json"):  # fmt: skip
            assert f"evaluation/{split}/{name}" in paths
    assert {"training_curves.png", "cifar_net.pth"} <= paths
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert "python_function" in info.flavors and info.name == "model"
    run = client.get_run(run_id)
    assert "Test accuracy" in run.data.tags["mlflow.note.content"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "imagefolder0"
    assert len(dataset_input.dataset.digest) == 16


def test_pictures_the_ui_shows_over_epochs_and_per_class(in_finished_store):
    _, client, run_id = in_finished_store
    paths = artifact_paths(client, run_id)
    # A confusion matrix per epoch, for the UI's image slider (file names carry the step).
    epoch_images = sorted(p for p in paths if p.startswith("images/val_confusion_matrix+step+"))
    steps = {p.split("+step+")[1].split("+")[0] for p in epoch_images}
    assert steps == {"0", "1", "2"}  # 0: before training, where MLflow's image slider opens
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
    for split in ("val", "test"):
        assert f"evaluation/{split}/confident_mistakes.png" in paths
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"evaluation/{split}/per_class.json"
        )
        table = pd.read_json(local, orient="split")
        assert list(table["class"]) == list(CLASSES)
        assert {"recall", "precision", "f1", "images", "most_often_taken_for"} <= set(table)


def test_logged_model_labels_png_and_jpeg_bytes(in_finished_store):
    _, _, run_id = in_finished_store
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = synthetic_images(2, 2, 99)
    frame = pd.DataFrame({"image": [encode(images[0], "PNG"), encode(images[1], "JPEG")]})
    out = model.predict(frame)
    assert list(out.columns[:3]) == ["label", "class_index", "score"]
    assert set(out["label"]) <= set(CLASSES)
    probabilities = out[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert (out["score"].to_numpy() == probabilities.max(axis=1)).all()
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["image"]


def test_logged_model_labels_a_frame_of_any_length_as_it_labels_its_parts(in_finished_store):
    from cifar_experiments.serving import PREDICT_BATCH

    _, _, run_id = in_finished_store
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = [encode(image, "PNG") for image in synthetic_images(50, 1, 7)]
    frame = pd.DataFrame({"image": images * 21})  # 1,050 rows: several chunks and a rest
    assert len(frame) > 4 * PREDICT_BATCH
    whole = model.predict(frame)
    assert len(whole) == len(frame)
    part = model.predict(frame.iloc[:50])
    pd.testing.assert_frame_equal(whole.iloc[1000:].reset_index(drop=True), part)


def test_the_tutorials_own_code_scores_the_weights_file_as_the_run_does(
    in_finished_store, image_folder
):
    """cifar_net.pth in the PyTorch tutorial's network, transform and test loop, as written
    there, labels the test images as the run's network does (without test-time flips)."""
    import torch
    import tutorial

    from cifar_experiments import data, engine, models

    _, _, run_id = in_finished_store
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="cifar_net.pth")
    testloader = tutorial.image_folder_loader(str(image_folder / "test"), num_workers=0)
    assert testloader.dataset.classes == list(CLASSES)
    theirs = tutorial.predict_test_set(path, testloader, len(CLASSES))

    ours = models.build_model("tutorial", num_classes=len(CLASSES))
    ours.load_state_dict(torch.load(path))
    evaluation = engine.evaluate(
        ours, data.load_dataset(image_folder).test, CLASSES, data.TUTORIAL_NORMALIZATION,
        engine.Runtime.resolve("cpu", "fp32"), tta=False,
    )  # fmt: skip
    assert theirs == evaluation.predictions.tolist()
    run = mlflow.get_run(run_id)
    assert run.data.metrics["test_accuracy_without_tta"] == evaluation.accuracy


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-0.1"], "--lr"),
        (["--model", "resnet"], "--model"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--data", "/no/such/folder"], "--data"),
        (["--batch-size", "many"], "--batch-size"),
        (["--device", "tpu"], "--device"),
        (["--augment", "perhaps"], "--augment"),
    ],
)
def test_bad_values_are_usage_errors_and_make_no_run(args, option):
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert all_runs().empty


def test_folder_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data" in result.output and "no images" in result.output
    assert all_runs().empty


def test_missing_cuda_is_a_usage_error(image_folder, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = CliRunner().invoke(cli, ["train", "--device", "cuda", "--data", str(image_folder)])
    assert result.exit_code == 2 and "--device" in result.output
    assert all_runs().empty


def test_auto_device_is_settled_before_the_recipe_fills_in(image_folder, monkeypatch):
    from cifar_experiments import experiment

    configs = []
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(experiment, "prepare", lambda config, *_, **__: configs.append(config))
    result = CliRunner().invoke(cli, ["train", "--model", "airbench", "--data", str(image_folder)])
    assert result.exit_code == 0, result.output
    assert (configs[0].device, configs[0].batch_size, configs[0].lr) == ("cuda", 1024, 1.5)


def test_no_augment_flag(image_folder):
    result = train("--epochs", "1", "--no-augment", "--data", str(image_folder))
    assert result.exit_code == 0, result.output
    assert all_runs()["params.augment"].tolist() == ["False"]


def test_ctrl_c_marks_the_run_killed(image_folder, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "fit", interrupted)
    result = CliRunner().invoke(cli, ["train", "--data", str(image_folder)])
    assert result.exit_code == 130
    assert all_runs()["status"].tolist() == ["KILLED"]


def test_exception_marks_the_run_failed_with_the_message(image_folder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "fit", broken)
    result = CliRunner().invoke(cli, ["train", "--data", str(image_folder)])
    assert result.exit_code != 0
    runs = all_runs()
    assert runs["status"].tolist() == ["FAILED"]
    assert "CUDA out of memory" in runs["tags.error"].iloc[0]


def test_help_documents_every_option():
    result = CliRunner().invoke(cli, ["train", "--help"])
    for option in ("--epochs", "--batch-size", "--lr", "--momentum", "--nesterov",
                   "--weight-decay", "--label-smoothing", "--schedule", "--lookahead",
                   "--augment", "--no-augment", "--model", "--data", "--val-fraction",
                   "--keep-epoch", "--seed", "--device", "--precision", "--compile",
                   "--log-every", "--experiment-name", "--run-name"):  # fmt: skip
        assert option in result.output, option
    assert f"airbench: batch_size={RECIPES['airbench']['batch_size']}," in result.output


def test_airbench_logs_the_recipe_it_used_and_its_model_labels_images(image_folder):
    result = train("--model", "airbench", "--epochs", "1", "--batch-size", "9",
                   "--data", str(image_folder), "--no-register")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = all_runs().iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.batch_size"] == "9"  # given
    recipe = RECIPES["airbench"]
    assert run["params.lr"] == str(recipe["lr"])  # the recipe's
    assert run["params.label_smoothing"] == str(recipe["label_smoothing"])
    assert (run["params.nesterov"], run["params.lookahead"]) == ("True", "True")
    assert run["params.keep_epoch"] == "last"
    model = mlflow.pyfunc.load_model(f"runs:/{run['run_id']}/model")
    image = encode(synthetic_images(1, 0, 7)[0], "PNG")
    answer = model.predict(pd.DataFrame({"image": [image]}))
    assert answer["label"].iloc[0] in CLASSES


def test_logged_model_loads_with_only_the_code_it_carries(in_finished_store, tmp_path):
    """Hide this checkout and its editable install; the model must bring its own code."""
    import subprocess
    import sys

    _, client, run_id = in_finished_store
    script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p.rstrip("/") != "{Path(cifar_experiments.__file__).parents[1]}"]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("runs:/{run_id}/model")
import cifar_experiments
assert "/code/cifar_experiments" in cifar_experiments.__file__, cifar_experiments.__file__
print(model.predict(pd.DataFrame({{"image": [open(sys.argv[1], "rb").read()]}}))["label"][0])
"""
    image = tmp_path / "frog.png"
    image.write_bytes(encode(synthetic_images(1, 2, 5)[0], "PNG"))
    env = {"MLFLOW_TRACKING_URI": client.tracking_uri, "PATH": os.environ["PATH"]}
    done = subprocess.run(
        [sys.executable, "-c", script, str(image)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in CLASSES


def test_logged_model_answers_bad_input_with_a_clear_error(in_finished_store):
    from mlflow.exceptions import MlflowException

    _, _, run_id = in_finished_store
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.predict(pd.DataFrame({"image": pd.Series([], dtype=object)})).empty
    with pytest.raises(MlflowException, match="row 1: not a readable image"):
        model.predict(pd.DataFrame({"image": [encode(synthetic_images(1, 0, 0)[0], "PNG"), b"x"]}))


@pytest.fixture
def killed_run(image_folder, tmp_path):
    """A run stopped as if by Ctrl-C after its first step, with its checkpoint."""
    real_deferred = interrupts.StopRequests.deferred

    def stopped_at_once(self):
        self.pending = signal.SIGINT
        return real_deferred(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interrupts.StopRequests, "deferred", stopped_at_once)
        result = train("--data", str(image_folder), *TINY, "--no-register",
                       "--checkpoint-dir", str(tmp_path / "checkpoints"))  # fmt: skip
    assert result.exit_code == 130, result.output
    (run_id,) = all_runs()["run_id"]
    assert f"Resume it with:\n  cifar-experiments train --resume {run_id}" in result.output
    return run_id


def test_resume_finishes_a_killed_run_in_place(killed_run):
    client = mlflow.MlflowClient()
    assert client.get_run(killed_run).info.status == "KILLED"
    result = train("--resume", killed_run)
    assert result.exit_code == 0, result.output
    run = client.get_run(killed_run)
    assert run.info.status == "FINISHED" and len(all_runs()) == 1
    steps = [m.step for m in client.get_metric_history(killed_run, "train/loss")]
    assert sorted(steps) == list(range(1, 7))
    again = train("--resume", killed_run)
    assert again.exit_code == 0 and "already finished" in again.output


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["--model", "airbench"], "--model tutorial"),
        (["--lr", "0.5"], "--lr 0.07"),
        (["--epochs", "3"], "--epochs 2"),
    ],
)
def test_resume_with_options_that_contradict_the_run_is_refused(killed_run, args, refusal):
    result = CliRunner().invoke(cli, ["train", "--resume", killed_run, *args])
    assert result.exit_code == 2
    assert "--resume" in result.output and refusal in result.output
    assert mlflow.MlflowClient().get_run(killed_run).info.status == "KILLED"


def test_resume_on_other_data_is_refused(killed_run, cifar_python_folder):
    result = CliRunner().invoke(
        cli, ["train", "--resume", killed_run, "--data", str(cifar_python_folder)]
    )
    assert result.exit_code == 2 and "is not the data run" in result.output
    assert mlflow.MlflowClient().get_run(killed_run).info.status == "KILLED"


def test_resume_of_an_unknown_run_is_a_usage_error():
    result = CliRunner().invoke(cli, ["train", "--resume", "0" * 32])
    assert result.exit_code == 2 and "no run" in result.output


def test_resume_inside_a_new_mlflow_run_points_to_run_id(killed_run, monkeypatch):
    # `mlflow run -P resume=ID` without `--run-id ID` makes a new run for the process.
    client = mlflow.MlflowClient()
    made = client.create_run(client.get_run(killed_run).info.experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", made)
    result = CliRunner().invoke(cli, ["train", "--resume", killed_run])
    assert result.exit_code == 2
    assert f"--run-id {killed_run} -P resume={killed_run}" in result.output
    assert "--run-id" in client.get_run(made).data.tags["error"]


def test_checkpoint_folder_that_cannot_be_written_is_a_usage_error(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(
        cli, ["train", "--data", str(image_folder), "--checkpoint-dir", str(blocker / "sub")]
    )
    assert result.exit_code == 2
    assert "--checkpoint-dir" in result.output and "cannot write checkpoints" in result.output
    assert all_runs().empty


def test_a_disk_that_fills_up_mid_training_ends_it_in_one_line_and_resume_finishes_it(
    image_folder, small_disk, monkeypatch
):
    """The checkpoint folder on a real 3 MB filesystem, which another program fills up once
    the first epoch's checkpoint is written."""
    write = checkpoint.CheckpointFile.save
    fillers = []

    def written_then_filled(self, training):
        write(self, training)
        if not fillers:
            fillers.append(fill(small_disk))

    monkeypatch.setattr(checkpoint.CheckpointFile, "save", written_then_filled)
    result = train("--data", str(image_folder), *TINY, "--epochs", "3", "--no-register",
                   "--checkpoint-dir", str(small_disk))  # fmt: skip
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "No space left on device" in errors[0] and "Traceback" not in result.output
    client = mlflow.MlflowClient()
    (run_id,) = all_runs()["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    saved = checkpoint.load(Path(run.data.tags["checkpoint"]))  # the last whole one
    assert [e["epoch"] for e in saved["training"]["progress"]["history"]] == [1], "after epoch 1"

    monkeypatch.undo()
    fillers[0].unlink()  # space freed
    result = train("--resume", run_id)
    assert result.exit_code == 0, result.output
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_every_point_once(client, run_id, epochs=3)
    assert not list(small_disk.iterdir()), "a finished run leaves no checkpoint file behind"


def test_a_loss_that_becomes_nan_fails_the_run_after_that_epoch(image_folder):
    args = ["--data", str(image_folder), "--epochs", "4", "--lr", "1e12", "--schedule", "constant"]
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 1
    assert "training diverged: the training loss was nan in epoch" in result.output
    assert "Traceback" not in result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["error"]
    epochs = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/accuracy")
    assert len(epochs) < 4, "no epoch is trained after the loss became NaN"


def test_resume_fetches_the_checkpoint_artifact_when_the_file_is_gone(killed_run, tmp_path):
    client = mlflow.MlflowClient()
    local = Path(client.get_run(killed_run).data.tags["checkpoint"])
    local.unlink()  # another machine, or a cleaned-up folder
    result = train("--resume", killed_run, "--checkpoint-dir", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0, result.output
    assert client.get_run(killed_run).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed_run, "train/loss")]
    assert sorted(steps) == list(range(1, 7))


def test_a_checkpoint_tag_pointing_out_of_the_checkpoint_folder_is_refused(killed_run, tmp_path):
    """A run's tags can be changed by anyone who may edit it: resume loads only the run's own
    file in its checkpoint folder, not a file the tag names elsewhere, nor a link out."""
    client = mlflow.MlflowClient()
    own = Path(client.get_run(killed_run).data.tags["checkpoint"])
    elsewhere = tmp_path / "elsewhere" / own.name
    elsewhere.parent.mkdir()
    shutil.copy(own, elsewhere)

    client.set_tag(killed_run, "checkpoint", str(elsewhere))
    result = train("--resume", killed_run)
    assert result.exit_code == 2, result.output
    assert f"checkpoint tag names {elsewhere}, which is not {own}" in result.output

    client.set_tag(killed_run, "checkpoint", str(own))
    own.unlink()
    own.symlink_to(elsewhere)
    result = train("--resume", killed_run)
    assert result.exit_code == 2, result.output
    assert f"links out of its checkpoint folder (to {elsewhere})" in result.output
    assert "Traceback" not in result.output
    assert client.get_run(killed_run).info.status == "KILLED"
