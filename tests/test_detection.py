"""Detectors: torchvision's Faster R-CNN, RetinaNet, FCOS and Mask R-CNN split at a backbone
layer from their own modules, giving pytorch-grad-cam's Grad-CAM (box-score target, its own
hooks) and Eigen-CAM maps, at a square and a non-square size, with the model untouched."""

import pytest
import torch
from helpers import assert_unchanged, pytorch_grad_cam_box_gradcam, pytorch_grad_cam_raw, snapshot
from torchvision.models.detection import (
    FCOS,
    MaskRCNN,
    RetinaNet,
    fasterrcnn_mobilenet_v3_large_320_fpn,
)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import camfunc

SIZES = [(128, 128), (120, 176)]
# Few proposals: the R-CNN box heads cost what they are given, and 2 CPU cores run the suite.
SMALL_RPN = {"rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 50}


def _resnet18_fpn(**options):
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5, **options)


def _faster_rcnn():
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                  box_detections_per_img=10, **SMALL_RPN)
    model.roi_heads.score_thresh = 0.0  # random weights: keep detections to explain
    return model, "backbone.body.13"


def _retinanet():
    backbone = _resnet18_fpn(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes=5, min_size=128, max_size=192, score_thresh=0.0,
                      detections_per_img=10)
    return model, "backbone.body.layer3"


def _fcos():
    backbone = _resnet18_fpn(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = FCOS(backbone, num_classes=5, min_size=128, max_size=192, score_thresh=0.0,
                 detections_per_img=10)
    with torch.no_grad():  # untrained, its ReLU'd box offsets are mostly 0: boxes of no extent
        model.head.regression_head.bbox_reg.bias.fill_(1.0)
    return model, "backbone.body.layer3"


def _mask_rcnn():
    model = MaskRCNN(_resnet18_fpn(), num_classes=5, min_size=128, max_size=192,
                     box_score_thresh=0.0, box_detections_per_img=10, **SMALL_RPN)
    return model, "backbone.body.layer2"


DETECTORS = {"faster_rcnn": _faster_rcnn, "retinanet": _retinanet, "fcos": _fcos,
             "mask_rcnn": _mask_rcnn}


def _built(name):
    torch.manual_seed(0)
    model, layer = DETECTORS[name]()
    return model.eval(), layer


def _references(found, counts=(3, 1)):
    """Each image's first non-empty detections as the boxes to explain: 3 in one, 1 in the other. A
    detector may return one box under several labels (FCOS, R-CNN's per-class boxes); the
    label is the one the box-score rule finds first, so that every reference matches."""
    from torchvision.ops import box_iou

    def clear(f):  # random weights make empty and inverted boxes, whose IoUs are 0/0
        areas = (f["boxes"][:, 2:] - f["boxes"][:, :2]).prod(1)
        return (areas > 1) & torch.isfinite(box_iou(f["boxes"], f["boxes"])).all(1)

    boxes = [f["boxes"][clear(f)][:n].detach() for f, n in zip(found, counts, strict=True)]
    labels = [f["labels"][box_iou(b, f["boxes"]).argmax(1)] for b, f in zip(boxes, found, strict=True)]
    return boxes, labels


@pytest.mark.parametrize("size", SIZES, ids=["square", "non-square"])
@pytest.mark.parametrize("name", list(DETECTORS))
def test_gradcam_and_eigencam_equal_the_peers(name, size):
    model, layer = _built(name)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        found = model(list(x))
    before = snapshot(model)
    s = camfunc.split(model, layer)
    with torch.no_grad():
        again = s(x)
    for ours, theirs in zip(again, found, strict=True):  # the split is the model
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    boxes, labels = _references(found)
    maps = camfunc.gradcam(s, x, camfunc.targets.box_score(boxes, labels), normalize=False)
    eigen = camfunc.eigencam(s, x, camfunc.targets.box_score(boxes, labels), normalize=False)
    assert_unchanged(before, model)

    module = model.get_submodule(layer)
    peer = pytorch_grad_cam_box_gradcam(model, module, x, boxes, labels)
    assert maps.shape == peer.shape and peer.max() > 0
    assert torch.allclose(maps, peer, rtol=1e-4, atol=1e-5 * peer.max().item())

    from pytorch_grad_cam import EigenCAM

    with EigenCAM(model, [module]) as extractor:  # its sign is the SVD's; camfunc fixes one
        projection = pytorch_grad_cam_raw(extractor, module, x, [0, 0], relu=False)
    for ours, theirs in zip(eigen, projection, strict=True):
        assert any(torch.allclose(ours, (sign * theirs).clamp_min(0), rtol=1e-4,
                                  atol=1e-5 * theirs.abs().max().item()) for sign in (1, -1))


def test_an_image_without_a_match_has_a_zero_map_beside_one_with_matches():
    model, layer = _built("faster_rcnn")
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        found = model(list(x))
    boxes, labels = _references(found)
    labels[1] = labels[1] + 1  # a label the detection does not have: nothing matches
    maps = camfunc.gradcam(camfunc.split(model, layer), x, camfunc.targets.box_score(boxes, labels),
                           normalize=False)
    assert maps[0].max() > 0 and torch.equal(maps[1], torch.zeros_like(maps[1]))


def test_layers_outside_the_body_and_options_are_one_line_errors():
    model, _ = _built("faster_rcnn")
    with pytest.raises(ValueError, match=r"backbone\.body\.NAME"):
        camfunc.split(model, "roi_heads")
    with pytest.raises(ValueError, match="one named layer"):
        camfunc.split(model, ["backbone.body.12", "backbone.body.13"])
    with pytest.raises(ValueError, match="takes no layout"):
        camfunc.split(model, "backbone.body.13", layout="tokens")


def test_a_detector_in_training_mode_is_refused():
    model, layer = _built("faster_rcnn")
    s = camfunc.split(model, layer)
    model.train()
    x = torch.rand(1, 3, 96, 128)
    with pytest.raises(ValueError, match="training mode"):
        camfunc.gradcam(s, x, camfunc.targets.box_score(torch.zeros(0, 4), torch.zeros(0)))
