"""Image preprocessing against HF `Qwen2VLImageProcessorPil` (sizes x PIL modes) and HF smart_resize."""
import io

import numpy as np
import pytest
import transformers  # a lazy module: the HF image processor (and torch) load on first use
from PIL import Image

from data_pipeline.image import decode_image, preprocess_image, smart_resize
from data_pipeline.records import DataError

SIZES = [(28, 28), (112, 112), (100, 333), (333, 100), (480, 640), (17, 900), (1000, 30), (5, 7), (29, 57),
         (224, 336), (600, 1000)]
MODES = ["RGB", "L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16", "I", "F", "1"]


def _image(h: int, w: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + h * 7 + w)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "RGBA":
        a = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        img = rgb.copy()
        img.putalpha(a)
        return img
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 5
        return img
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def hf_image_processor():

    return lambda min_p, max_p: transformers.Qwen2VLImageProcessorPil(min_pixels=min_p, max_pixels=max_p)


@pytest.mark.parametrize("mode", MODES)
def test_matches_hf_processor(hf_image_processor, mode):
    for min_p, max_p in [(56 * 56, 128 * 28 * 28), (4 * 28 * 28, 1024 * 28 * 28)]:
        hf = hf_image_processor(min_p, max_p)
        for h, w in SIZES:
            img = _image(h, w, mode)
            ref = hf(img, return_tensors="np")
            ours = preprocess_image(img, min_pixels=min_p, max_pixels=max_p)
            np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
            assert ours.pixel_values.dtype == np.float32
            np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0,
                                       err_msg=f"{mode} {h}x{w}")
            assert ours.num_tokens == ref["image_grid_thw"].prod() // 4
            assert ours.original_hw == (h, w)
            sx, sy = ours.scale_xy
            assert (round(w * sx), round(h * sy)) == (ours.resized_hw[1], ours.resized_hw[0])


def test_smart_resize_matches_hf():
    hf_smart_resize = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        for mn, mx in [(3136, 12845056), (56 * 56, 256 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28)]:
            assert smart_resize(h, w, min_pixels=mn, max_pixels=mx) == hf_smart_resize(h, w, min_pixels=mn, max_pixels=mx)
    with pytest.raises(ValueError) as ours:
        smart_resize(10, 2500)
    with pytest.raises(ValueError) as theirs:
        hf_smart_resize(10, 2500)
    assert str(ours.value) == str(theirs.value)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_errors():
    good = _png(_image(64, 64, "RGB"))
    assert decode_image(good, name="x.png").size == (64, 64)
    with pytest.raises(DataError, match="cannot decode image a/t.png") as e:
        decode_image(good[: len(good) // 2], name="a/t.png")  # truncated
    assert e.value.kind == "bad_image" and e.value.field == "image"
    with pytest.raises(DataError, match="cannot decode"):
        decode_image(b"definitely not an image", name="junk.jpg")
    with pytest.raises(DataError, match="min_image_side=28") as e:
        decode_image(_png(_image(20, 64, "RGB")), name="tiny.png", min_side=28)
    assert e.value.kind == "tiny_image"
    assert decode_image(_png(_image(20, 64, "RGB")), name="tiny.png", min_side=0).size == (64, 20)
    with pytest.raises(DataError, match="aspect ratio") as e:
        decode_image(_png(_image(2, 500, "RGB")), name="long.png")
    assert e.value.kind == "extreme_aspect_ratio"


def test_other_patch_sizes_match_hf(hf_image_processor):
    for patch, merge, temporal in [(16, 2, 2), (14, 1, 1), (8, 2, 2)]:
        hf = transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=300000, patch_size=patch,
                                                   merge_size=merge, temporal_patch_size=temporal)
        for h, w in [(100, 150), (333, 101)]:
            img = _image(h, w, "RGB")
            ref = hf(img, return_tensors="np")
            ours = preprocess_image(img, min_pixels=3136, max_pixels=300000, patch_size=patch, merge_size=merge,
                                    temporal_patch_size=temporal)
            np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
            np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
