import pytest

from cifar_experiments.config import ConfigError, TrainConfig


def test_defaults_are_valid():
    config = TrainConfig()
    assert config.model == "tutorial" and config.epochs == 10


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("val_fraction", 0.0),
        ("val_fraction", 1.0),
        ("schedule", "triangular"),
        ("model", "vgg"),
        ("device", "tpu"),
        ("log_every", 0),
        ("data", "/definitely/not/here"),
        ("experiment_name", ""),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ConfigError) as raised:
        TrainConfig(**{field: value})
    assert raised.value.field == field


def test_params_use_empty_string_for_unset_values():
    params = TrainConfig().as_params()
    assert params["data"] == "" and params["run_name"] == ""
    assert params["lr"] == 0.02
