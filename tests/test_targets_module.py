"""camfunc.targets: values by hand and by the papers' formulas, and maps equal to
pytorch-grad-cam's with its own targets and hooks (segmentation, embeddings, CLIP,
softmax and binary classifiers), and the box score equal to FasterRCNNBoxScoreTarget."""

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from helpers import small_cnn
from hypothesis import given, settings
from torch import nn

import camfunc
from camfunc import targets

# ---------------------------------------------------------------- raw values by hand


def test_softmax_by_hand():
    out = torch.tensor([[0.0, np.log(3.0)], [np.log(2.0), np.log(2.0)]], dtype=torch.float32)
    assert torch.allclose(targets.softmax(1)(out), torch.tensor([0.75, 0.5]))
    assert torch.allclose(targets.softmax([0, 1])(out), torch.tensor([0.25, 0.5]))


def test_binary_by_hand():
    out = torch.tensor([[2.0], [-3.0]])
    assert targets.binary(True)(out).tolist() == [2.0, -3.0]
    assert targets.binary(False)(out).tolist() == [-2.0, 3.0]
    assert targets.binary([1, 0])(out).tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="one output per sample"):
        targets.binary()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="True/False"):
        targets.binary(2)


@pytest.mark.parametrize("spatial", [(3,), (2, 3), (2, 2, 2)], ids=["1d", "2d", "3d"])
def test_segmentation_by_hand(spatial):
    # Class 1's scores are 1, 2, 3, ... in each sample; the mask keeps the first and last.
    n = int(np.prod(spatial))
    out = torch.zeros(2, 3, *spatial)
    out[:, 1] = torch.arange(1.0, n + 1).reshape(spatial)
    out[1, 1] *= 10
    mask = torch.zeros(spatial, dtype=torch.bool)
    mask.view(-1)[0] = mask.view(-1)[-1] = True
    assert targets.segmentation(1, mask)(out).tolist() == [1.0 + n, 10.0 * (1 + n)]
    assert targets.segmentation(1, mask)({"out": out}).tolist() == [1.0 + n, 10.0 * (1 + n)]
    per_sample = torch.stack([mask, ~mask])
    assert targets.segmentation(1, per_sample)(out)[1].item() == 10.0 * (n * (n + 1) / 2 - 1 - n)
    with pytest.raises(ValueError, match="at the output's size"):
        targets.segmentation(1, torch.ones(5, 5))(out)


def test_segmentation_mask_as_tall_as_the_batch_is_shared():
    # A (2, 2) mask on a batch of 2 is one mask for every sample, not one row each.
    out = torch.arange(16.0).reshape(2, 2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert targets.segmentation(0, mask)(out).tolist() == [0.0, 8.0]


def test_similarity_and_clip_by_hand():
    embedding = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    concept = torch.tensor([1.0, 0.0])
    assert torch.allclose(targets.similarity(concept)(embedding), torch.tensor([0.6, 0.0]))
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(targets.clip(texts, 10.0)(embedding),
                          torch.tensor([[6.0, 8.0], [0.0, -10.0]]))
    assert torch.allclose(targets.similarity(texts)(embedding), torch.tensor([0.6, -1.0]))


def test_box_score_by_hand():
    found = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]),
              "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "scores": torch.zeros(0)}]
    # Image 0: the first reference overlaps box 0 by 50/100 = 0.5 (not above 0.5 at the
    # default threshold), the second matches box 1 exactly but by the wrong label.
    reference = [torch.tensor([[0.0, 0, 5, 10], [20.0, 20, 30, 30]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0)]
    assert targets.box_score(reference, labels)(found).tolist() == [0.0, 0.0]
    assert targets.box_score(reference, labels, iou_threshold=0.4)(found).tolist() == \
        pytest.approx([0.5 + 0.9, 0.0])
    assert targets.box_score(reference, [torch.tensor([1, 2]), torch.zeros(0)], 0.4)(found).tolist() \
        == pytest.approx([0.5 + 0.9 + 1.0 + 0.8, 0.0])
    with pytest.raises(ValueError, match="for 1 images"):
        targets.box_score(reference[0], labels[0])(found)


def test_box_score_of_degenerate_boxes_is_finite_and_so_is_its_gradient():
    # A zero-area reference against a zero-area detection has IoU 0/0: no match, as the peer's.
    boxes = torch.tensor([[5.0, 5, 5, 5], [0.0, 0, 4, 4]], requires_grad=True)
    scores = torch.tensor([0.5, 0.25], requires_grad=True)
    found = [{"boxes": boxes, "labels": torch.tensor([1, 1]), "scores": scores}]
    target = targets.box_score(torch.tensor([[5.0, 5, 5, 5], [0.0, 0, 4, 3]]), torch.tensor([1, 1]))
    value = target(found)
    assert value.tolist() == [pytest.approx(0.75 + 0.25)]  # the second: IoU 12/16, score 0.25
    assert torch.isfinite(torch.autograd.grad(value.sum(), boxes)[0]).all()
    assert torch.allclose(value, _peer_box_scores(found, [torch.tensor([[5.0, 5, 5, 5], [0.0, 0, 4, 3]])],
                                                  [torch.tensor([1, 1])], 0.5))


def test_yolo_detections_and_a_box_score_through_them_by_hand():
    # One image, two anchors, two classes; rows cx, cy, w, h, p0, p1.
    out = torch.tensor([[[10.0, 30.0], [20.0, 30.0], [4.0, 10.0], [6.0, 2.0], [0.9, 0.2],
                         [0.3, 0.7]]])
    found = targets.yolo_detections((out, {}))  # the eval pair: its first element is read
    assert found[0]["boxes"].tolist() == [[8.0, 17.0, 12.0, 23.0], [25.0, 29.0, 35.0, 31.0]]
    assert found[0]["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert found[0]["labels"].tolist() == [0, 1]
    # The first reference is anchor 0's box shifted by 1: IoU 18/30; the second's anchor says class 1.
    target = targets.box_score(torch.tensor([[9.0, 17, 13, 23], [25.0, 29, 35, 31]]),
                               torch.tensor([0, 0]), decode=targets.yolo_detections)
    assert target(out).tolist() == pytest.approx([18 / 30 + 0.9])
    with pytest.raises(ValueError, match="end-to-end"):
        targets.yolo_detections(torch.zeros(1, 300, 6))
    with pytest.raises(ValueError, match="YOLO Detect output"):
        targets.yolo_detections(found)


# ---------------------------------------------------------------- against the peer's targets


def _peer_box_scores(found, reference, labels, threshold):
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    return torch.stack([FasterRCNNBoxScoreTarget(lab.tolist(), ref.numpy(), threshold)(f)[0]
                        for f, ref, lab in zip(found, reference, labels, strict=True)])


@st.composite
def _detections(draw, count):
    corners = draw(st.lists(st.tuples(*[st.sampled_from([0.0, 1.0, 2.0, 5.0, 7.5])] * 2,
                                      *[st.sampled_from([0.0, 1.0, 3.0, 8.0])] * 2),
                            min_size=count, max_size=count))
    boxes = torch.tensor([[x, y, x + w + 0.5, y + h + 0.5] for x, y, w, h in corners]).reshape(-1, 4)
    labels = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=count, max_size=count)))
    return boxes, labels


@settings(deadline=None)
@given(st.data(), st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=3),
       st.sampled_from([0.0, 0.3, 0.5]))
def test_box_score_equals_the_peers_target_and_its_gradient(data, counts, threshold):
    """Boxes on a coarse grid (so IoUs tie and land on the threshold), any number of
    detections and references per image, labels that do and do not match."""
    found, reference, labels = [], [], []
    for detected, referenced in counts:
        boxes, labs = data.draw(_detections(detected))
        scores = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0]),
                                                 min_size=detected, max_size=detected)))
        found.append({"boxes": boxes.requires_grad_(), "labels": labs,
                      "scores": scores.requires_grad_()})
        ref, ref_labels = data.draw(_detections(referenced))
        reference.append(ref)
        labels.append(ref_labels)
    ours = targets.box_score(reference, labels, threshold)(found)
    peers = _peer_box_scores(found, reference, labels, threshold)
    assert torch.allclose(ours, peers, atol=1e-6, rtol=0)
    leaves = [t for f in found for t in (f["boxes"], f["scores"])]
    # The peer's unmatched images have no graph at all; ours have a zero one.
    peer_grads = torch.autograd.grad(peers.sum(), leaves, allow_unused=True) \
        if peers.requires_grad else [None] * len(leaves)
    grads = torch.autograd.grad(ours.sum(), leaves, allow_unused=True)
    for leaf, g, p in zip(leaves, grads, peer_grads, strict=True):
        zero = torch.zeros_like(leaf)
        assert torch.allclose(zero if g is None else g, zero if p is None else p, atol=1e-6)


def _peer_raw(model, layer, x, peer_targets, reshape_transform=None):
    """pytorch-grad-cam's Grad-CAM at the layer's resolution, with its own hooks and targets."""
    from pytorch_grad_cam import GradCAM

    with GradCAM(model, [layer], reshape_transform=reshape_transform) as extractor:
        outputs = extractor.activations_and_grads(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(peer_targets, outputs, strict=True)).backward()
        acts = extractor.activations_and_grads.activations[0].cpu().numpy()
        grads = extractor.activations_and_grads.gradients[0].cpu().numpy()
        raw = extractor.get_cam_image(x, layer, peer_targets, acts, grads, False)
    return torch.from_numpy(np.maximum(raw, 0)).float()


def _ours(model, layer, x, target):
    return camfunc.gradcam(camfunc.split(model, layer, example_input=x), x, target, normalize=False)


def test_softmax_and_binary_maps_equal_the_peers():
    from pytorch_grad_cam.utils.model_targets import (
        BinaryClassifierOutputTarget,
        ClassifierOutputSoftmaxTarget,
    )

    model, x = small_cnn(classes=5), torch.randn(2, 3, 9, 13)
    peer = _peer_raw(model, model[3], x, [ClassifierOutputSoftmaxTarget(c) for c in (4, 1)])
    assert torch.allclose(_ours(model, "3", x, targets.softmax([4, 1])), peer, atol=1e-6)
    one_logit = small_cnn(classes=1, seed=3)
    for positive in (0, 1):
        peer = _peer_raw(one_logit, one_logit[3], x, [BinaryClassifierOutputTarget(positive)] * 2)
        assert torch.allclose(_ours(one_logit, "3", x, targets.binary(bool(positive))), peer,
                              atol=1e-6)


class _OutOnly(nn.Module):
    """What pytorch-grad-cam's segmentation tutorial wraps a torchvision model in."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_segmentation_maps_equal_the_peers_on_torchvision_lraspp(size):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        masks = model(x)["out"].argmax(1) == 2
    peer_targets = [SemanticSegmentationTarget(2, m.numpy().astype(np.float32)) for m in masks]
    wrapped = _OutOnly(model)
    peer = _peer_raw(wrapped, model.backbone["13"], x, peer_targets)
    ours = _ours(model, "backbone.13", x, targets.segmentation(2, masks))  # the dict output as it is
    assert torch.allclose(ours, peer, atol=1e-5 * peer.max().item())


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_similarity_maps_equal_the_peers_on_a_resnet_embedder(size):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = nn.Identity()
    model.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        concept = model(torch.randn(3, 3, *size)).mean(0)

    def peer_target(output):  # the embeddings tutorial's target, per sample
        return nn.functional.cosine_similarity(output, concept, dim=0)

    peer = _peer_raw(model, model.layer3, x, [peer_target, peer_target])
    ours = _ours(model, "layer3", x, targets.similarity(concept))
    assert torch.allclose(ours, peer, atol=1e-5 * peer.max().item())


class _ImageFeatures(nn.Module):
    """A CLIP model's image tower with its projection: pixels -> image embedding."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        tower = self.clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return self.clip.visual_projection(tower.pooler_output)


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_clip_maps_equal_the_peers_on_hf_clip(size):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=99, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config).eval()
    tokens = torch.randint(2, 99, (3, 7))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = model(input_ids=tokens, pixel_values=x, interpolate_pos_encoding=True)
        texts = whole.text_embeds
    image = _ImageFeatures(model)
    grid = (size[0] // 8, size[1] // 8)
    target = targets.clip(texts, model.logit_scale.exp())
    with torch.no_grad():  # the target's scores are the model's logits_per_image
        assert torch.allclose(target(image(x)), whole.logits_per_image, atol=1e-4)

    def to_grid(tokens):
        return tokens[:, 1:].reshape(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2)

    layer = "clip.vision_model.encoder.layers.1"
    for text in range(3):
        def peer_target(output, text=text):  # image-text logit, per sample
            return (model.logit_scale.exp() * nn.functional.cosine_similarity(
                output, texts[text], dim=0))

        peer = _peer_raw(image, image.clip.vision_model.encoder.layers[1], x,
                         [peer_target, peer_target], reshape_transform=to_grid)
        ours = camfunc.gradcam(camfunc.split(image, layer, example_input=x), x, target,
                               normalize=False)[:, text]
        assert torch.allclose(ours, peer, atol=1e-5 * peer.max().item())
