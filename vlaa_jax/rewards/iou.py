"""iou reward (LLaVA-CoT COCO / VG grounding): IoU in [0, 1] of the predicted and ground-truth boxes.

Boxes are [x1, y1, x2, y2]. The predicted box is read from the answer, in any of the forms models write
(docs/rewards.md lists them, and the ones rejected):
  * a bracketed group of four numbers: "[x1, y1, x2, y2]", "(x1, y1, x2, y2)", also inside Qwen2.5-VL's
    JSON `{"bbox_2d": [...], "label": ...}` (in a ```json fence or not);
  * two corner points: "(x1, y1), (x2, y2)", "[[x1, y1], [x2, y2]]", "[(x1, y1), (x2, y2)]",
    "(x1, y1) to (x2, y2)", Qwen2-VL's "<|box_start|>(x1,y1),(x2,y2)<|box_end|>";
  * named corners: `{"x1": .., "y1": .., "x2": .., "y2": ..}`, "x1=.., y1=.., x2=.., y2=..";
  * without any bracket, an answer that is nothing but four numbers.
All the boxes an answer states are collected: two different ones (e.g. two objects), or none, give 0.

Coordinate frames (the rule for deciding them, "auto"):
  * a box whose four values all lie in [0, 1] is normalised to the image ([0, 1] x [0, 1]);
  * otherwise it is in pixels: the ground truth in pixels of the ORIGINAL image (the data's frame),
    the prediction in pixels of the RESIZED image the model saw (Qwen2.5-VL grounds in absolute
    coordinates of its input, i.e. after smart_resize).
A box of at most one pixel in every coordinate is therefore read as normalised; such a box is
meaningless in pixels. The frames can be forced (pred_frame / gt_frame). Both boxes are brought into
the normalised frame by dividing by the size of their own frame (IoU is invariant to that per-axis
scaling), clipped to the image, and a box with x2 <= x1 or y2 <= y1 after that scores 0.
Sizes are (height, width), as data_pipeline.image.ImageFeatures.original_hw / resized_hw.
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

from vlaa_jax.rewards.extract import normalize_text

PRED_FRAMES = ("auto", "normalized", "resized_pixels", "original_pixels", "normalized_1000")
GT_FRAMES = ("auto", "normalized", "original_pixels")

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*[,;\s]\s*"
_BRACKETED = re.compile(rf"[\[(]\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*[\])]")
_BARE = re.compile(rf"^\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\.?\s*$")
_POINT = rf"[\[(]\s*({_NUM})\s*[,;]\s*({_NUM})\s*[\])]"
_POINT_ONE = re.compile(_POINT)
_POINTS = re.compile(rf"{_POINT}\s*(?:[,;]|to|-|and)?\s*{_POINT}")
_NAMED = re.compile(rf"\b([xy][12])[\"']?\s*[:=]\s*({_NUM})")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The one [x1, y1, x2, y2] box stated in text, or None (no box, several boxes, non-finite)."""
    norm = normalize_text(str(text))
    boxes = {tuple(float(v) for v in m.groups()) for m in _BRACKETED.finditer(norm)}
    pairs = [tuple(float(v) for v in m.groups()) for m in _POINTS.finditer(norm)]
    if len(_POINT_ONE.findall(norm)) != 2 * len(pairs):  # a point left over: which two are the corners?
        return None
    boxes |= set(pairs)
    named = [(m.group(1), float(m.group(2))) for m in _NAMED.finditer(norm)]
    if sorted(k for k, _ in named) == ["x1", "x2", "y1", "y2"]:
        values = dict(named)
        boxes.add((values["x1"], values["y1"], values["x2"], values["y2"]))
    if not boxes:
        m = _BARE.match(norm)
        boxes = {tuple(float(v) for v in m.groups())} if m else set()
    if len(boxes) != 1:
        return None
    box = boxes.pop()
    return box if all(math.isfinite(v) for v in box) else None


def parse_ground_truth_box(gt) -> tuple[float, float, float, float]:
    """Ground truth as a list of 4 numbers or its JSON/text form; ValueError otherwise."""
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except ValueError:
            box = parse_box(gt)
            if box is None:
                raise ValueError(f"iou ground truth is not a box [x1, y1, x2, y2]: {gt!r}") from None
            return box
    if isinstance(gt, dict):  # e.g. {"bbox_2d": [...]}
        values = [v for v in gt.values() if isinstance(v, (list, tuple))]
        gt = values[0] if len(values) == 1 else gt
    if not isinstance(gt, (list, tuple)) or len(gt) != 4:
        raise ValueError(f"iou ground truth is not a box [x1, y1, x2, y2]: {gt!r}")
    try:
        if any(isinstance(v, bool) for v in gt):
            raise TypeError
        box = tuple(float(v) for v in gt)
    except (TypeError, ValueError):
        raise ValueError(f"iou ground truth is not a box of 4 numbers [x1, y1, x2, y2]: {gt!r}") from None
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"iou ground truth box has a non-finite coordinate (NaN or inf): {gt!r}")
    return box


def _is_normalized(box: Sequence[float]) -> bool:
    return all(0.0 <= v <= 1.0 for v in box)


def to_normalized(box: Sequence[float], hw: tuple[int, int] | None, what: str) -> tuple[float, ...]:
    """Pixels of an image of size hw=(height, width) -> [0, 1] coordinates."""
    if hw is None:
        raise ValueError(f"{what} box {list(box)} is in pixels but the image size is unknown")
    h, w = float(hw[0]), float(hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"{what}: image size must be positive, got (h, w) = {hw}")
    return box[0] / w, box[1] / h, box[2] / w, box[3] / h


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes in one frame; 0 when either is degenerate."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(min(1.0, max(0.0, inter / union)))


def _clip01(box):
    return tuple(min(1.0, max(0.0, v)) for v in box)


def iou_reward(answer: str | None, gt, *, original_hw: tuple[int, int] | None = None,
               resized_hw: tuple[int, int] | None = None, pred_frame: str = "auto",
               gt_frame: str = "auto") -> float:
    """IoU of the answer's box with the ground truth after bringing both to the normalised frame."""
    if pred_frame not in PRED_FRAMES:
        raise ValueError(f"iou pred_frame must be one of {PRED_FRAMES}, got {pred_frame!r}")
    if gt_frame not in GT_FRAMES:
        raise ValueError(f"iou gt_frame must be one of {GT_FRAMES}, got {gt_frame!r}")
    gt_box = parse_ground_truth_box(gt)
    if gt_frame == "original_pixels" or (gt_frame == "auto" and not _is_normalized(gt_box)):
        gt_box = to_normalized(gt_box, original_hw, "ground-truth (original pixels)")
    if answer is None:
        return 0.0
    box = parse_box(answer)
    if box is None:
        return 0.0
    if box[2] <= box[0] or box[3] <= box[1]:  # swapped or empty: invalid whatever the frame
        return 0.0
    if pred_frame == "normalized_1000":  # Qwen2-VL's frame: [0, 1000) of the image on each axis
        box = tuple(v / 1000.0 for v in box)
    elif pred_frame == "original_pixels":
        box = to_normalized(box, original_hw, "predicted (original pixels)")
    elif pred_frame == "resized_pixels" or (pred_frame == "auto" and not _is_normalized(box)):
        box = to_normalized(box, resized_hw, "predicted (resized-image pixels)")
    return box_iou(_clip01(box), _clip01(gt_box))
