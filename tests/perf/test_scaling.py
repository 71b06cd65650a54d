"""benchmarks/scaling.py: the collective parser, per-device FLOPs of the rollout prefill on 8 simulated
devices (vision and decoder within 1.15x of one device's / 8), resuming from the results file and the
markdown tables."""
from __future__ import annotations

import json

import pytest

HLO = """
ENTRY %main {
  %p = f32[64,32]{1,0} parameter(0)
  %all-gather = f32[64,32]{1,0} all-gather(%p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %all-reduce.3 = (f32[32]{0}, bf16[16,2]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %ags = (bf16[8,4]{1,0}, bf16[64,4]{1,0}) all-gather-start(%x), channel_id=3, dimensions={0}
  %agd = bf16[64,4]{1,0} all-gather-done(%ags)
  %rs = f32[4]{0} reduce-scatter(%y), channel_id=4, dimensions={0}, to_apply=%add
  %cp = s32[2,3]{1,0} collective-permute(%z), channel_id=5, source_target_pairs={{0,1}}
  %fusion = f32[8]{0} fusion(%all-gather), kind=kLoop, calls=%fused_all_reduce
}
"""


def test_collective_bytes_counts_result_shapes():
    from tools import phase_programs as pp
    out = pp.collective_bytes(HLO)
    assert out["all-gather"] == {"count": 2, "bytes": 64 * 32 * 4 + 64 * 4 * 2}    # start: its output half
    assert out["all-reduce"] == {"count": 1, "bytes": 32 * 4 + 16 * 2 * 2}
    assert out["reduce-scatter"] == {"count": 1, "bytes": 16}
    assert out["collective-permute"] == {"count": 1, "bytes": 24}
    assert out["all-to-all"] == {"count": 0, "bytes": 0}


def test_prefill_flops_split_evenly_on_8_devices(tmp_path):
    """The small model's rollout prefill (tests/sharding/test_plan_phases.py) on (1,1,1), (1,8,1) and
    (2,4,1): per device, decoder and vision tower each do one eighth of one device's work (within 1.15x);
    a second call reads every case back from the results file."""
    from benchmarks import scaling
    from tests.sharding.test_plan_phases import small_model
    from tools import plan_memory
    c = scaling.trainer_config(*scaling.FLOP_GRPO)
    model = small_model(plan_memory.model_from_trainer_config(c))
    path = str(tmp_path / "scaling.json")
    meshes = ((1, 1, 1), (1, 8, 1), (2, 4, 1))
    out = scaling.measure_flops(scaling.Results(path), model=model, programs=("prefill",), meshes=meshes)
    rows = out["prefill"]
    assert rows["1,1,1"]["collective_bytes"] == 0
    for mesh in ("1,8,1", "2,4,1"):
        r = rows[mesh]
        assert r["decoder"] > 0 and r["vision"] > 0
        assert 0.9 < r["decoder_ratio"] <= scaling.FLOP_TARGET, r
        assert 0.9 < r["vision_ratio"] <= scaling.FLOP_TARGET, r
        assert r["collectives"]["all-gather"]["count"] > 0      # FSDP gathers the weights
    with open(path) as f:
        assert len(json.load(f)["flops"]) == 2 * len(meshes)      # with and without images, per mesh
    again = scaling.measure_flops(scaling.Results(path), model=model, programs=("prefill",), meshes=meshes)
    assert again == json.loads(json.dumps(out))


def test_markdown_tables_from_results():
    from benchmarks import scaling
    GiB = 2 ** 30
    phase = {"xla_peak": 10 * GiB, "xla_total": 14 * GiB, "estimate_over_xla": 1.04, "compile_s": 3.0}
    data = {
        "flops_summary": {"sft": {"1,1,1": {"decoder": 8e9, "vision": 2e9, "collective_bytes": 0},
                                  "1,8,1": {"decoder": 1e9, "vision": 0.25e9, "decoder_ratio": 1.0,
                                            "vision_ratio": 1.0, "collective_bytes": 2 ** 20}}},
        "memory_summary": {"vlaa_thinker_3b|8|default": {"sets": {}, "phases": {"rollout": phase, "update": phase},
                                                         "max_total": 14 * GiB, "target": 60 * GiB, "met": True},
                           "vlaa_thinker_7b|8|suggested_32GiB": {"sets": {"train.grad_accum_steps": None},
                                                                 "error": "no setting fits"}},
        "compile": {"grpo|full|1,8,1": {"step": "grpo", "decoder_layers": 36, "vision_blocks": 32, "mesh": [1, 8, 1],
                                        "lower_s": 2.0, "compile_s": 30.0, "hlo_chars": 123456}},
    }
    md = scaling.markdown(data)
    assert "| sft | (1,8,1) | 1.0 | 1.000 | 0.2 | 1.000 | 1 |" in md
    assert "| vlaa_thinker_3b | 8 | default | preset | 10.00 / 14.00 (est 1.04) | - | - | 10.00 / 14.00 (est 1.04) " \
           "| 14.00 | <= 60 | yes |" in md
    assert "no setting fits" in md
    assert "| grpo | 36 | 32 | (1,8,1) | 2.0 | 30.0 | 123,456 |" in md


def test_unknown_part_is_an_error():
    from benchmarks import scaling
    with pytest.raises(SystemExit, match="unknown parts"):
        scaling.main(["--only", "flop"])
