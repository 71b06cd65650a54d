"""One process of the two-process test:
`python -m tests.sharding.multiprocess_worker PORT NUM_PROCESSES PROCESS_ID MODEL OUT_JSON`.

MODEL is the tiny Qwen2.5-VL HF checkpoint directory, or "toy" for the small toy decoder. It is
created/loaded onto a (2, 4, 1) mesh spanning every process's CPU devices,
feeds only this process's rows of the batch (as a multi-host loader would) and writes the loss and
gradient norm of one train step (and the loss after it) as JSON. `compute` is also called in-process
by the test for the single-process 8-device reference.
"""
from __future__ import annotations

import json
import sys


def compute(hf_dir: str, mesh_shape=(2, 4, 1), process_local: bool = False) -> dict:
    import jax
    from tests.sharding.vl import make_batch, vl_loss
    from vlaa_jax import distributed, sharding as shd
    from vlaa_jax.train import optim, step as st

    mesh = shd.make_mesh(mesh_shape)
    if hf_dir == "toy":
        import numpy as np
        from flax import nnx
        from tests.sharding.toy import Toy, toy_loss as loss_fn
        graphdef, state = shd.create_sharded(lambda: Toy(rngs=nnx.Rngs(0)), mesh)
        rs = np.random.RandomState(0)
        batch = {"input_ids": rs.randint(0, 64, (8, 16)).astype(np.int32),
                 "loss_mask": (rs.rand(8, 16) > 0.2).astype(np.int32)}
    else:
        from flax import nnx
        from vlaa_jax.models.qwen2_5_vl import from_pretrained
        model = from_pretrained(hf_dir, mesh=mesh)
        graphdef, state = nnx.split(model)
        batch, loss_fn = make_batch(model.config, batch_size=8), vl_loss
    params, rest = st.split_state(state)
    tx = optim.make_optimizer(params, learning_rate=1e-2, total_steps=4)
    train = st.make_train_step(graphdef, loss_fn, tx, params, rest, mesh)
    shardings = shd.batch_shardings(batch, mesh, batch_size=8)
    if process_local:
        rows = distributed.process_batch_slice(8)
        axes = shd.batch_axes(batch, 8)
        batch = {k: (v[rows] if axes[k][:1] == ("batch",) else
                     v[:, rows] if axes[k][1:2] == ("batch",) else v) for k, v in batch.items()}
    arrays = shd.shard_batch(batch, shardings, process_local=process_local)
    opt_state = st.init_optimizer(tx, params, mesh)
    params, opt_state, m1 = train(params, opt_state, rest, arrays)
    _, _, m2 = train(params, opt_state, rest, arrays)
    return {"loss": float(m1["loss"]), "grad_norm": float(m1["grad_norm"]),
            "loss_after_update": float(m2["loss"]), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}


def main(argv):
    port, n, pid, hf_dir, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5]
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8 // n)
    from vlaa_jax import distributed
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid)
    result = compute(hf_dir, (2, 4, 1), process_local=True)
    with open(out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
