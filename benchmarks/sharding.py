"""Step time and memory of the sharded train step on 8 simulated CPU devices, per remat policy.

    python benchmarks/sharding.py [--models tiny,3b_shallow] [--remat none,full,save_dots]
                                  [--mesh 1,8,1] [--steps 3]

Prints one JSON object: for every (model, remat policy) the median wall time of a full train step
(forward + backward + AdamW update, jitted, params/optimizer donated), the compile time, XLA's
per-device memory analysis of the compiled step (arguments, outputs, temporaries; its "peak" is
arguments + outputs + temporaries - aliased/donated) and the process's peak RSS. The models: the tiny
Qwen2.5-VL of the tests, and a Qwen2.5-VL-3B-shaped shallow one (3B widths, 1 decoder layer,
1 vision block, a 32k vocabulary, bfloat16) with one 8x8-patch image per row. CPU numbers compare policies and meshes
with each other; they say nothing about accelerator speed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vlaa_jax import sharding as shd  # noqa: E402
from vlaa_jax.train import optim, step as st  # noqa: E402

MODELS = {
    # name: config overrides, rows, seq_len, image patch grids, dtype; mesh None = --mesh
    "tiny": dict(text=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2),
                 vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                             out_hidden_size=64, fullatt_block_indexes=(1,)),
                 rows=8, seq_len=64, images=((4, 4), (4, 6)), dtype="float32", tie=False, mesh=None),
    # 3B widths (text 2048 / MLP 11008 / 16 q + 2 kv heads; vision 1280 / 3420 / 16 heads), one
    # decoder layer, one (full-attention) vision block. Eight simulated devices share one host's
    # memory, so the vocabulary is cut to 32768 (2 + 2 layers with the full 151936-row table needed
    # >12 GB of host memory) and split over `tensor` on mesh (1, 2, 4).
    "3b_shallow": dict(text=dict(num_hidden_layers=1, vocab_size=32768),
                       vision=dict(depth=1, fullatt_block_indexes=(0,)),
                       rows=8, seq_len=128, images=((8, 8),), dtype="bfloat16", tie=True,
                       mesh=(1, 2, 4)),
}


def model_config(name: str, remat: str):
    from vlaa_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig
    spec = MODELS[name]
    text = TextConfig(**spec["text"])
    if text.head_dim == 16:
        text = TextConfig(**spec["text"], mrope_section=(2, 3, 3))
    return Qwen25VLConfig(text=text, vision=VisionConfig(**spec["vision"]),
                          tie_word_embeddings=spec["tie"], dtype=spec["dtype"],
                          param_dtype=spec["dtype"], remat_policy=remat,
                          image_token_id=min(151655, text.vocab_size - 12),
                          video_token_id=min(151656, text.vocab_size - 11),
                          vision_start_token_id=min(151652, text.vocab_size - 10),
                          vision_end_token_id=min(151653, text.vocab_size - 9))


def bench(name: str, remat: str, mesh_shape, steps: int) -> dict:
    from flax import nnx
    from tests.sharding.vl import make_batch, vl_loss
    from vlaa_jax.models.qwen2_5_vl import Qwen25VL
    spec = MODELS[name]
    config = model_config(name, remat)
    mesh_shape = spec["mesh"] or mesh_shape
    mesh = shd.make_mesh(mesh_shape)
    graphdef, state = shd.create_sharded(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)), mesh)
    params, rest = st.split_state(state)
    tx = optim.make_optimizer(params, learning_rate=1e-5, total_steps=100, warmup_steps=1)
    train = st.make_train_step(graphdef, vl_loss, tx, params, rest, mesh)
    opt_state = st.init_optimizer(tx, params, mesh)
    host = make_batch(config, batch_size=spec["rows"], length=spec["seq_len"], images=spec["images"])
    batch = shd.shard_batch(host, shd.batch_shardings(host, mesh, batch_size=spec["rows"]))
    t0 = time.perf_counter()
    compiled = train.lower(params, opt_state, rest, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, rest, batch)
        jax.block_until_ready(metrics["loss"])
        if i:                       # the first call includes dispatch warm-up
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    out = {"model": name, "remat_policy": remat, "mesh": list(mesh_shape), "params": n_params,
           "rows": spec["rows"], "seq_len": spec["seq_len"], "dtype": spec["dtype"],
           "step_s_median": statistics.median(times), "step_s_min": min(times),
           "compile_s": compile_s, "loss_first": losses[0], "loss_last": losses[-1]}
    if mem is not None:
        arg, outb = mem.argument_size_in_bytes, mem.output_size_in_bytes
        temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
        out.update(device_argument_bytes=arg, device_output_bytes=outb, device_temp_bytes=temp,
                   device_alias_bytes=alias, device_peak_bytes=arg + outb + temp - alias)
    out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,3b_shallow")
    ap.add_argument("--remat", default="none,full,save_dots")
    ap.add_argument("--mesh", default="1,8,1", help="mesh of the tiny model (3b_shallow: (1, 2, 4))")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    mesh_shape = tuple(int(x) for x in a.mesh.split(","))
    results = []
    for name in a.models.split(","):
        for remat in a.remat.split(","):
            results.append(bench(name, remat, mesh_shape, a.steps))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "sharded_train_step", "backend": jax.default_backend(),
                      "devices": jax.device_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
