"""The demo presets end to end through the real CLI (`python -m vlaa_jax.main`), shortened to a few
steps: progress bar, final summary, metrics / TensorBoard / samples files, and an HF export that
transformers loads and that computes the same logits as our model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.chat import trained_system_prompt
from data_pipeline.image import processor_pixels
from tests.train.helpers import REPO


def _main(preset: str, workdir, *overrides: str, cache_dir: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "vlaa_jax.main", "--config", preset, "--workdir", str(workdir), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _check_hf_export(workdir):
    """transformers loads the exported directory (model, tokenizer, image processor) and its logits
    match our model's on the same tokens."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from vlaa_jax.models import qwen2_5_vl
    hf_dir, model_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "model")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    AutoImageProcessor.from_pretrained(hf_dir)
    ids = tok("<answer>3</answer> The picture shows a tree.", return_tensors="np")["input_ids"]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(qwen2_5_vl.from_pretrained(model_dir)(ids))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-3)


@pytest.mark.slow  # the GRPO demo test below runs the same SFT trainer (its warm start) and export
def test_sft_demo_shortened(demo_data_dir, jax_cache_dir, tmp_path):
    proc = _main("configs/sft.py:demo", tmp_path, f"--config.data.dir={demo_data_dir}",
                 "--config.train.num_steps=4", "--config.train.eval_every=2", "--config.train.eval_batches=1",
                 "--config.train.checkpoint_every=2", cache_dir=jax_cache_dir)
    assert "sft: 100%" in proc.stderr and "4/4" in proc.stderr  # tqdm progress bar
    assert "SFT finished: 4 steps" in proc.stdout and "eval loss: step 0:" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert summary["eval_loss"][-1][1] < summary["eval_loss"][0][1]  # the demo learns something
    for name in ("metrics.jsonl", "data_order.jsonl", "config.json", "checkpoints/4"):
        assert os.path.exists(tmp_path / name), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    _check_hf_export(str(tmp_path))


def test_grpo_demo_shortened(demo_data_dir, jax_cache_dir, tmp_path):
    # The training shapes and length of test_pinned_metrics.py's demo run (3 steps, 32 new tokens, the
    # preset's batch), so that one of the two compiles the warm start's and GRPO's programs for both.
    proc = _main("configs/grpo.py:demo", tmp_path, f"--config.data.dir={demo_data_dir}",
                 "--config.train.num_steps=3", "--config.warm_start.train.num_steps=2",
                 "--config.grpo.eval_prompts=5", "--config.grpo.max_new_tokens=32",
                 cache_dir=jax_cache_dir)
    out = proc.stdout
    assert "grpo: 100%" in proc.stderr and "GRPO finished: 3 steps" in out
    assert "before" in out and "after" in out and "no answer" in out
    assert f"curves: {tmp_path / 'runs.png'}" in out and os.path.getsize(tmp_path / "runs.png") > 0
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    for key in ("reward", "accuracy", "response_length", "clipfrac", "kl", "entropy", "lr", "tokens_per_s",
                "time/rollout_s", "time/reward_s", "time/update_s", "compiles/rollout"):
        assert key in rows[-1], key
    samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
    assert samples and {"prompt", "response", "reward"} <= set(samples[0])
    assert os.path.isfile(tmp_path / "warm_start" / "model" / "config.json")
    warm = json.load(open(tmp_path / "warm_start" / "summary.json"))
    assert warm["last_loss"] < warm["first_loss"]  # SFT loss on the demo data falls
    _check_hf_export(str(tmp_path))

    # mode=eval on the exported policy: the benchmark harness (vlaa_jax.eval.harness.run_eval) on the demo's
    # held-out records, with a report, per-item predictions and the behaviour metrics.
    proc = _main("configs/grpo.py:demo", tmp_path / "eval", f"--config.data.dir={demo_data_dir}",
                 "--config.mode=eval", "--config.model.init=pretrained",
                 f"--config.model.path={tmp_path / 'model'}", "--config.eval.limit=6",
                 "--config.eval.max_new_tokens=16", "--config.eval.batch_size=4", cache_dir=jax_cache_dir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert os.path.isfile(tmp_path / "eval" / "config_eval.json")
    assert not os.path.exists(tmp_path / "eval" / "warm_start")  # mode=eval uses the model as given
    assert result["overall"]["n"] == 6
    preds = [json.loads(l) for l in open(os.path.join(result["output_dir"], "predictions.jsonl"))]
    assert len(preds) == 6 and all(p["response"] is not None for p in preds)
    report = json.load(open(os.path.join(result["output_dir"], "report.json")))
    assert report["settings"]["max_new_tokens"] == 16 and report["settings"]["num_items"] == 6
    # One source for image settings: the bounds the demo trained with (56*56), recorded in the exported
    # processor configs, are what mode=eval resizes with.
    # The system prompt too: the demo's data.system_prompt is recorded and is what mode=eval prompts with.
    for d in ("model", "hf"):
        assert processor_pixels(str(tmp_path / d)) == (56 * 56, 56 * 56), d
        assert trained_system_prompt(str(tmp_path / d)) == "vlaa", d
    assert (report["settings"]["min_pixels"], report["settings"]["max_pixels"]) == (56 * 56, 56 * 56)
    assert report["settings"]["system_prompt"] == "vlaa"
    assert 0.0 <= result["behaviour"]["reflection_rate"] <= 1.0
    assert "behaviour/reflection_rate" in rows[-1]  # the GRPO run logged its rollouts' behaviour too
    # Distinct generate programs so far: the before-table's (5 prompts, greedy) and the steps' (8 prompts,
    # 4 samples; one per prompt-length bucket at most).
    counts = [r["compiles/rollout"] for r in rows]
    assert counts == sorted(counts) and 2 <= counts[-1] <= 1 + len(rows)
    assert all(v == v for row in rows for v in row.values() if isinstance(v, float))  # no NaN logged
