import pytest
import torch

from cifar_experiments import models


def test_tutorial_net_is_the_tutorial_layer_for_layer():
    net = models.build_model("tutorial")
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    assert shapes == {
        "conv1.weight": (6, 3, 5, 5), "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }  # fmt: skip
    assert models.parameter_count(net) == 62006
    assert net(torch.zeros(5, 3, 32, 32)).shape == (5, 10)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="tutorial"):
        models.build_model("resnet9000")


def test_model_names_match_the_config_choices():
    from cifar_experiments.config import MODEL_NAMES

    assert set(models.model_names()) == set(MODEL_NAMES)


def test_flip_tta_averages_the_probabilities_of_both_views():
    torch.manual_seed(0)
    net = models.build_model("tutorial").eval()
    x = torch.randn(4, 3, 32, 32)
    expected = (net(x).softmax(-1) + net(x.flip(-1)).softmax(-1)) / 2
    with torch.no_grad():
        got = models.predict_log_proba(net, x).exp()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), torch.ones(4))
