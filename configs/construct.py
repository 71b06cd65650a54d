"""Building VLAA-Thinking-style data: the model server of each stage, the input and the split.

Usage: python -m data_pipeline.construct --config configs/construct.py:<preset> --out DIR
           [--stages caption,distill] [--config.key=value ...]
Presets:
  local   every stage on tools/serve.py at http://127.0.0.1:8000/v1 (`python tools/serve.py --model DIR`)
  vllm    a vision model and a reasoning model on vLLM servers (`vllm serve MODEL --port ...`)
  openai  a hosted OpenAI-compatible API (key in $OPENAI_API_KEY; R1 in $DEEPSEEK_API_KEY)

Each stage block (caption, distill, rewrite, verify) names one endpoint: base_url (the part before
/chat/completions), model, api_key_env (the environment variable that holds the key, "" for none),
sampling (temperature, top_p, max_tokens, seed: -1 = not sent), the client's timeout_s / retries /
backoff_s / backoff_max_s, concurrency (requests in flight) and template (a prompt file; "" = the
packaged data_pipeline/construct/templates/<stage>.txt, verify's is judge.txt).
"""
from __future__ import annotations

import ml_collections

PRESETS = ("local", "vllm", "openai")


def endpoint(base_url: str, model: str, *, api_key_env: str = "", temperature: float = 0.0, top_p: float = 1.0,
             max_tokens: int = 1024, concurrency: int = 8, timeout_s: float = 300.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        base_url=base_url, model=model, api_key_env=api_key_env, temperature=temperature, top_p=top_p,
        max_tokens=max_tokens, seed=-1, timeout_s=timeout_s, retries=4, backoff_s=1.0, backoff_max_s=60.0,
        concurrency=concurrency, template=""))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "local"
    if preset not in PRESETS:
        raise ValueError(f"configs/construct.py: unknown preset {preset!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    # metadata: a JSON / JSON Lines file of records (image, question, gt, [id, source, verifier_type]), or a
    # CSV with those columns; image paths relative to images_root ("" = the file's directory).
    c.input = ml_collections.ConfigDict(dict(path="", images_root="", source="", skip_bad_records=False))
    if preset == "local":
        url, served = "http://127.0.0.1:8000/v1", "vlaa-jax"  # tools/serve.py --served_name vlaa-jax
        c.caption = endpoint(url, served, max_tokens=512)
        c.distill = endpoint(url, served, max_tokens=2048)
        c.rewrite = endpoint(url, served, max_tokens=2048)
        c.verify = endpoint(url, served, max_tokens=8)
    elif preset == "vllm":
        # vllm serve Qwen/Qwen2.5-VL-72B-Instruct --port 8001
        # vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --port 8002 --reasoning-parser deepseek_r1
        vl, r1 = "http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"
        c.caption = endpoint(vl, "Qwen/Qwen2.5-VL-72B-Instruct", max_tokens=1024, concurrency=32)
        c.distill = endpoint(r1, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", temperature=0.6, top_p=0.95,
                             max_tokens=8192, concurrency=32)
        c.rewrite = endpoint(vl, "Qwen/Qwen2.5-VL-72B-Instruct", max_tokens=4096, concurrency=32)
        c.verify = endpoint(vl, "Qwen/Qwen2.5-VL-72B-Instruct", max_tokens=8, concurrency=32)
    else:  # openai: the paper's set-up (captions by a VLM, R1 traces, a GPT rewriter and verifier)
        oa = "https://api.openai.com/v1"
        c.caption = endpoint(oa, "gpt-4o", api_key_env="OPENAI_API_KEY", max_tokens=1024, concurrency=16)
        c.distill = endpoint("https://api.deepseek.com/v1", "deepseek-reasoner", api_key_env="DEEPSEEK_API_KEY",
                             max_tokens=8192, concurrency=16)
        c.rewrite = endpoint(oa, "gpt-4o-mini", api_key_env="OPENAI_API_KEY", max_tokens=4096, concurrency=16)
        c.verify = endpoint(oa, "gpt-4o-mini", api_key_env="OPENAI_API_KEY", max_tokens=8, concurrency=16)
    # verify: rule verifiers (vlaa_jax.rewards) for digit / mcq / math / iou; the judge above for open-ended
    c.verify.iou_threshold = 0.5       # an iou answer is correct at IoU >= this
    c.verify.open_ended = "judge"      # judge | keep (open-ended answers pass unjudged)
    # split: per source, rl_fraction of the verified records to the GRPO file, the rest to SFT;
    # target="paper": the paper's per-source counts as caps (data_pipeline.construct.stages.PAPER_COUNTS)
    c.split = ml_collections.ConfigDict(dict(rl_fraction=0.2, target="", seed=0))
    return c
