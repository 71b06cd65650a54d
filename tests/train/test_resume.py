"""Exact resume and crash safety, for SFT and GRPO (tiny model, real data pipeline, separate processes).

Run A trains straight (SFT 4 steps, GRPO 3). Run B saves every step and is SIGKILLed by itself inside
Orbax's asynchronous finalisation of the checkpoint of step KILL_AT (files written, directory not yet
renamed). Run C starts in B's workdir: it must find step KILL_AT - 1 as the latest loadable checkpoint,
resume from it, and finish the remaining steps (at least two). Then the last step's state (params,
optimiser state, PRNG; GRPO: the KL controller's coefficient, in the checkpoint's metadata) of C must
equal A's bit for bit, and every step must have seen the same records in the same order.

The lengths share compiled programs (the learning-rate schedule is compiled into the step) and runs with
other tests of the session: SFT 4 steps is test_nonfinite.py's length; GRPO's run A is the pinned-metrics
run (the `grpo_toy_run` fixture, same flags as B and C but the checkpoint interval).
"""
import os

import numpy as np
import pytest

from tests.train.helpers import checkpoint_meta, checkpoint_state, data_order, run_trainer


@pytest.mark.parametrize("mode,extra,steps,kill_at", [("sft", [], 4, 3), ("grpo", ["--toy_reward"], 3, 2)])
def test_kill_during_async_save_then_exact_resume(mode, extra, steps, kill_at, request, demo_data_dir,
                                                 jax_cache_dir, tmp_path):
    crashed = tmp_path / "crashed"
    run = lambda *a, **kw: run_trainer(mode, *a, cache_dir=jax_cache_dir, **kw)  # noqa: E731
    if mode == "grpo":  # the shared run: `--steps 3 --checkpoint_every 3 --toy_reward`
        straight, a = request.getfixturevalue("grpo_toy_run")
    else:
        straight = tmp_path / "straight"
        a = run(straight, demo_data_dir, "--steps", str(steps), "--checkpoint_every", str(steps), *extra)
    assert a["resumed_from"] == 0 and a["steps"] == steps

    run(crashed, demo_data_dir, "--steps", str(steps), "--checkpoint_every", "1", "--kill_during_save_at",
        str(kill_at), *extra, expect_killed=True)
    ckpts = sorted(os.listdir(crashed / "checkpoints"))
    assert str(kill_at - 1) in ckpts and str(kill_at) not in ckpts, ckpts  # step kill_at never finalised
    assert any(name.startswith(f"{kill_at}.") for name in ckpts), ckpts  # its temporary directory is there

    c = run(crashed, demo_data_dir, "--steps", str(steps), "--checkpoint_every", "1", *extra)
    assert c["resumed_from"] == kill_at - 1 and steps - c["resumed_from"] >= 2

    sa, sc = checkpoint_state(straight, steps), checkpoint_state(crashed, steps)
    assert sa.keys() == sc.keys()
    differing = [k for k in sa if not np.array_equal(sa[k], sc[k])]
    assert not differing, f"{len(differing)} arrays differ after resume, e.g. {differing[:3]}"
    assert any("params" in k for k in sa) and any("rng" in k for k in sa)
    meta_a, meta_c = checkpoint_meta(straight, steps), checkpoint_meta(crashed, steps)
    assert meta_a == meta_c and meta_a["step"] == steps
    assert ("kl_coef" in meta_a) == (mode == "grpo")

    order_a, order_c = data_order(straight), data_order(crashed)
    assert sorted(order_a) == sorted(order_c) == list(range(1, steps + 1))
    assert order_a == order_c
    seen = [i for s in sorted(order_a) for i in order_a[s]]
    assert len(seen) == len(set(seen)), "a record was trained on twice within one epoch"
