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


def test_airbench_shape_and_parameter_count():
    net = models.build_model("airbench", num_classes=7)
    widths = [(24, 64), (64, 256), (256, 256)]  # after the 24-filter whitening layer
    convs = sum(9 * (c_in * c_out + c_out * c_out) for c_in, c_out in widths)
    norms = sum(2 * 2 * c_out for _, c_out in widths)  # two per block, weight and bias
    whitening = 24 * 3 * 2 * 2 + 24
    assert models.parameter_count(net) == whitening + convs + norms + 256 * 7
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def test_airbench_whitening_decorrelates_patches_of_its_training_images():
    torch.manual_seed(0)
    # Correlated channels and neighbouring pixels, as in photos.
    base = torch.randn(16, 1, 33, 33)
    smooth = (base[..., 1:, 1:] + base[..., :-1, :-1]) / 2
    images = torch.cat([smooth, smooth * 0.5 + 0.1 * torch.randn_like(smooth), -smooth], 1)
    net = models.build_model("airbench")
    net.init_from_data(images)
    weight = net.whiten.weight
    assert not weight.requires_grad
    torch.testing.assert_close(weight[12:], -weight[:12])  # each filter and its negative
    patches = torch.nn.functional.conv2d(images, weight[:12])  # the 12 whitened components
    flat = patches.transpose(0, 1).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    # Unit variance where the data has variance, ~0 across components; near-null
    # directions are damped by the epsilon rather than blown up.
    off_diagonal = covariance - torch.diag(covariance.diag())
    assert off_diagonal.abs().max() < 0.05
    assert covariance.diag().max() < 1.01
    assert (covariance.diag() > 0.9).sum() >= 6


def test_airbench_convolutions_start_as_identity_on_their_inputs():
    net = models.build_model("airbench")
    first = net.blocks[0][0]
    x = torch.randn(2, 24, 8, 8)
    torch.testing.assert_close(first(x)[:, :24], x)


def test_flip_tta_averages_the_probabilities_of_both_views():
    torch.manual_seed(0)
    net = models.build_model("tutorial").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (net(x).softmax(-1) + net(x.flip(-1)).softmax(-1)) / 2
        got = models.predict_log_proba(net, x).exp()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), torch.ones(4))


def test_airbench_tta_adds_shifted_views_at_half_weight():
    torch.manual_seed(0)
    net = models.build_model("airbench").eval()
    x = torch.randn(2, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[..., :32, :32], padded[..., 2:, 2:]]
    with torch.no_grad():
        probas = [(net(v).softmax(-1) + net(v.flip(-1)).softmax(-1)) / 2 for v in views]
        expected = 0.5 * probas[0] + 0.25 * probas[1] + 0.25 * probas[2]
        got = models.predict_log_proba(net, x).exp()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["tutorial", "airbench"])
def test_weights_for_other_inputs_give_the_same_outputs(name):
    """Folding a change of normalisation into the first convolution is exact: the network
    answers the same for the same pixels, however they are normalised."""
    from cifar_experiments.data import Normalization

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    trained_on = Normalization((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    given = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    net = models.build_model(name).eval()
    net.init_from_data(trained_on(pixels))
    folded = models.build_model(name).eval()
    folded.load_state_dict(
        models.weights_for_inputs(net, (trained_on.mean, trained_on.std), (given.mean, given.std))
    )
    with torch.no_grad():
        expected = models.predict_log_proba(net, trained_on(pixels))
        answered = models.predict_log_proba(folded, given(pixels))
    torch.testing.assert_close(answered, expected, atol=2e-5, rtol=1e-5)
