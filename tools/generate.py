"""Answer a question about an image with a Qwen2.5-VL / VLAA-Thinker checkpoint (like the authors' inference script).

    python tools/generate.py --ckpt DIR --image IMG --question "How many objects are left?" [--max_new_tokens 800]

DIR is a vlaa-jax model directory (tools/convert_hf_to_orbax.py, training exports) or an HF directory; its
tokenizer files (tokenizer.json + chat template) and preprocessor_config.json give the prompt and the
image preprocessing. The prompt is the paper's system prompt + the image + the question; decoding is
greedy by default (the paper's evaluation). Prints the <think> and <answer> parts (or, with --json, one
JSON object with the text, the parts, the token ids and whether generation stopped or was truncated).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from data_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from data_pipeline.chat import ChatFormatter, load_tokenizer, resolve_system_prompt, system_prompt_of  # noqa: E402
from data_pipeline.image import decode_image, preprocess_image  # noqa: E402
from data_pipeline.records import DataError, Record  # noqa: E402
from tools import cli  # noqa: E402
from vlaa_jax import rollout  # noqa: E402
from vlaa_jax.eval.harness import pixel_limits  # noqa: E402
from vlaa_jax.models import qwen2_5_vl as q  # noqa: E402
from vlaa_jax.nn import ATTENTION_IMPLS  # noqa: E402
from vlaa_jax.rewards.extract import extract_answer  # noqa: E402

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def split_response(text: str) -> tuple[str | None, str | None]:
    """(<think> content, the single <answer> content) of a response; None where absent."""
    m = _THINK.search(text)
    return (m.group(1).strip() if m else None), extract_answer(text)


def build_prompt(ckpt: str, question: str, image_path: str | None, system_prompt: str | None,
                 min_pixels: int | None, max_pixels: int | None, config):
    """Host prompt batch (one row) + the chat formatter of the checkpoint's tokenizer."""
    if not os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json (copy the tokenizer files into the checkpoint, e.g. "
                                "tools/make_tokenizer.py --out DIR)")
    formatter = ChatFormatter.create(ckpt, system_prompt)
    record = Record(id="cli", source="", image=image_path or "", question=question, response="", ground_truth="",
                    verifier_type=None, file="<command line>")
    if image_path is None:
        ids = formatter.backend.encode(formatter.prompt_text(question), add_special_tokens=False).ids
        # no image: drop the template's <|vision_start|><|image_pad|><|vision_end|>
        ids = [i for i in ids if i not in (formatter.image_pad_id, formatter.vision_start_id, formatter.vision_end_id)]
        return formatter, rollout.prompt_batch(config, np.asarray([ids]), pad_id=formatter.pad_id)
    min_pixels, max_pixels = pixel_limits(ckpt, min_pixels or 0, max_pixels or 0)
    v = config.vision
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"--image {image_path}: "
                                f"{'a directory, not an image' if os.path.isdir(image_path) else 'no such file'}")
    with open(image_path, "rb") as f:
        try:
            image = decode_image(f.read(), name=image_path)  # the training data's checks
        except DataError as e:
            raise ValueError(f"--image {e.reason}") from None
    feats = preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=v.patch_size,
                             merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    n_tokens = int(np.prod(feats.image_grid_thw)) // v.spatial_merge_size ** 2
    ids = formatter.encode_prompt(record, n_tokens)
    return formatter, rollout.prompt_batch(config, ids[None], pixel_values=feats.pixel_values,
                                           image_grid_thw=feats.image_grid_thw, pad_id=formatter.pad_id)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="vlaa-jax model directory or HF Qwen2.5-VL directory")
    p.add_argument("--image", default=None, help="image file (omit for a text-only question)")
    p.add_argument("--question", required=True)
    p.add_argument("--max_new_tokens", type=int, default=800, help="paper's evaluation: 800")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (paper's evaluation)")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system_prompt", default="",
                   help="'' = the checkpoint's (a model trained here records its own), else 'vlaa' (the "
                        "VLAA-Thinker prompt, paper); 'default' = the chat template's own; or the prompt's text")
    p.add_argument("--min_pixels", type=int, default=None, help="default: the checkpoint's preprocessor_config.json")
    p.add_argument("--max_pixels", type=int, default=None, help="default: the checkpoint's preprocessor_config.json "
                                                                 "(paper's evaluation: 262144 = 256*32*32)")
    p.add_argument("--dtype", default="float32", help="compute/param dtype: float32 or bfloat16")
    p.add_argument("--attention_impl", default="xla", choices=ATTENTION_IMPLS,
                   help="attention kernel: xla (any), cudnn (GPU, bf16), splash (TPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    a = p.parse_args(argv)
    if not os.path.isdir(a.ckpt):
        cli.fail(f"--ckpt {a.ckpt}: not a directory (a vlaa-jax model directory or an HF Qwen2.5-VL directory)")

    t0 = time.time()
    with cli.user_errors():  # a damaged or foreign checkpoint, a bad image: one line, exit code 2
        model = q.from_pretrained(a.ckpt, dtype=a.dtype, attention_impl=a.attention_impl)
        system_prompt = system_prompt_of(resolve_system_prompt(a.ckpt, a.system_prompt))
        formatter, prompts = build_prompt(a.ckpt, a.question, a.image, system_prompt, a.min_pixels, a.max_pixels,
                                          model.config)
    graphdef, state = nnx.split(model)
    stop_ids = tokenizer_lib.stop_ids(load_tokenizer(a.ckpt))
    t1 = time.time()
    out = rollout.generate(graphdef, state, prompts, max_new_tokens=a.max_new_tokens, rng=a.seed,
                           sampling=rollout.SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p),
                           stop_ids=stop_ids, pad_id=formatter.pad_id)
    t2 = time.time()
    n = int(out.lengths[0])
    ids = out.tokens[0, :n].tolist()
    text = formatter.backend.decode(ids, skip_special_tokens=True)
    think, answer = split_response(text)
    result = dict(text=text, think=think, answer=answer, token_ids=ids, num_tokens=n, stopped=bool(out.stopped[0]),
                  prompt_tokens=int(prompts["attention_mask"].sum()), load_s=round(t1 - t0, 2),
                  generate_s=round(t2 - t1, 2))
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print("<think>\n" + (think if think is not None else "(no <think> part)") + "\n</think>")
        print("<answer>\n" + (answer if answer is not None else "(no single <answer> part)") + "\n</answer>")
        print(f"[{n} tokens, {'stopped' if result['stopped'] else 'truncated at --max_new_tokens'}, "
              f"{result['generate_s']} s]", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
