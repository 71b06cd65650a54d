"""tools/plan_memory.py's per-phase estimate against XLA's memory analysis of the phase programs
(tools/phase_programs.py) on 8 simulated devices, its suggestions and its command line."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A shallow model with small widths (2 decoder layers x 256, 2 vision blocks x 128), bf16 compute, fp32
# parameters, full remat, as the recipes run; small GRPO / SFT shapes so that each phase compiles in
# seconds.
GRPO_SETS = ["data.max_prompt_length=320", "data.max_pixels=12544", "grpo.max_new_tokens=128",
             "grpo.rollout_micro_batch=16", "train.batch_size=32", "train.grad_accum_steps=2"]
SFT_SETS = ["data.max_length=512", "data.max_pixels=12544", "train.batch_size=32", "train.grad_accum_steps=2"]
TOLERANCE = 0.15


def small_model(model):
    """`model` (a Qwen25VLConfig) with small widths and depths, its run options kept."""
    vocab = 4096
    text = dataclasses.replace(model.text, vocab_size=vocab, hidden_size=256, intermediate_size=768,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               mrope_section=(8, 12, 12), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dataclasses.replace(model.vision, depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                                 out_hidden_size=256, fullatt_block_indexes=(1,))
    return model.replace(text=text, vision=vision, image_token_id=vocab - 5, video_token_id=vocab - 4,
                         vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2)


def small_workload(spec: str, sets: list[str]):
    from tools import phase_programs as pp
    from tools import plan_memory
    c = plan_memory.load_trainer_config(os.path.join(ROOT, spec))
    plan_memory.apply_overrides(c, sets)
    return pp.Workload.from_config(c, small_model(plan_memory.model_from_trainer_config(c)))


@pytest.fixture(scope="module")
def compiled_phases():
    """(workload, XLA's figures) of every GRPO phase and of the SFT step on mesh (1, 8, 1)."""
    from tools import plan_memory
    grpo = small_workload("configs/grpo.py:vlaa_thinker_3b", GRPO_SETS)
    sft = small_workload("configs/sft.py:vlaa_thinker_3b", SFT_SETS)
    return {"grpo": (grpo, plan_memory.xla_phase_figures(grpo, (1, 8, 1))),
            "sft": (sft, plan_memory.xla_phase_figures(sft, (1, 8, 1)))}


@pytest.mark.parametrize("mode,phase", [("grpo", "rollout"), ("grpo", "logprobs"), ("grpo", "ref_logprobs"),
                                        ("grpo", "update"), ("sft", "sft")])
def test_estimate_within_15_percent_of_xla_per_phase(compiled_phases, mode, phase):
    from tools import plan_memory
    w, xla = compiled_phases[mode]
    plan = plan_memory.plan_phases(w, (1, 8, 1))
    assert set(plan["phases"]) == set(xla) == set(w.phases)
    est, x = plan["phases"][phase], xla[phase]
    assert est["arguments"] == pytest.approx(x["argument"], rel=0.02)     # exact up to layout padding
    assert est["peak"] == pytest.approx(x["peak"], rel=TOLERANCE), (est["parts"], x)
    # the resident state beside the program is the same bytes on both sides
    assert est["resident_beside"] == x["resident_beside"]


def test_grpo_step_has_every_phase_and_the_resident_state_in_each():
    from tools import plan_memory
    w = small_workload("configs/grpo.py:vlaa_thinker_3b", GRPO_SETS)
    assert w.phases == ("rollout", "logprobs", "ref_logprobs", "update")    # 8 updates per rollout batch
    p = plan_memory.plan_phases(w, (1, 8, 1))
    r = p["resident"]
    assert r["reference"] == pytest.approx(r["params"] / 2, rel=0.01)       # bf16 copy of fp32 weights
    phases = p["phases"]
    assert phases["rollout"]["resident_beside"] == r["optimizer"] + r["reference"]
    assert phases["ref_logprobs"]["resident_beside"] == r["params"] + r["optimizer"]
    assert phases["update"]["resident_beside"] == r["reference"]
    assert p["peak_bytes"] == max(e["total"] for e in phases.values())
    on_policy = small_workload("configs/grpo.py:vlaa_thinker_3b", GRPO_SETS + ["grpo.rollout_batch_prompts=8",
                                                                               "grpo.init_kl_coef=0"])
    assert on_policy.phases == ("rollout", "update")      # one update per batch, no reference


def test_rollout_cache_and_recipe_shapes_by_hand():
    """The 3B recipe on (1, 8, 1): 64 prompts x 4 samples per generate call, 1024 + 1024 slots of bf16
    keys and values for 36 layers and 2 kv heads of 128."""
    from tools import phase_programs as pp
    from tools import plan_memory
    c = plan_memory.load_trainer_config(os.path.join(ROOT, "configs/grpo.py:vlaa_thinker_3b"))
    w = pp.Workload.from_config(c, plan_memory.model_from_trainer_config(c))
    assert (w.rollout_prompts, w.num_samples, w.prompt_len, w.cache_new_tokens) == (64, 4, 1024, 1024)
    assert (w.micro_rows, w.micro_batches, w.seq_len, w.image_grid) == (16, 16, 2048, (32, 32))
    p = plan_memory.plan_phases(w, (1, 8, 1))
    rollout = p["phases"]["rollout"]
    cache = 2 * 36 * (64 // 8) * 2048 * 2 * 128 * 2
    stage = rollout["peak_stage"]
    assert rollout["parts"][f"{stage}/prompt_cache" if stage != "decode" else "decode/cache"] in (cache, 4 * cache)
    # the output projection gathered over fsdp, float32 (XLA:CPU), [2048, 151936]
    assert rollout["parts"][f"{stage}/head"] == 2048 * 151936 * 4
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 16"):
        plan_memory.plan_phases(w.replace(rollout_prompts=8), (1, 16, 1))


def test_suggest_picks_the_largest_settings_that_fit():
    from tools import plan_memory
    w = small_workload("configs/grpo.py:vlaa_thinker_3b", GRPO_SETS)
    mesh = (1, 8, 1)
    roomy = plan_memory.suggest(w, mesh, 2 ** 40)
    assert roomy["train.grad_accum_steps"] == 1 and roomy["grpo.rollout_micro_batch"] == 512
    # a budget between the plans with 2 and with 4 accumulation steps: 4 is suggested, and it fits
    plans = {s: plan_memory.plan_phases(w.replace(micro_batches=s, micro_rows=32 // s, rollout_prompts=8), mesh)
             for s in (2, 4)}
    worst = lambda p: max(e["total"] for k, e in p["phases"].items() if k != "rollout")  # noqa: E731
    assert worst(plans[4]) < worst(plans[2])
    budget = (worst(plans[4]) + worst(plans[2])) // 2
    tight = plan_memory.suggest(w, mesh, budget)
    assert tight["train.grad_accum_steps"] == 4
    assert tight["plan"]["peak_bytes"] <= budget
    size = tight["grpo.rollout_micro_batch"]
    assert size % 8 == 0 and 512 % size == 0
    bigger = [k for k in range(size + 8, 513, 8) if 512 % k == 0]
    if bigger:   # the next larger rollout call does not fit
        over = plan_memory.plan_phases(w.replace(micro_batches=4, micro_rows=8, rollout_prompts=bigger[0]), mesh)
        assert over["phases"]["rollout"]["total"] > budget
    nothing = plan_memory.suggest(w, mesh, 1)
    assert nothing["train.grad_accum_steps"] is None and nothing["plan"] is None


def test_cli_phases_json_and_table(capsys):
    from tools import plan_memory
    assert plan_memory.main(["--config", os.path.join(ROOT, "configs/grpo.py:vlaa_thinker_3b"), "--mesh", "1,8,1",
                             "--device_memory", "80GiB,32GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["phases"]) == ["rollout", "logprobs", "ref_logprobs", "update"]
    assert out["peak_bytes"] < 80 * 2 ** 30
    assert [s["device_memory"] for s in out["suggestions"]] == [80 * 2 ** 30, 32 * 2 ** 30]
    for s in out["suggestions"]:
        assert s["plan"]["peak_bytes"] <= s["device_memory"]
    assert plan_memory.main(["--config", os.path.join(ROOT, "configs/sft.py:vlaa_thinker_3b"), "--mesh", "1,8,1",
                             "--set", "train.grad_accum_steps=16"]) == 0
    table = capsys.readouterr().out
    assert "SFT step" in table and "x 16 micro-batches" in table and "peak: sft" in table
    assert plan_memory.parse_bytes("80GiB") == 80 * 2 ** 30 and plan_memory.parse_bytes("1.5 GB") == 1_500_000_000
    with pytest.raises(KeyError, match="no key 'grpo.nope'"):
        plan_memory.main(["--config", os.path.join(ROOT, "configs/grpo.py:demo"), "--mesh", "1,4,1",
                          "--set", "grpo.nope=1"])
