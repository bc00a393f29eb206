"""Ultralytics YOLO (YOLOv8n and YOLO11n built from their YAML configs, random weights, no
download), split at a backbone and at a neck layer (torch.export captures them; fx cannot):
Grad-CAM with a box-score target over YOLO's own output, and Eigen-CAM, equal
pytorch-grad-cam's at a square and a non-square size, with the model untouched.

The peer has no YOLOv8 target. It gets a model wrapped to return torchvision's per-image
dicts, built here with Ultralytics' own box conversion, and its ``FasterRCNNBoxScoreTarget``;
camfunc gets ``targets.box_score(..., decode=targets.yolo_detections)``. tests/conftest.py
sets ``YOLO_OFFLINE=1`` so that importing Ultralytics looks for no network.
"""

import functools
import json
import types

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, pytorch_grad_cam_box_gradcam, pytorch_grad_cam_raw, snapshot
from PIL import Image
from torch import nn

import camfunc
import camfunc.runs


@functools.cache
def ultralytics():
    """Ultralytics' parts, imported on first use. Importing Ultralytics replaces PIL's
    ``Image.open`` for the whole process (a file that does not open makes it look for a
    HEIF plugin, and fail with ModuleNotFoundError), so the original is put back: the other
    tests read images as a user without Ultralytics does."""
    original = Image.open
    try:
        from ultralytics.nn.tasks import DetectionModel
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.ops import xywh2xyxy
    finally:
        Image.open = original
    return types.SimpleNamespace(DetectionModel=DetectionModel, xywh2xyxy=xywh2xyxy,
                                 non_max_suppression=non_max_suppression)

SIZES = [(160, 160), (128, 224)]
CASES = [("yolov8n.yaml", "model.9"),    # the backbone's last block (SPPF), stride 32
         ("yolo11n.yaml", "model.16")]   # the neck's stride-8 output, which the detect head reads


@functools.cache
def _built(config):
    torch.manual_seed(0)
    model = ultralytics().DetectionModel(config, nc=5, verbose=False)
    # Random convolutions shrink activations layer by layer (to ~1e-16 gradients at the
    # layer): one training-mode pass sets each batch norm's statistics to that batch's.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 160, 160))
        for branch in model.model[-1].cv3:  # its prior (about 1e-4) would leave no detection
            branch[-1].bias.zero_()
    return model.eval()


def _references(predictions, counts=(3, 1)):
    """Boxes to explain from Ultralytics' own NMS: each image's best detection of each of
    its first labels, 3 in one image and 1 in the other."""
    boxes, labels = [], []
    for found, count in zip(ultralytics().non_max_suppression(predictions, conf_thres=0.25, iou_thres=0.7),
                            counts, strict=True):
        _, first = np.unique(found[:, 5].numpy(), return_index=True)  # sorted by score already
        keep = torch.from_numpy(np.sort(first)[:count])
        assert len(keep) == count
        boxes.append(found[keep, :4])
        labels.append(found[keep, 5].long())
    return boxes, labels


class _Dicts(nn.Module):
    """YOLO's output as torchvision detections, every anchor one: for the peer's target."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        predictions = self.model(x)[0]  # (B, 4 + classes, anchors)
        boxes = ultralytics().xywh2xyxy(predictions[:, :4].transpose(1, 2))
        scores, labels = predictions[:, 4:].max(1)
        return [{"boxes": b, "scores": s, "labels": lab}
                for b, s, lab in zip(boxes, scores, labels, strict=True)]


@pytest.mark.parametrize("size", SIZES, ids=["square", "non-square"])
@pytest.mark.parametrize(("config", "layer"), CASES, ids=["yolov8n", "yolo11n"])
def test_gradcam_and_eigencam_equal_the_peers(config, layer, size):
    model = _built(config)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predictions = model(x)[0]
    before = snapshot(model)
    s = camfunc.split(model, layer, example_input=x)
    with torch.no_grad():
        assert torch.equal(s(x)[0], predictions)  # the split is the model
    boxes, labels = _references(predictions)
    target = camfunc.targets.box_score(boxes, labels, decode=camfunc.targets.yolo_detections)
    maps = camfunc.gradcam(s, x, target, normalize=False)
    eigen = camfunc.eigencam(s, x, target, normalize=False)
    labels[1] = (labels[1] + 1) % 5  # no anchor has this label at that box: nothing matches
    unmatched = camfunc.gradcam(s, x, camfunc.targets.box_score(
        boxes, labels, decode=camfunc.targets.yolo_detections), normalize=False)
    labels[1] = (labels[1] - 1) % 5
    assert_unchanged(before, model)

    module = model.get_submodule(layer)
    peer = pytorch_grad_cam_box_gradcam(_Dicts(model), module, x, boxes, labels)
    # One image's weighted sum may be negative everywhere (random weights): ReLU'd to 0.
    assert maps.shape == peer.shape and peer.max() > 0
    assert torch.allclose(maps, peer, rtol=1e-4, atol=1e-5 * peer.max().item())
    assert torch.allclose(unmatched[0], maps[0])
    assert torch.equal(unmatched[1], torch.zeros_like(maps[1]))

    from pytorch_grad_cam import EigenCAM

    with EigenCAM(model, [module]) as extractor:
        projection = pytorch_grad_cam_raw(extractor, module, x, [0, 0], relu=False)
    # The peer's sign is the SVD's; camfunc's makes the largest magnitude positive.
    flat = projection.flatten(1)
    sign = flat.gather(1, flat.abs().argmax(1, keepdim=True)).sign().view(-1, 1, 1)
    expected = (sign * projection).clamp_min(0)
    assert eigen.shape == expected.shape and (expected.flatten(1).amax(1) > 0).all()
    assert torch.allclose(eigen, expected, rtol=1e-4, atol=1e-5 * expected.max().item())


def test_ultralytics_leaves_pil_as_it_was():
    ultralytics()
    assert Image.open.__module__ == "PIL.Image"  # not Ultralytics' replacement


def test_with_ultralytics_pil_an_unreadable_image_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch,
                                                                                capsys):
    # A user who imported Ultralytics has its Image.open, which raises ModuleNotFoundError
    # (its HEIF plugin) for a file PIL cannot identify: one failure, not the end of the job.
    from ultralytics.utils import patches

    from camfunc.cli import main

    ultralytics()
    monkeypatch.setattr(Image, "open", patches.image_open)
    good, corrupt = tmp_path / "good.png", tmp_path / "corrupt.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    corrupt.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert main(["explain", str(corrupt), str(good), "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [f["path"] for f in summary["failed"]] == [str(corrupt)]
    assert summary["failed"][0]["reason"].startswith("ModuleNotFoundError: ")
    assert len(summary["images"]) == 1
    folder = tmp_path / "data" / "anything"
    folder.mkdir(parents=True)
    for path in (good, corrupt):
        (folder / path.name).write_bytes(path.read_bytes())
    result = camfunc.runs.run(tmp_path / "data", tmp_path / "run", progress=False)
    assert result.failed == 1 and result.images == 1
