"""A sweep's confirmation: the winner on the mean over new seeds, tested against the others
image by image (hand-made predictions), and end to end: a confirming sweep, stopped during its
confirmation, continues it when run again and ends with a verdict and the winner registered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import mlflow
import numpy as np
import pytest
from helpers import (
    binomial_tail,
    children,
    hand_made_predictions,
    local_env,
    only_parent,
    sweep_command,
    write_image_folder,
)

from cifar_experiments.sweep import confirm, parent_run

IMAGES = 400
LABELS = [image % 3 for image in range(IMAGES)]


def seeds_right(*accuracies: float, shift: int = 0) -> list[np.ndarray]:
    """One answer vector per seed: right on the first `accuracy` share of the images (moved
    along by `shift`), so two settings' overlaps can be counted by hand."""
    return [np.roll(np.arange(IMAGES) < round(a * IMAGES), shift) for a in accuracies]


def judged(
    settings: dict[int, list[np.ndarray]], searched_right: dict[int, np.ndarray] | None = None
) -> confirm.Verdict | None:
    """The verdict on `settings` (trial: each new seed's answers), with the trials' search runs
    answering as `searched_right` says (or not at all)."""
    confirmed, answers, searched = {}, {}, {}
    for trial, vectors in settings.items():
        confirmed[trial] = [f"trial{trial}-seed{seed}" for seed in range(len(vectors))]
        answers.update(
            {run: hand_made_predictions(right, LABELS) for run, right in
             zip(confirmed[trial], vectors, strict=True)}
        )  # fmt: skip
        searched[trial] = f"trial{trial}-search"
        right = (searched_right or {}).get(trial)
        if right is not None:
            answers[searched[trial]] = hand_made_predictions(right, LABELS)
    return confirm.judge(confirmed, searched, answers, alpha=0.05)


def test_a_clear_winner_is_named_with_the_sign_test_p_value():
    # Trial 4's seeds are right on images 0..319 and 0..279, trial 9's on 0..199 twice. On
    # 200..279 trial 4 is right twice and trial 9 never; on 280..319 once against never.
    verdict = judged({9: seeds_right(0.5, 0.5), 4: seeds_right(0.8, 0.7)})
    ahead, behind = 80 + 40, 0
    assert [s.trial for s in verdict.standings] == [4, 9]
    assert verdict.winner.accuracies == (0.8, 0.7) and verdict.winner.mean == pytest.approx(0.75)
    assert verdict.images == IMAGES
    assert verdict.p_values[0] == pytest.approx(2 * binomial_tail(ahead, ahead + behind))
    assert verdict.tied == (4,)
    assert verdict.tags() == {
        "sweep.verdict": "winner", "sweep.p_value": f"{verdict.p_values[0]:.3g}",
        "sweep.winner": "4", "sweep.winner_run_id": "trial4-seed0", "sweep.confirmed_images": "400",
    }  # fmt: skip


def test_settings_that_cannot_be_told_apart_are_a_tie_listing_them():
    # Trial 1 is right on images 0..239 with each seed, trial 2 on 10..249 (a shifted copy):
    # each is ahead on ten images, so nothing tells them apart.
    verdict = judged({1: seeds_right(0.6, 0.6), 2: seeds_right(0.6, 0.6, shift=10)})
    assert verdict.p_values[0] == pytest.approx(1.0)
    assert verdict.tied == (1, 2), "equal means: the lower trial number stands first"
    tags = verdict.tags()
    assert tags["sweep.verdict"] == "tie" and tags["sweep.tie"] == "1,2"


def test_three_settings_are_compared_with_the_winner_holm_corrected():
    verdict = judged({0: seeds_right(0.9), 1: seeds_right(0.6), 2: seeds_right(0.89)})
    # One seed each, so McNemar: trial 0 is right alone on 120 images against trial 1, on 4
    # against trial 2. Holm multiplies the smaller p-value by 2 and the larger by 1.
    against_1, against_2 = 2 * binomial_tail(120, 120), 2 * binomial_tail(4, 4)
    assert [s.trial for s in verdict.standings] == [0, 2, 1]
    assert verdict.p_values == pytest.approx((against_2, 2 * against_1))
    assert verdict.tied == (0, 2), "trial 1 is significantly worse; trial 2 is not"


def test_the_winners_best_run_may_be_its_search_run_and_runs_without_answers_are_left_out():
    verdict = judged(
        {0: seeds_right(0.7, 0.8), 1: seeds_right(0.4, 0.4)},
        searched_right={0: seeds_right(0.9)[0]},
    )
    assert verdict.best_run_id == "trial0-search"
    assert verdict.winner.mean == pytest.approx(0.75), "the search run is not in the mean"
    assert judged({0: seeds_right(0.7)}) is None, "one setting has nothing to be told from"
    lonely = confirm.judge(
        {0: ["a"], 1: ["b"]}, {}, {"a": hand_made_predictions([True], [0])}, 0.05
    )
    assert lonely is None, "a setting whose runs saved no predictions cannot be judged"


def test_runs_of_other_data_share_no_images_and_give_no_verdict():
    a = hand_made_predictions([True] * 3, [0, 1, 2], digest="one")
    b = hand_made_predictions([False] * 3, [0, 1, 2], digest="other")
    assert confirm.judge({0: ["a"], 1: ["b"]}, {}, {"a": a, "b": b}, 0.05) is None


@pytest.mark.slow
def test_a_confirmation_stopped_midway_continues_and_ends_with_a_verdict(tmp_path, tracking_store):
    folder = write_image_folder(tmp_path / "images", {"train": 40})
    command = sweep_command(folder, "--trials", "2", "--epochs", "2", "--pruner", "none",
                            "--confirm-top", "2", "--confirm-seeds", "2")  # fmt: skip
    env = local_env(MLFLOW_TRACKING_URI=tracking_store)
    log = tmp_path / "first.log"
    with log.open("w") as output:
        first = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not [r for r in confirmations() if r.info.status == "RUNNING"]:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130, log.read_text()[-3000:]
    (stopped,) = confirmations()
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags[parent_run.STATE_TAG] == "interrupted"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    parent = only_parent()
    assert parent.info.status == "FINISHED"
    search = children(parent.info.run_id)
    assert len(search) == 2, "the search was not run again"
    finished = [r for r in confirmations() if r.info.status == "FINISHED"]
    jobs = sorted(
        (r.data.tags[confirm.CONFIRM_TAG], r.data.tags[confirm.SEED_TAG]) for r in finished
    )
    assert jobs == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")], "each job once, new seeds"
    for run in finished:
        trial = next(
            r
            for r in search
            if r.data.tags[parent_run.TRIAL_TAG] == run.data.tags[confirm.CONFIRM_TAG]
        )
        assert run.data.params["lr"] == trial.data.params["lr"], "the trial's setting, again"
        assert run.data.tags[parent_run.PARENT_TAG] == parent.info.run_id

    tags = parent.data.tags
    assert tags["sweep.verdict"] in ("winner", "tie")
    p_value = float(tags["sweep.p_value"])
    assert (tags["sweep.verdict"] == "winner") == (p_value < 0.05)
    assert ("sweep.tie" in tags) == (tags["sweep.verdict"] == "tie")
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'cifar10-classifier'")
    assert version.run_id == tags["sweep.winner_run_id"]
    assert f"trial {tags['sweep.winner']}" in again.stdout and "p = " in again.stdout

    # More seeds to settle it: those trained are kept, only the third seed of each trains.
    more = [*command[:-1], "3"]
    assert command[-2:] == ["--confirm-seeds", "2"]
    third = subprocess.run(more, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    finished = [r for r in confirmations() if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[confirm.SEED_TAG] for r in finished) == ["1", "1", "2", "2", "3", "3"]
    standings = json.loads(mlflow.artifacts.load_text(
        f"runs:/{parent.info.run_id}/confirmation.json"))["standings"]  # fmt: skip
    assert [len(standing["runs"]) for standing in standings] == [3, 3]


def confirmations() -> list[mlflow.entities.Run]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [run for run in runs if confirm.CONFIRM_TAG in run.data.tags]
