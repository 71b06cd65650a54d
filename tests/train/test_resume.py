"""Exact resume and crash safety, for SFT and GRPO (tiny model, real data pipeline, separate processes).

Run A trains 6 steps straight. Run B saves every step and is SIGKILLed by itself inside Orbax's
asynchronous finalisation of the step-4 checkpoint (files written, directory not yet renamed). Run C
starts in B's workdir: it must find step 3 as the latest loadable checkpoint, resume from it, and
finish steps 4..6. Then the step-6 state (params, optimiser state, PRNG; GRPO: the KL controller's
coefficient, in the checkpoint's metadata) of C must equal A's bit for bit, and every step must have seen
the same records in the same order.
"""
import os

import numpy as np
import pytest

from tests.train.helpers import checkpoint_meta, checkpoint_state, data_order, run_trainer


@pytest.mark.parametrize("mode,extra", [("sft", []), ("grpo", ["--toy_reward"])])
def test_kill_during_async_save_then_exact_resume(mode, extra, demo_data_dir, jax_cache_dir, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    extra = [*extra]
    run = lambda *a, **kw: run_trainer(mode, *a, cache_dir=jax_cache_dir, **kw)  # noqa: E731
    a = run(straight, demo_data_dir, "--steps", "6", "--checkpoint_every", "3", *extra)
    assert a["resumed_from"] == 0

    run(crashed, demo_data_dir, "--steps", "6", "--checkpoint_every", "1", "--kill_during_save_at", "4",
        *extra, expect_killed=True)
    ckpts = sorted(os.listdir(crashed / "checkpoints"))
    assert "3" in ckpts and "4" not in ckpts, ckpts  # step 4 never finalised
    assert any(name.startswith("4.") for name in ckpts), ckpts  # its temporary directory is there

    c = run(crashed, demo_data_dir, "--steps", "6", "--checkpoint_every", "1", *extra)
    assert c["resumed_from"] == 3

    sa, sc = checkpoint_state(straight, 6), checkpoint_state(crashed, 6)
    assert sa.keys() == sc.keys()
    differing = [k for k in sa if not np.array_equal(sa[k], sc[k])]
    assert not differing, f"{len(differing)} arrays differ after resume, e.g. {differing[:3]}"
    assert any("params" in k for k in sa) and any("rng" in k for k in sa)
    meta_a, meta_c = checkpoint_meta(straight, 6), checkpoint_meta(crashed, 6)
    assert meta_a == meta_c and meta_a["step"] == 6
    assert ("kl_coef" in meta_a) == (mode == "grpo")

    order_a, order_c = data_order(straight), data_order(crashed)
    assert sorted(order_a) == sorted(order_c) == [1, 2, 3, 4, 5, 6]
    assert order_a == order_c
    seen = [i for s in sorted(order_a) for i in order_a[s]]
    assert len(seen) == len(set(seen)), "a record was trained on twice within one epoch"
