"""camfunc.split and camfunc.Split: where the cut is, what crosses it, and errors."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import camfunc
from helpers import ResNetish, assert_cut_at, small_cnn

pytestmark = pytest.mark.core


def test_head_returns_the_layers_output_and_tail_finishes_the_model():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    s = camfunc.split(model, "3")
    with torch.no_grad():
        expected_a = model[:4](x)
        a = s.head(x)
        assert torch.equal(a, expected_a)
        assert torch.allclose(s.tail(a), model(x), atol=1e-6)
    assert s.layers == ("3",)


def test_cut_is_at_the_module_output_even_when_forward_ends_in_functional_ops():
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)
    s = camfunc.split(model, "block1")
    with torch.no_grad():
        expected = model.block1(model.stem(x))  # F.relu(out + identity) included
        carry = s.head(x)
    a = carry[0] if isinstance(carry, tuple) else carry
    assert torch.equal(a, expected)
    camfunc.check(s, model, x)


def test_skip_connection_crosses_the_cut_as_context():
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)
    s = camfunc.split(model, "block2.conv1")  # inside a residual block
    with torch.no_grad():
        carry = s.head(x)
        identity = model.block1(model.stem(x))
    assert isinstance(carry, tuple) and len(carry) == 2
    a, context = carry
    assert torch.equal(a, model.block2.conv1(identity))
    assert torch.equal(context, identity)
    camfunc.check(s, model, x)


def test_parameter_read_through_get_attr_is_handled():
    model = ResNetish().eval()
    x = torch.randn(3, 3, 8, 8)
    for layer in ("stem", "block1", "block2"):
        assert_cut_at(camfunc.split(model, layer), model, layer, x)
    # The split shares the model's parameter: changing it changes the split's output.
    s = camfunc.split(model, "block1")
    with torch.no_grad():
        model.scale.mul_(2.0)
    camfunc.check(s, model, x)


def test_convnext_layer_scale_model_splits_exactly():
    model = torchvision.models.convnext_tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    assert_cut_at(camfunc.split(model, "features.5.1"), model, "features.5.1", x, atol=1e-4)


def test_layer_given_as_module_object():
    model = small_cnn()
    s = camfunc.split(model, model[3])
    assert s.layers == ("3",)


def test_module_called_several_times_cuts_at_last_call_with_warning():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            first = self.conv(x)
            second = self.conv(first)
            return self.fc(second.mean((2, 3)))

    model = Shared().eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(camfunc.RepeatedLayerWarning, match="called 2 times"):
        s = camfunc.split(model, "conv")
    with torch.no_grad():
        assert torch.equal(s.head(x), model.conv(model.conv(x)))
    camfunc.check(s, model, x)


def test_wrappers_are_unwrapped():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        s = camfunc.split(wrapped, "3")
        with torch.no_grad():
            assert torch.equal(s.head(x), model[:4](x))


def test_several_layers_in_any_order_give_maps_in_the_order_given():
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)
    s = camfunc.split(model, ["block2", "stem", "block1"])
    camfunc.check(s, model, x)
    maps = camfunc.gradcam(s, x, 1, normalize=False)
    singles = [camfunc.gradcam(camfunc.split(model, n), x, 1, normalize=False)
               for n in ("block2", "stem", "block1")]
    assert len(maps) == 3
    for got, want in zip(maps, singles):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_a_list_of_layers_gives_a_list_of_maps_even_for_one_layer():
    # What the types promise (Split[list[Tensor]] for a list): a list, never a bare tensor.
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)
    listed = camfunc.split(model, ["block2"])
    plain = camfunc.split(model, "block2")
    assert listed.listed and not plain.listed
    for method in (camfunc.gradcam, camfunc.scorecam, camfunc.eigencam):
        maps, scores = method(listed, x, 1, return_scores=True)
        assert isinstance(maps, list) and len(maps) == 1
        assert torch.equal(maps[0], method(plain, x, 1))
        assert scores.shape == (2, model(x).shape[1])


def test_nested_layers_each_get_their_own_cut():
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)
    s = camfunc.split(model, ["block2", "block2.conv1"])  # one inside the other
    camfunc.check(s, model, x)
    maps = camfunc.layercam(s, x, 2, normalize=False)
    for got, name in zip(maps, ("block2", "block2.conv1")):
        want = camfunc.layercam(camfunc.split(model, name), x, 2, normalize=False)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_resnet_layer3_and_layer4_chain_matches_single_layer_splits():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    maps = camfunc.gradcam(camfunc.split(model, ["layer3", "layer4"]), x, 5, normalize=False)
    for got, name in zip(maps, ("layer3", "layer4")):
        want = camfunc.gradcam(camfunc.split(model, name), x, 5, normalize=False)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_split_by_hand_from_two_callables():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    s = camfunc.Split(head=model[:4], tail=model[4:])
    via_fx = camfunc.split(model, "3")
    torch.testing.assert_close(camfunc.gradcam(s, x, 0), camfunc.gradcam(via_fx, x, 0))
    with pytest.raises(dataclasses_frozen_error()):
        s.head = model  # immutable


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_hand_split_with_context_tuple():
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)

    def head(x):
        identity = model.block1(model.stem(x))
        return model.block2.conv1(identity), identity

    def tail(a, identity):
        out = model.block2.conv2(F.relu(a))
        out = F.relu(out + identity) * model.scale
        return model.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    by_hand = camfunc.gradcam(camfunc.Split(head, tail), x, 3, normalize=False)
    via_fx = camfunc.gradcam(camfunc.split(model, "block2.conv1"), x, 3, normalize=False)
    torch.testing.assert_close(by_hand, via_fx, atol=1e-6, rtol=1e-5)


def test_split_rejects_non_callables():
    with pytest.raises(TypeError, match="callable"):
        camfunc.Split(head=3, tail=lambda a: a)


def test_automatic_layer_choice_picks_last_spatial_layer_and_says_so():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(camfunc.LayerChoiceWarning, match="'layer4'"):
        s = camfunc.split(model, example_input=x)
    assert s.layers == ("layer4",)
    with pytest.warns(camfunc.LayerChoiceWarning, match="'3'|'4'"):
        s = camfunc.split(small_cnn(), example_input=torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        assert s.head(torch.randn(1, 3, 8, 8)).shape[-2:] == (8, 8)


def test_automatic_choice_needs_an_example_input():
    with pytest.raises(ValueError, match="example_input"):
        camfunc.split(small_cnn())


def test_check_reports_a_wrong_split():
    model = small_cnn()
    other = small_cnn(seed=1)
    s = camfunc.Split(head=other[:4], tail=other[4:])
    with pytest.raises(ValueError, match="does not reproduce"):
        camfunc.check(s, model, torch.randn(2, 3, 8, 8))


def test_unknown_layer_names_closest_existing_names():
    model = torchvision.models.resnet18().eval()
    with pytest.raises(ValueError, match=re.escape("'layer4'")) as info:
        camfunc.split(model, "layer5")
    assert "unknown layer 'layer5'" in str(info.value)


def test_foreign_module_is_rejected():
    with pytest.raises(ValueError, match="not a submodule"):
        camfunc.split(small_cnn(), nn.Conv2d(1, 1, 1))


def test_untraceable_model_says_how_to_split_by_hand():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            a = self.conv(x)
            if a.sum() > 0:  # control flow on values: fx cannot trace it
                a = a * 2
            return self.fc(a.mean((2, 3)))

    model = DataDependent().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"camfunc\.Split\(head, tail\)"):
        camfunc.split(model, "conv")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name, layer", [
    ("resnet18", "layer4"),
    ("vgg11_bn", "features.20"),
    ("mobilenet_v3_small", "features.10"),
    ("densenet121", "features.denseblock4"),
    ("efficientnet_b0", "features.7"),
    ("regnet_y_400mf", "trunk_output.block4"),
    ("shufflenet_v2_x0_5", "stage4"),
    ("squeezenet1_1", "features.12"),
])
def test_torchvision_models_split_exactly(name, layer):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", camfunc.RepeatedLayerWarning)
        s = camfunc.split(model, layer)
    assert_cut_at(s, model, layer, x, atol=1e-4)


def test_a_split_records_the_modes_it_was_traced_in():
    model = small_cnn().train()
    s = camfunc.split(model, "3")  # training mode is where differentiable maps are used
    assert s.traced_modes == tuple(True for _ in model.modules())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        camfunc.gradcam(s, torch.randn(2, 3, 8, 8), 0)
    model.eval()
    with pytest.raises(ValueError, match="split it again"):
        camfunc.gradcam(s, torch.randn(2, 3, 8, 8), 0, differentiable=True)


def test_automatic_choice_skips_resizing_pools():
    model = torchvision.models.vgg11_bn().eval()
    with pytest.warns(camfunc.LayerChoiceWarning, match="'features'"):
        s = camfunc.split(model, example_input=torch.randn(1, 3, 64, 64))
    assert s.layers == ("features",)
