"""Ctrl-C and SIGTERM: deferred to the step's end inside training, at once elsewhere."""

import os
import signal

import pytest

from cifar_experiments.interrupts import Interrupted, StopRequests


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before the next line


def test_inside_training_a_signal_is_only_noted():
    with StopRequests().installed() as stop, stop.deferred():
        send(signal.SIGINT)
        assert stop.pending == signal.SIGINT


def test_the_same_signal_again_stops_at_once():
    with StopRequests().installed() as stop, stop.deferred():
        send(signal.SIGTERM)
        with pytest.raises(Interrupted) as raised:
            send(signal.SIGTERM)
    assert raised.value.signal_name == "SIGTERM" and raised.value.exit_code == 143


def test_a_sigterm_after_a_sigint_is_mlflow_run_passing_on_the_same_ctrl_c():
    with StopRequests().installed() as stop, stop.deferred():
        send(signal.SIGINT)
        send(signal.SIGTERM)
        assert stop.pending == signal.SIGINT


def test_outside_training_a_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopRequests().installed(), pytest.raises(Interrupted) as raised:
        send(signal.SIGINT)
    assert raised.value.exit_code == 130 and not raised.value.checkpointed
    assert raised.value.run_id is None
    assert signal.getsignal(signal.SIGINT) is before
