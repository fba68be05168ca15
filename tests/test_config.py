import pytest

from cifar_experiments.config import ConfigError, TrainConfig
from cifar_experiments.recipes import AIRBENCH94_SGD, CUDA_RECIPES, RECIPES


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
        ("keep_epoch", "first"),
        ("label_smoothing", 1.0),
        ("precision", "fp8"),
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


def test_params_leave_out_what_was_not_given_and_the_experiment():
    params = TrainConfig().as_params()
    assert "data" not in params and "run_name" not in params
    assert "experiment_name" not in params  # the run is in it; under `mlflow run`, not this one
    assert "" not in params.values()
    assert params["lr"] == RECIPES["tutorial"]["lr"]
    assert TrainConfig(run_name="mine").as_params()["run_name"] == "mine"


@pytest.mark.parametrize("model", ["tutorial", "airbench"])
def test_unset_options_take_the_models_recipe(model):
    config = TrainConfig(model=model)
    for name, value in RECIPES[model].items():
        assert getattr(config, name) == value, name
    assert config.as_params()["batch_size"] == RECIPES[model]["batch_size"]


def test_on_cuda_airbench_takes_its_published_batch_and_the_rest_of_its_recipe():
    on_cuda, on_cpu = TrainConfig(model="airbench", device="cuda"), TrainConfig(model="airbench")
    assert (on_cuda.batch_size, on_cuda.lr) == (1024, 1.5)
    assert (on_cpu.batch_size, on_cpu.lr) == (512, 0.75)
    assert on_cuda.momentum == on_cpu.momentum and on_cuda.keep_epoch == on_cpu.keep_epoch
    assert TrainConfig(model="airbench", device="cuda", batch_size=256).batch_size == 256
    assert (
        TrainConfig(model="tutorial", device="cuda").batch_size == RECIPES["tutorial"]["batch_size"]
    )


def test_given_options_override_the_recipe():
    config = TrainConfig(model="airbench", batch_size=64, lookahead=False)
    assert config.batch_size == 64 and config.lookahead is False
    assert config.label_smoothing == RECIPES["airbench"]["label_smoothing"]


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError) as raised:
        TrainConfig(momentum=0.0, nesterov=True)
    assert raised.value.field == "nesterov"


@pytest.mark.parametrize("batch_size", [256, 512, 1024])
def test_airbench_published_sgd_becomes_the_same_steps_in_pytorch_terms(batch_size):
    published = AIRBENCH94_SGD
    ours = published.in_pytorch_terms(batch_size)
    # airbench94.py sums the loss over the batch, divides its learning rate by
    # 1024 * (1 + 1 / (1 - momentum)) and decays weights by that share of `weight_decay` per
    # batch, decoupled from the rate.
    kilostep_scale = 1024 * (1 + 1 / (1 - published.momentum))
    lr_for_a_summed_loss = published.lr / kilostep_scale
    decay_per_step = published.weight_decay * batch_size / kilostep_scale
    # A mean loss's gradient is the summed loss's divided by the batch size.
    assert ours["lr"] == pytest.approx(lr_for_a_summed_loss * batch_size, rel=1e-11)
    assert ours["lr"] * ours["weight_decay"] == pytest.approx(decay_per_step, rel=1e-11)
    assert (ours["batch_size"], ours["momentum"]) == (batch_size, published.momentum)


def test_airbench_on_cuda_is_its_published_sgd_at_its_own_batch():
    # Worked by hand from airbench94.py: lr 11.5 * 1024 / (1024 * (1 + 1 / 0.15)) = 1.5; the
    # decoupled decay 0.0153 becomes a share of that rate, 0.0153 / 11.5.
    published_decay = pytest.approx(0.0153 / 11.5)
    assert CUDA_RECIPES["airbench"] == {
        "batch_size": 1024, "lr": 1.5, "momentum": 0.85, "weight_decay": published_decay
    }  # fmt: skip
