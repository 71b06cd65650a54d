"""Two local processes (jax.distributed on 127.0.0.1, gloo, 4 CPU devices each), each feeding only
its own rows of the batch, train exactly like one process with 8 devices: the toy decoder by default,
the tiny Qwen2.5-VL with images in the slow run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model", ["toy", pytest.param("tiny_vl", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_eight_devices(model, request, tmp_path):
    from tests.sharding.multiprocess_worker import compute
    target = "toy" if model == "toy" else request.getfixturevalue("tiny_ref").hf_dir
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.sharding.multiprocess_worker", str(port), "2", str(i),
         target, outs[i]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process workers timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.load(open(o)) for o in outs]
    single = compute(target, (2, 4, 1), process_local=False)
    assert single["processes"] == 1 and single["devices"] == 8
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 8 and r["local_devices"] == 4
        assert abs(r["loss"] - single["loss"]) < 1e-5
        assert abs(r["grad_norm"] - single["grad_norm"]) < 1e-5 * max(1.0, single["grad_norm"])
        assert abs(r["loss_after_update"] - single["loss_after_update"]) < 1e-5
    if model != "toy":     # and all of them match the plain unsharded model
        assert abs(single["loss"] - request.getfixturevalue("tiny_ref").loss) < 1e-5
