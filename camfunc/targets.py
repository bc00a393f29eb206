r"""Targets for models that are not plain classifiers: callables ``output -> (B,)`` or ``(B, K)``.

Every method takes a callable ``cls``; these are the ones pytorch-grad-cam's tutorials
write by hand, as values. Each reads sample ``i``'s score from row ``i`` of the
output (or from the ``i``-th element of a list of per-sample outputs, as torchvision's
detectors return), so they compose with every method and metric, including those that
run the model on many derived inputs per sample (Score-CAM, ROAD, ...).

Per-sample arguments (classes, masks, concept vectors, reference boxes) are given
for the batch as it is: one per image, or one shared by all.

Example:
    >>> seg = camfunc.split(segmenter, "backbone.layer4")
    >>> road = camfunc.targets.segmentation(7, masks)      # class 7's logits summed over masks
    >>> camfunc.gradcam(seg, x, road).shape
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from camfunc._core.targets import class_scores

__all__ = ["Binary", "BoxScore", "Segmentation", "Similarity", "Softmax", "binary", "box_score",
           "clip", "segmentation", "similarity", "softmax", "yolo_detections"]


def _per_sample(values: Tensor, shared_ndim: int, batch: int, device: torch.device,
                name: str) -> Tensor:
    """``values`` given once for all samples (``shared_ndim`` axes) or once per sample (one
    more, first), as ``(B, ...)``."""
    values = values.to(device)
    if values.ndim == shared_ndim:
        return values.expand(batch, *values.shape)
    if values.ndim != shared_ndim + 1 or values.shape[0] != batch:
        raise ValueError(f"{name} must be given once for every sample ({shared_ndim} axes) or once "
                         f"per sample ({batch}, ...), got shape {tuple(values.shape)}")
    return values


def _as_classes(cls: int | Sequence[int] | Tensor) -> Tensor:
    classes = torch.as_tensor(cls)
    if classes.dtype.is_floating_point or classes.dtype == torch.bool or classes.ndim > 1:
        raise ValueError(f"classes must be an int or one int per sample, got {cls!r}")
    return classes


def _pick(scores: Tensor, classes: Tensor) -> Tensor:
    """Row i's entry ``classes[i]`` (or the one class for every row) of ``(B, C, ...)`` scores."""
    index = _per_sample(classes, 0, scores.shape[0], scores.device, "classes").long()
    return scores.gather(1, index.view(-1, 1, *([1] * (scores.ndim - 2))).expand(
        -1, 1, *scores.shape[2:])).squeeze(1)


def _dense(output: Any) -> Tensor:
    """The dense scores of a model's output: a tensor, HF's ``logits``, torchvision's ``out``."""
    if isinstance(output, Mapping) and "out" in output and "logits" not in output:
        dense: Tensor = output["out"]
        return dense
    return class_scores(output)


@dataclasses.dataclass(frozen=True)
class Softmax:
    """See :func:`softmax`."""

    classes: Tensor

    def __call__(self, output: Any) -> Tensor:
        return _pick(torch.softmax(class_scores(output), dim=1), self.classes)


def softmax(cls: int | Sequence[int] | Tensor) -> Softmax:
    r"""The probability of class ``cls`` (one, or one per sample): :math:`\mathrm{softmax}(y)_c`.

    pytorch-grad-cam: ``ClassifierOutputSoftmaxTarget(c)``. The raw logit (its
    ``ClassifierOutputTarget``) is a plain int ``cls``.

    Example:
        >>> camfunc.gradcam(s, x, camfunc.targets.softmax(3)).shape
        torch.Size([2, 4, 4])
    """
    return Softmax(_as_classes(cls))


@dataclasses.dataclass(frozen=True)
class Binary:
    """See :func:`binary`."""

    positive: Tensor

    def __call__(self, output: Any) -> Tensor:
        score = class_scores(output)
        score = score.reshape(score.shape[0], -1)
        if score.shape[1] != 1:
            raise ValueError(f"binary targets a model with one output per sample, got "
                             f"{tuple(score.shape[1:])} per sample; for C classes pass a class index")
        sign = _per_sample(self.positive, 0, score.shape[0], score.device, "positive").to(score.dtype)
        return score[:, 0] * (2 * sign - 1)


def binary(positive: bool | int | Sequence[int] | Tensor = True) -> Binary:
    r"""A one-logit classifier's evidence for the positive class (``+y``) or against it (``-y``).

    pytorch-grad-cam: ``BinaryClassifierOutputTarget(1)`` is ``binary(True)``, ``(0)`` is ``binary(False)``.

    Example:
        >>> camfunc.gradcam(s, x, camfunc.targets.binary(False)).shape   # what argues "no"
        torch.Size([2, 4, 4])
    """
    flags = torch.as_tensor(positive)
    if flags.dtype.is_floating_point or flags.ndim > 1 or not bool(((flags == 0) | (flags == 1)).all()):
        raise ValueError(f"positive must be True/False (or 1/0), one or one per sample, got {positive!r}")
    return Binary(flags.long())


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """See :func:`segmentation`."""

    classes: Tensor
    mask: Tensor

    def __call__(self, output: Any) -> Tensor:
        scores = _dense(output)
        if scores.ndim < 3:
            raise ValueError(f"segmentation needs dense scores (B, C, *spatial), got shape "
                             f"{tuple(scores.shape)}")
        picked = _pick(scores, self.classes)  # (B, *spatial)
        if self.mask.shape[-picked.ndim + 1:] != picked.shape[1:]:
            raise ValueError(f"the mask is {tuple(self.mask.shape)} but the scores are "
                             f"{tuple(picked.shape[1:])} per sample; give a mask at the output's size")
        mask = _per_sample(self.mask, picked.ndim - 1, picked.shape[0], picked.device,
                           "mask").to(picked.dtype)
        return (picked * mask).flatten(1).sum(1)


def segmentation(cls: int | Sequence[int] | Tensor, mask: Tensor) -> Segmentation:
    r"""A class's dense scores summed over a mask: :math:`\sum_{p} y_{c,p}\, m_p`.

    ``mask`` is ``(*spatial)`` for every sample or ``(B, *spatial)``, at the output's
    size (bool or weights). The scores are the output itself, HF's ``logits`` or
    torchvision's ``out``. pytorch-grad-cam: ``SemanticSegmentationTarget(c, mask)``.

    Example:
        >>> mask = output["out"].argmax(1) == 7
        >>> camfunc.gradcam(seg, x, camfunc.targets.segmentation(7, mask)).shape
    """
    return Segmentation(_as_classes(cls), torch.as_tensor(mask))


def _embedding(output: Any) -> Tensor:
    """An embedding model's output: a ``(B, D)`` tensor, or HF's ``image_embeds`` /
    ``pooler_output`` / ``text_embeds``."""
    if isinstance(output, Tensor):
        return output.flatten(1)
    for key in ("image_embeds", "pooler_output", "embeddings"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, Tensor):
            return value.flatten(1)
    raise ValueError(f"similarity needs a (B, D) embedding, got {type(output).__name__}; "
                     "give a model that returns the embedding (or one with image_embeds)")


@dataclasses.dataclass(frozen=True)
class Similarity:
    """See :func:`similarity` and :func:`clip`."""

    concepts: Tensor  # (D,), (B, D), (K, D) with several, or (B, K, D)
    several: bool
    scale: float

    def __call__(self, output: Any) -> Tensor:
        embedding = _embedding(output)  # (B, D)
        batch = embedding.shape[0]
        concepts = self.concepts.to(embedding.dtype)
        if not self.several:
            concepts = concepts.unsqueeze(-2)  # one concept: K = 1
        concepts = _per_sample(concepts, 2, batch, embedding.device, "the concept")
        cosine = torch.nn.functional.cosine_similarity(embedding.unsqueeze(1), concepts, dim=-1)
        scores = self.scale * cosine  # (B, K)
        return scores if self.several else scores[:, 0]


def similarity(concept: Tensor) -> Similarity:
    r"""The cosine similarity of the output embedding to a concept vector:
    :math:`\frac{e \cdot v}{\|e\|\,\|v\|}`.

    ``concept`` is ``(D,)`` for every sample or ``(B, D)``. pytorch-grad-cam's
    embeddings tutorial writes it as ``SimilarityToConceptTarget``.

    Example:
        >>> concept = embedder(reference_images).mean(0)
        >>> camfunc.gradcam(s, x, camfunc.targets.similarity(concept)).shape
    """
    return Similarity(torch.as_tensor(concept), several=False, scale=1.0)


def clip(text_features: Tensor, logit_scale: float | Tensor = 1.0) -> Similarity:
    r"""CLIP's image-text score: :math:`s\,\cos(e_{image}, e_{text})` for each text.

    ``text_features`` are the text tower's projected embeddings, ``(D,)`` for one
    text (output ``(B,)``) or ``(K, D)`` for K texts (output ``(B, K)``, maps
    ``(B, K, *spatial)``); the model's output is the image embedding (HF
    ``get_image_features``, open_clip ``encode_image``). With the model's
    ``logit_scale.exp()`` the scores are its ``logits_per_image``.

    Example:
        >>> texts = clip_model.get_text_features(**tokens)        # (K, D)
        >>> camfunc.gradcam(s, x, camfunc.targets.clip(texts)).shape
    """
    features = torch.as_tensor(text_features).detach()
    if features.ndim not in (1, 2):
        raise ValueError(f"text_features must be (D,) or (K, D), got shape {tuple(features.shape)}")
    scale = float(logit_scale.detach()) if isinstance(logit_scale, Tensor) else float(logit_scale)
    return Similarity(features, several=features.ndim == 2, scale=scale)


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box of ``a`` (N, 4) with each of ``b`` (M, 4), boxes as x1, y1, x2, y2."""
    from torchvision.ops import box_iou

    iou: Tensor = box_iou(a, b)
    return iou


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of box ``a[i]`` with box ``b[i]``: the same formula, for the matched pairs only."""
    corners = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0)
    inter = corners.prod(1)
    areas = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (areas - inter)


@dataclasses.dataclass(frozen=True)
class BoxScore:
    """See :func:`box_score`."""

    boxes: tuple[Tensor, ...]
    labels: tuple[Tensor, ...]
    iou_threshold: float
    decode: Callable[[Any], Any] | None = None

    def __call__(self, output: Any) -> Tensor:
        if self.decode is not None:
            output = self.decode(output)
        if not isinstance(output, Sequence) or not all(isinstance(o, Mapping) for o in output):
            raise ValueError(f"box_score reads a detector's list of per-image dicts (boxes, labels, "
                             f"scores), got {type(output).__name__}")
        if len(output) != len(self.boxes):
            raise ValueError(f"box_score was given reference boxes for {len(self.boxes)} images, "
                             f"the detector returned {len(output)}")
        return torch.stack([self._one(found, boxes, labels)
                            for found, boxes, labels in zip(output, self.boxes, self.labels,
                                                            strict=True)])

    def _one(self, found: Mapping[str, Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        # Zero times the scores, not a constant: an image with no match keeps its graph
        # (its map is zero, as the peer's), so it is not mistaken for a disconnected target.
        total = found["scores"].sum() * 0
        if len(found["boxes"]) == 0 or len(boxes) == 0:
            return total
        references = boxes.to(found["boxes"])
        with torch.no_grad():  # which detection each reference takes is a choice, not differentiated
            ious = _box_iou(references, found["boxes"])  # (references, detections)
            best = ious.argmax(1)  # the first of equal IoUs (a NaN of a degenerate box first), as the peer's
            best_iou = ious.gather(1, best.unsqueeze(1)).squeeze(1)
            matched = (best_iou > self.iou_threshold) & (found["labels"][best] == labels.to(best.device))
        # Only matched pairs enter the graph: a degenerate box's 0/0 IoU must not reach the gradient.
        rows = matched.nonzero().squeeze(1)
        chosen = best[rows]
        return total + (_paired_iou(references[rows], found["boxes"][chosen])
                        + found["scores"][chosen]).sum()


def box_score(boxes: Tensor | Sequence[Tensor], labels: Tensor | Sequence[Tensor],
              iou_threshold: float = 0.5, *,
              decode: Callable[[Any], Any] | None = None) -> BoxScore:
    r"""How well a detector still finds the reference boxes: for each reference box, the
    detection with the highest IoU; if that IoU is above ``iou_threshold`` and its label is
    the box's, it adds :math:`\mathrm{IoU} + \mathrm{score}`. Summed per image; an image
    where nothing matches scores 0 (a zero map).

    ``boxes`` is ``(N, 4)`` (x1, y1, x2, y2) for a single image, or a list with one
    ``(N_i, 4)`` per image (the numbers may differ); ``labels`` likewise. The output
    read is torchvision's list of per-image dicts with ``boxes``, ``labels`` and
    ``scores``. pytorch-grad-cam: ``FasterRCNNBoxScoreTarget(labels, boxes, iou_threshold)``,
    one per image. The gradient flows through the kept detections' scores and box
    coordinates; which detections were kept (NMS, top-k) is a choice, not differentiated.

    Example:
        >>> found = detector(x)                               # the detections to explain
        >>> target = camfunc.targets.box_score([f["boxes"] for f in found], [f["labels"] for f in found])
        >>> camfunc.eigencam(s, x, target).shape
    """
    if isinstance(boxes, Tensor):
        boxes, labels = [boxes], [torch.as_tensor(labels)]
    if isinstance(labels, Tensor) or len(boxes) != len(labels):
        raise ValueError("box_score needs one labels tensor per boxes tensor (one pair per image), "
                         f"got {len(boxes)} boxes and {type(labels).__name__} labels")
    checked = []
    for each in boxes:
        each = torch.as_tensor(each, dtype=torch.float32).detach()
        if each.ndim != 2 or each.shape[-1] != 4:
            raise ValueError(f"each image's boxes must be (N, 4) as x1, y1, x2, y2, got shape "
                             f"{tuple(each.shape)}")
        checked.append(each)
    return BoxScore(tuple(checked), tuple(torch.as_tensor(each).long().detach() for each in labels),
                    float(iou_threshold), decode)


def yolo_detections(output: Any) -> list[dict[str, Tensor]]:
    r"""An Ultralytics YOLO output as torchvision's per-image dicts, every anchor a detection.

    Reads the ``(B, 4 + C, N)`` tensor that Ultralytics' ``Detect`` head returns in eval
    mode (alone, or first in its ``(predictions, raw)`` pair): for anchor :math:`n`, a box
    :math:`(c_x, c_y, w, h)` in input pixels and C class probabilities :math:`p_{c,n}`.
    Image ``i`` gets ``boxes`` :math:`(c_x \mp w/2,\ c_y \mp h/2)` as x1, y1, x2, y2,
    ``scores`` :math:`\max_c p_{c,n}` and ``labels`` :math:`\arg\max_c p_{c,n}`, for all
    N anchors. There is no NMS and no threshold, so :func:`box_score` compares each
    reference box with every anchor; a box taken from the model's own (NMS'd) detections
    matches the anchor it came from. A head switched to end-to-end decoding (its ``end2end``
    flag, YOLOv10 and YOLO26) returns ``(B, max_det, 6)`` instead, which is refused.
    pytorch-grad-cam has no YOLOv8 target; its ``FasterRCNNBoxScoreTarget``, on a model
    wrapped to return these dicts, scores the same.

    Example:
        >>> s = camfunc.split(yolo, "model.9", example_input=x)   # a DetectionModel
        >>> decode = camfunc.targets.yolo_detections
        >>> target = camfunc.targets.box_score(boxes, labels, decode=decode)
        >>> camfunc.gradcam(s, x, target).shape
    """
    predictions = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(predictions, Tensor) or predictions.ndim != 3 or predictions.shape[1] < 5:
        got = tuple(predictions.shape) if isinstance(predictions, Tensor) else type(output).__name__
        raise ValueError(f"yolo_detections reads a YOLO Detect output (B, 4 + classes, anchors), "
                         f"got {got}")
    if predictions.shape[2] == 6:  # a Detect head has at least 21 anchors (three levels)
        raise ValueError(f"yolo_detections reads (B, 4 + classes, anchors); "
                         f"{tuple(predictions.shape)} looks like an end-to-end head's "
                         "(B, max_det, 6) detections")
    centre, half = predictions[:, :2], predictions[:, 2:4] / 2
    boxes = torch.cat([centre - half, centre + half], 1).transpose(1, 2)  # (B, N, 4)
    scores, labels = predictions[:, 4:].max(1)
    return [{"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(boxes, scores, labels, strict=True)]
