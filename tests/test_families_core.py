"""What made whole model families fail (issue 19, part 3), in plain torch models.

Each model here reproduces one family's trait without timm or Hugging Face: a
``torch.autocast`` and a ``torch.no_grad`` region in an exported graph (timm's
EfficientViT), a layer returning a list (HRNet's stages), ``torch.utils.checkpoint``
in forward and timm-style gradient checkpointing, a scripted model, and class
tokens camfunc must count (CLIP's ``class_embedding``, one per branch as in
CrossViT) or cannot (then the layer search says so instead of falling back to
the patch embedding). Maps are compared on raw values with the hook oracle
(``helpers.hook_gradcam``), at a square and a non-square input size.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import camfunc
from camfunc._core.cut.capture import CaptureError
from helpers import Block, assert_gradcam_oracle, image, small_cnn, tokens_to_grid

pytestmark = pytest.mark.core

CLASSES = [1, 3]
SHAPES = [(2, 3, 16, 16), (2, 3, 16, 24)]


def fx_refuses(h: torch.Tensor) -> None:
    for _ in h.shape[:1]:  # iterating a Proxy is what fx cannot do: torch.export captures it
        pass


# ----------------------------------------------------------------------------
# Wrapper regions in an exported graph


class Regions(nn.Module):
    """An autocast region around a conv, then a no_grad region, as timm's EfficientViT (MIT)
    has in its attention; fx cannot trace it, so torch.export captures it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        fx_refuses(h)
        with torch.autocast(device_type="cpu", enabled=False):
            h = F.relu(self.conv2(h.float()))
        with torch.no_grad():  # no gradient through the scale: a region run without it differs
            scale = torch.sigmoid(h.mean((1, 2, 3), keepdim=True))
        return self.fc((h * scale).mean((2, 3)))


@pytest.mark.parametrize("shape", SHAPES)
def test_an_exported_graph_with_autocast_and_no_grad_regions_gives_the_oracle(shape):
    model = Regions().eval()
    x = image(shape)
    s = camfunc.check(camfunc.split(model, "conv1", example_input=x), model, x)
    assert_gradcam_oracle(s, model, "conv1", x, CLASSES)


def test_a_layer_inside_an_autocast_region_is_refused_in_one_line_or_cut_where_torch_inlines_it():
    model = Regions().eval()
    x = image(SHAPES[0])
    if hasattr(torch.ops.higher_order, "wrap_with_autocast"):  # torch 2.5 and newer keep the region
        with pytest.raises(ValueError, match=r"'conv2' runs inside a torch.autocast or torch.no_grad "
                                             r"region.*pick a layer outside it"):
            camfunc.split(model, "conv2", example_input=x)
    else:
        assert_gradcam_oracle(camfunc.split(model, "conv2", example_input=x), model, "conv2", x, CLASSES)


# ----------------------------------------------------------------------------
# A layer returning a list


class TwoScales(nn.Module):
    """Returns a list of two maps at two resolutions, as HRNet's stages do."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(6, 6, 3, padding=1)
        self.coarse = nn.Conv2d(6, 6, 3, stride=2, padding=1)

    def forward(self, h):
        return [F.relu(self.fine(h)), F.relu(self.coarse(h))]


class ListNet(nn.Module):
    def __init__(self, traceable: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.traceable = traceable
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.branches = TwoScales()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        if not self.traceable:
            fx_refuses(h)
        y = self.branches(h)
        # y[-1] is element 1: the cut at 'branches[1]' must reach it whichever way it is read.
        return self.fc(torch.cat([y[0].mean((2, 3)), y[-1].amax((2, 3))], 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("item", [0, 1, -1])
def test_an_element_of_a_list_output_is_cut_with_the_index_syntax(shape, item):
    model = ListNet().eval()
    x = image(shape)
    s = camfunc.check(camfunc.split(model, f"branches[{item}]"), model, x)
    assert s.layers == (f"branches[{item}]",)
    assert_gradcam_oracle(s, model, "branches", x, CLASSES, item=item)


def test_two_elements_of_one_list_output_are_two_cuts():
    model = ListNet().eval()
    x = image(SHAPES[1])
    s = camfunc.check(camfunc.split(model, ["branches[1]", "branches[0]"]), model, x)
    coarse, fine = camfunc.gradcam(s, x, CLASSES, normalize=False)  # in the order given
    assert fine.shape == (2, 16, 24) and coarse.shape == (2, 8, 12)
    for got, item in ((fine, 0), (coarse, 1)):
        alone = camfunc.gradcam(camfunc.split(model, f"branches[{item}]"), x, CLASSES, normalize=False)
        torch.testing.assert_close(got, alone)


def test_a_list_output_without_an_index_is_a_one_line_error_naming_the_syntax():
    model = ListNet().eval()
    s = camfunc.split(model, "branches")
    with pytest.raises(ValueError, match=r"^layer 'branches' outputs a list of 2, not one tensor; "
                                         r"pick an element with camfunc.split\(model, 'branches\[0\]'\) \(0 to 1\)$"):
        camfunc.gradcam(s, image(SHAPES[0]), CLASSES)


def test_an_index_on_an_exported_model_is_a_one_line_error():
    model = ListNet(traceable=False).eval()
    with pytest.raises(CaptureError, match=r"'branches' hands 2 tensors.*'layer\[i\]', is cut only in "
                                           r"models torch.fx traces"):
        camfunc.split(model, "branches[0]", example_input=image(SHAPES[0]))


def test_an_index_on_an_unknown_module_names_the_module():
    with pytest.raises(ValueError, match="unknown layer 'branchez'.*'branches'"):
        camfunc.split(ListNet(), "branchez[0]")


# ----------------------------------------------------------------------------
# Checkpointing


class Checkpointed(nn.Module):
    """A block run through torch.utils.checkpoint; fx traces it, or export when fx cannot."""

    def __init__(self, traceable: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.traceable = traceable
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Block(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        if not self.traceable:
            fx_refuses(h)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "export"])
def test_a_module_run_through_checkpoint_is_cut_at_its_output(shape, traceable):
    model = Checkpointed(traceable).eval()
    x = image(shape)
    s = camfunc.check(camfunc.split(model, "block", example_input=x), model, x)
    assert_gradcam_oracle(s, model, "block", x, CLASSES)


class StagesCheckpointed(nn.Module):
    """timm's gradient checkpointing: ``checkpoint_seq`` calls the blocks inside the stage
    one by one, so the stage module itself is never called."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stage = nn.Sequential(Block(6), Block(6))
        self.fc = nn.Linear(6, 5)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x):
        h = F.relu(self.stem(x))
        if self.grad_checkpointing:
            for block in self.stage:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        else:
            h = self.stage(h)
        return self.fc(h.mean((2, 3)))


def test_a_stage_hidden_by_gradient_checkpointing_is_a_one_line_error_naming_the_switch():
    model = StagesCheckpointed().eval()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r"^layer 'stage' is never called: StagesCheckpointed has gradient "
                                         r"checkpointing on.*model.set_grad_checkpointing\(False\) and split "
                                         r"again, or cut at a block such as 'stage.1'$"):
        camfunc.split(model, "stage")


@pytest.mark.parametrize("shape", SHAPES)
def test_a_block_under_gradient_checkpointing_and_the_stage_without_it_give_the_oracle(shape):
    model = StagesCheckpointed().eval()
    x = image(shape)
    model.set_grad_checkpointing(True)
    block = assert_gradcam_oracle(camfunc.split(model, "stage.1"), model, "stage.1", x, CLASSES)
    model.set_grad_checkpointing(False)
    stage = assert_gradcam_oracle(camfunc.split(model, "stage"), model, "stage", x, CLASSES)
    torch.testing.assert_close(block, stage)


# ----------------------------------------------------------------------------
# Scripted models


@pytest.mark.parametrize("script", [torch.jit.script, lambda m: torch.jit.trace(m, image((2, 3, 8, 8)))],
                         ids=["script", "trace"])
@pytest.mark.parametrize("example", [False, True])
def test_a_torchscript_model_is_refused_up_front_in_one_line(script, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's notice that it is deprecated
        scripted = script(small_cnn())
    x = image((2, 3, 8, 8)) if example else None
    with pytest.raises(CaptureError, match=r"^model is a TorchScript module \(\w+\), which camfunc cannot "
                                           r"capture; pass the original nn.Module, or build the split by "
                                           r"hand: camfunc.Split\(head, tail\)$"):
        camfunc.split(scripted, "3", example_input=x)


# ----------------------------------------------------------------------------
# Class tokens


class TokenNet(nn.Module):
    """A ViT-like toy with one class token stored under ``token_name`` (as CLIP's
    ``class_embedding`` is a 1-D parameter), and a second branch with its own class
    token of another width when ``branches`` (as CrossViT has)."""

    def __init__(self, token_name: str = "cls_token", branches: bool = False, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.token_name, self.branches = token_name, branches
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        shape = (width,) if token_name == "class_embedding" else (1, 1, width)
        setattr(self, token_name, nn.Parameter(torch.randn(shape)))
        if branches:  # a second branch: its own class token, another width
            self.cls_token_1 = nn.Parameter(torch.randn(1, 1, width + 4))
            self.side = nn.Linear(width, width + 4)
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        cls = getattr(self, self.token_name).reshape(1, 1, -1).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], 1)
        t = t + self.block(t)
        t = t + t.mean(1, keepdim=True)  # patches reach the class token
        out = self.head(t[:, 0])
        if self.branches:
            side = torch.cat([self.cls_token_1.expand(t.shape[0], -1, -1), self.side(t[:, 1:])], 1)
            out = out + side[:, 0, :5]
        return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("token_name,branches", [("cls_token", False), ("class_embedding", False),
                                                 ("cls_token_0", True)])
def test_class_tokens_are_counted_without_prefix_tokens(shape, token_name, branches):
    model = TokenNet(token_name, branches).eval()
    x = image(shape)
    grid = (shape[2] // 4, shape[3] // 4)
    assert_gradcam_oracle(camfunc.split(model, "block"), model, "block", x, CLASSES, tokens_to_grid(1, grid))


@pytest.mark.parametrize("token_name", ["cls_token", "class_embedding"])
def test_the_layer_search_picks_the_token_layer(token_name):
    model = TokenNet(token_name).eval()
    x = image(SHAPES[1])
    with pytest.warns(camfunc.LayerChoiceWarning, match="'block'"):
        s = camfunc.split(model, example_input=x)
    assert_gradcam_oracle(s, model, "block", x, CLASSES, tokens_to_grid(1, (4, 6)))


def test_the_layer_search_does_not_fall_back_in_silence_past_tokens_it_cannot_read():
    model = TokenNet("summary").eval()  # a class token under a name camfunc does not know
    x = image(SHAPES[0])
    with pytest.raises(ValueError, match=r"^camfunc.split would pick layer 'patch', earlier than 'block', "
                                         r"whose output it cannot read as a map: 17 tokens fit no grid.*"
                                         r"prefix_tokens="):
        camfunc.split(model, example_input=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", camfunc.LayerChoiceWarning)
        s = camfunc.split(model, example_input=x, prefix_tokens=1)
    assert s.layers == ("block",)
