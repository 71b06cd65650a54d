"""Qwen2.5-VL image preprocessing in NumPy, number for number equal to HF `Qwen2VLImageProcessorPil`.

Steps (same as HF): RGB conversion of any PIL mode (transparency composited on white), `smart_resize` to
multiples of patch_size * merge_size within [min_pixels, max_pixels], PIL bicubic resize, rescale by 1/255
(float64 then float32), normalise with the OpenAI CLIP mean/std (float32), patchify to
[grid_h*grid_w, channels*temporal_patch_size*patch_size**2] in the merge-window order the vision tower
expects, with image_grid_thw = [[1, grid_h, grid_w]]. The patch geometry defaults to the released
Qwen2.5-VL vision tower (`VisionConfig()`: patch 14, merge 2, temporal patch 2, so factor 28 and 1176
values per patch); the loader passes its model's.

Rescale + normalise is one 256-entry lookup table per channel (exactly the same float32 values as HF's
two steps, without touching float64 arrays), applied as late as possible: examples and batches carry the
uint8 patches, and `normalize_patches` fills the padded float32 batch array in the trainer's process.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.records import DataError
from vlaa_jax.models.qwen2_5_vl.config import VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_QWEN25VL = VisionConfig()  # the released Qwen2.5-VL patch geometry: the default of callers without a model
MAX_ASPECT_RATIO = 200  # HF smart_resize limit


def smart_resize(
    height: int, width: int, factor: int = _QWEN25VL.patch_size * _QWEN25VL.spatial_merge_size,
    min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """(h, w) divisible by `factor`, area within [min_pixels, max_pixels], aspect ratio kept (HF rules).

    Raises ValueError, like HF, when the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """One preprocessed image.

    patches_u8: uint8 [grid_h*grid_w, 3, patch_size**2], the resized RGB image cut into patches in the
      vision tower's order, before rescale/normalise and before repeating the frame over the temporal
      patch (8x fewer bytes than pixel_values: what crosses from Grain workers to the trainer process).
    pixel_values: float32 [grid_h*grid_w, 3*temporal_patch_size*patch_size**2] (computed from
      patches_u8; equals the HF processor).
    image_grid_thw: int32 [1, 3] = [[1, grid_h, grid_w]].
    original_hw / resized_hw: (height, width) before and after smart_resize. `scale_xy` maps original pixel
    coordinates to resized ones (x * sx, y * sy): the IoU reward needs it to compare boxes in one frame.
    """

    patches_u8: np.ndarray
    image_grid_thw: np.ndarray
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    temporal_patch_size: int = _QWEN25VL.temporal_patch_size
    merge_size: int = _QWEN25VL.spatial_merge_size
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @property
    def pixel_values(self) -> np.ndarray:
        return normalize_patches(self.patches_u8, image_mean=self.image_mean, image_std=self.image_std,
                                 temporal_patch_size=self.temporal_patch_size)

    @property
    def num_patches(self) -> int:
        return int(self.patches_u8.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of <|image_pad|> tokens: merged patches, t*h*w / merge_size**2."""
        return self.num_patches // (self.merge_size * self.merge_size)

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode; alpha or palette transparency composited on white (as HF convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@lru_cache(maxsize=8)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...], rescale: float) -> np.ndarray:
    """[3, 256] float32: ((float32(v * rescale) - mean) / std), HF's rescale then normalise, per channel."""
    v = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return ((v[None, :] - m) / s).astype(np.float32)


def patchify_u8(rgb: np.ndarray, patch_size: int, merge_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [gh*gw, 3, p*p], rows in merge-window order (as HF's patchify)."""
    h, w, c = rgb.shape
    gh, gw = h // patch_size, w // patch_size
    x = rgb.reshape(gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
    return np.ascontiguousarray(x.reshape(gh * gw, c, patch_size * patch_size))


def normalize_patches(patches_u8: np.ndarray, out: np.ndarray | None = None, *,
                      image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN, image_std: tuple[float, ...] = OPENAI_CLIP_STD,
                      temporal_patch_size: int = _QWEN25VL.temporal_patch_size) -> np.ndarray:
    """uint8 [N, C, p*p] -> float32 [N, C*T*p*p]: rescale + normalise (HF's float32 values exactly, by
    lookup table), the still frame repeated over the temporal patch. Writes into `out[:N]` if given."""
    n, c, pp = patches_u8.shape
    lut = _normalize_lut(tuple(image_mean), tuple(image_std), 1 / 255)
    if out is None:
        out = np.empty((n, c * temporal_patch_size * pp), np.float32)
    view = out[:n].reshape(n, c, temporal_patch_size, pp)
    for ch in range(c):
        vals = np.take(lut[ch], patches_u8[:, ch])
        for t in range(temporal_patch_size):
            view[:, ch, t] = vals
    return out[:n]


def preprocess_image(
    image: Image.Image,
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = _QWEN25VL.patch_size,
    merge_size: int = _QWEN25VL.spatial_merge_size,
    temporal_patch_size: int = _QWEN25VL.temporal_patch_size,
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    image_std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> ImageFeatures:
    """PIL image -> ImageFeatures; `.pixel_values` equals `Qwen2VLImageProcessorPil(min_pixels, max_pixels)`."""
    rgb = to_rgb(image)
    width, height = rgb.size
    rh, rw = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    patches = patchify_u8(np.asarray(resized, dtype=np.uint8), patch_size, merge_size)
    grid = np.array([[1, rh // patch_size, rw // patch_size]], dtype=np.int32)
    return ImageFeatures(patches, grid, (height, width), (rh, rw), temporal_patch_size, merge_size,
                         tuple(image_mean), tuple(image_std))


def decode_image(data: bytes, *, name: str = "<bytes>", min_side: int = 0,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode encoded image bytes fully (truncation shows up here), checking size and aspect ratio.

    Raises DataError (kinds `bad_image`, `tiny_image`, `extreme_aspect_ratio`) naming `name`.
    `min_side` rejects images whose shorter side is below it (HF would upscale them; 28 rejects
    anything smaller than one merged patch), 0 disables the check.
    """
    if not data:
        raise DataError(f"cannot decode image {name}: it is an empty file (0 bytes)", kind="bad_image",
                        field="image")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as e:  # its message shows a BytesIO repr, not the file
        raise DataError(f"cannot decode image {name}: not in an image format PIL reads ({len(data)} bytes starting "
                        f"{data[:8]!r})", kind="bad_image", field="image") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}", kind="bad_image", field="image") from e
    w, h = img.size
    if w < 1 or h < 1 or min(w, h) < min_side:
        raise DataError(f"image {name} is {w}x{h}, smaller than min_image_side={min_side}", kind="tiny_image", field="image")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise DataError(
            f"image {name} is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.1f} exceeds {max_aspect_ratio}",
            kind="extreme_aspect_ratio",
            field="image",
        )
    return img


PROCESSOR_CONFIG = "preprocessor_config.json"
TRAINED_PIXELS_KEY = "vlaa_jax_trained_pixels"  # [min, max] a vlaa-jax trainer trained the model with


def read_processor_config(model_dir: str) -> dict | None:
    """A model directory's processor config (preprocessor_config.json), None where it has none."""
    path = os.path.join(model_dir, PROCESSOR_CONFIG) if model_dir else ""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): copy it again from the model's source") from None


def update_processor_config(model_dir: str, updates: dict) -> None:
    """Sets keys of a model directory's processor config (what a trainer records of how it trained)."""
    path = os.path.join(model_dir, PROCESSOR_CONFIG)
    cfg = read_processor_config(model_dir)
    if cfg is None:
        raise FileNotFoundError(f"{path} not found (the export writes it from the tokenizer directory)")
    cfg.update(updates)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def processor_pixels(model_dir: str) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) a model was trained with, as a vlaa-jax export records them in its
    processor config; None for any other directory (an HF download's processor config states HF's
    defaults, not what the model was trained or is evaluated with)."""
    trained = (read_processor_config(model_dir) or {}).get(TRAINED_PIXELS_KEY)
    if not trained:
        return None
    if not (isinstance(trained, list) and len(trained) == 2 and all(isinstance(v, int) and v > 0 for v in trained)):
        raise ValueError(f"{os.path.join(model_dir, PROCESSOR_CONFIG)}: {TRAINED_PIXELS_KEY} must be "
                         f"[min_pixels, max_pixels], got {trained!r}")
    return trained[0], trained[1]


def write_processor_pixels(model_dir: str, min_pixels: int, max_pixels: int) -> None:
    """Records the image bounds a model was trained with in its processor config (HF's keys, both forms),
    so generation and evaluation resize images as in training."""
    size = (read_processor_config(model_dir) or {}).get("size") or {}
    update_processor_config(model_dir, {
        "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
        TRAINED_PIXELS_KEY: [int(min_pixels), int(max_pixels)],
        "size": {**size, "shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}})
