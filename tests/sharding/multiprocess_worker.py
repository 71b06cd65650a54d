"""One process of the two-process test: `python -m tests.sharding.multiprocess_worker PORT N ID OUT`.

It computes the toy model's loss and gradient norm on mesh (2, 4, 1) (or (1, 8, 1) / (2, 2, 2)) over
all processes' devices and writes them as JSON; `compute` is also called in-process by the test for
the single-process 8-device reference.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def compute(mesh_shape, process_local: bool = False) -> dict:
  import jax
  from flax import nnx
  from tests.sharding.toy import Toy, toy_loss
  from vlaa_jax import distributed, sharding as shd
  from vlaa_jax.train import optim, step as st

  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, 64, (8, 16)).astype(np.int32),
           "loss_mask": (rng.random((8, 16)) > 0.2).astype(np.int32)}
  mesh = shd.make_mesh(mesh_shape)
  gd, state = shd.create_sharded(lambda: Toy(rngs=nnx.Rngs(0)), mesh)
  params, rest = st.split_state(state)
  tx = optim.make_optimizer(params, learning_rate=1e-2, total_steps=4)
  train = st.make_train_step(gd, toy_loss, tx, params, rest, mesh)
  shardings = shd.batch_shardings(batch, mesh, batch_size=8)
  if process_local:
    rows = distributed.process_batch_slice(8)
    batch = {k: v[rows] for k, v in batch.items()}
  arrays = shd.shard_batch(batch, shardings, process_local=process_local)
  opt_state = st.init_optimizer(tx, params, mesh)
  params, opt_state, m1 = train(params, opt_state, rest, arrays)
  _, _, m2 = train(params, opt_state, rest, arrays)
  spec = str(params["blocks"][0]["up"].sharding.spec)
  return {"loss": float(m1["loss"]), "grad_norm": float(m1["grad_norm"]),
          "loss_after_update": float(m2["loss"]), "processes": jax.process_count(),
          "devices": jax.device_count(), "up_spec": spec}


def main(argv):
  port, n, pid, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8 // n)
  from vlaa_jax import distributed
  distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid)
  # Each process holds only its rows of the batch, as a multi-host loader would.
  result = compute((2, 4, 1), process_local=True)
  with open(out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
