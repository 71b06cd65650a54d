"""tools/plan_memory.py counts the frozen JAX reward model (reward.open_ended='jax_rm') in every phase."""
import json
import os

import pytest

from tests.sharding.test_plan_phases import GRPO_SETS, small_workload


def test_reward_model_is_resident_in_every_phase(tmp_path):
    from tools import plan_memory
    from vlaa_jax.models.qwen2_5_vl import to_hf_dict
    w = small_workload("configs/grpo.py:vlaa_thinker_3b", GRPO_SETS)
    assert w.model.tie_word_embeddings                    # 3B: the reference and a reward model of it agree
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(to_hf_dict(w.model), f)                 # a reward model of the policy's architecture
    without = plan_memory.plan_phases(w, (1, 8, 1))
    w.config.reward.open_ended, w.config.reward.reward_model_path = "jax_rm", str(tmp_path)
    w.config.reward.reward_model_dtype = "bfloat16"
    p = plan_memory.plan_phases(w, (1, 8, 1))
    r = p["resident"]
    assert without["resident"]["reward_model"] == 0
    assert r["reward_model"] == pytest.approx(r["reference"], rel=1e-6)   # bf16, sharded like the params
    for name, phase in p["phases"].items():
        assert phase["resident_beside"] == without["phases"][name]["resident_beside"] + r["reward_model"], name
