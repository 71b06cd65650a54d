"""Supervised fine-tuning: assistant-only cross-entropy on VLAA-Thinking conversations.

Reads top to bottom as a run does: set-up (mesh, tokenizer, model, optimiser, data) -> resume from
the workdir's latest checkpoint if any -> for each step: M micro-batches from the loader, one jitted
sharded update (gradient accumulation inside), non-finite check, metrics, periodic eval loss,
async checkpoint -> final checkpoint, export, summary.

The loss is the token-mean negative log-likelihood over all assistant tokens of the global batch
(not a mean of per-micro-batch means): each micro-batch carries `loss_normalizer` = (assistant
tokens of the whole batch) / M, and the step averages micro-batch losses, so the sum comes out right.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlaa_jax import sharding as shd
from vlaa_jax.train import common, loop
from vlaa_jax.train import step as step_lib


def sft_loss(model: Any, batch: Mapping[str, jax.Array], *, chunk_size: int
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Assistant-token NLL of one micro-batch, divided by the global normaliser it carries."""
    logp, _ = common.gathered_logprobs(model, batch, batch["target_pos"], batch["target_valid"],
                                       chunk_size=chunk_size)
    valid = batch["target_valid"].astype(jnp.float32)
    nll_sum = -jnp.sum(logp * valid)
    return nll_sum / batch["loss_normalizer"], {"tokens": jnp.sum(valid), "nll_sum": nll_sum}


def make_sft_step(config: ml_collections.ConfigDict, graphdef: Any, tx: Any, params: Any, rest: Any, mesh: Any,
                  rules: Any, *, micro_batches: int | None = None) -> step_lib.TrainStep:
    """The SFT trainer's jitted step (`sft_loss`, frozen parts from the config); benchmarks build this one
    too, so they time exactly what the trainer runs. micro_batches: default train.grad_accum_steps."""
    chunk = config.sft.logits_chunk
    return step_lib.make_train_step(
        graphdef, lambda model, batch: sft_loss(model, batch, chunk_size=chunk), tx, params, rest, mesh, rules,
        micro_batches=micro_batches or config.train.grad_accum_steps,
        trainable=common.run_trainable_mask(config, params))


def host_batch(batches: list[dict], mcfg, groups: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Stacks M loader batches into one step's micro-batches with the global token normaliser.
    groups: target positions are compacted per group of rows (`common.target_positions`) and the images
    form one image group per group of rows (`common.pad_to`); the trainer passes the data-parallel size,
    so each device's rows share one padded target list and each device encodes only its rows' images.
    Default: targets per row, all images in one group. Returns (batch, number of assistant tokens)."""
    arrays = common.pad_to([common.device_fields(b) for b in batches], mcfg, groups=groups or 1)
    m = len(arrays)
    tokens = int(sum(a["loss_mask"][:, 1:].sum() for a in arrays))
    targets = [common.target_positions(a.pop("loss_mask"), groups=groups) for a in arrays]
    k = max(p.shape[1] for p, _ in targets)
    for a, (pos, valid) in zip(arrays, targets):
        a["target_pos"] = np.pad(pos, [(0, 0), (0, k - pos.shape[1])])
        a["target_valid"] = np.pad(valid, [(0, 0), (0, k - valid.shape[1])])
        a["loss_normalizer"] = np.float32(max(tokens, 1) / m)
    if m == 1:
        return arrays[0], tokens
    return step_lib.stack_micro_batches(arrays), tokens


def total_steps(config: ml_collections.ConfigDict, num_records: int) -> int:
    if config.train.num_steps:
        return config.train.num_steps
    return max(1, (num_records * config.data.num_epochs) // config.train.batch_size)


def train(config: ml_collections.ConfigDict, workdir: str, *, export: bool | None = None,
          hf: bool = True) -> dict:
    """Runs (or resumes) SFT in `workdir`; returns a summary dict (losses, steps, paths)."""
    t = config.train
    run = loop.Run.setup(config, workdir)
    micro = t.batch_size // t.grad_accum_steps
    loader = run.loader(config.data.train_split, batch_size=micro, mode="sft")
    steps = total_steps(config, loader.num_records)
    dp = shd.data_parallel_size(run.mesh, run.rules)
    run.init_training(total_updates=steps)
    chunk = config.sft.logits_chunk
    train_step = make_sft_step(config, run.graphdef, run.tx, run.params, run.rest, run.mesh, run.rules)
    eval_fn = jax.jit(lambda params, rest, batch: sft_loss(
        run.model(params, rest), batch, chunk_size=chunk)[1])

    start, _ = run.restore(loader)
    writer = run.writer(steps, start, key_metrics=("loss", "eval_loss", "lr"), description="sft")
    first_loss = last_loss = None
    eval_history = []
    if t.eval_every and start == 0 and config.data.eval_split:
        eval_history.append((0, evaluate_loss(run, eval_fn)))
    step = start
    try:
        for step in range(start + 1, steps + 1):
            t0 = time.time()
            raw = [next(loader) for _ in range(t.grad_accum_steps)]
            writer.write_data_ids(step, [i for b in raw for i in b["id"]])
            batch, tokens = host_batch(raw, run.mcfg, groups=dp)
            device_batch = common.put_batch(batch, run.mesh, run.rules, batch_size=micro,
                                            micro_batched=t.grad_accum_steps > 1)
            run.params, run.opt_state, metrics = train_step(run.params, run.opt_state, run.rest, device_batch)
            metrics = jax.device_get(metrics)
            finite = run.check_finite(step, metrics)
            loss = float(metrics["loss"])
            if finite:
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
            dt = time.time() - t0
            if step % t.log_every == 0 or step == steps:
                writer.write_scalars(step, {
                    "loss": loss, "grad_norm": float(metrics["grad_norm"]), "lr": float(run.schedule(step - 1)),
                    "tokens": tokens, "tokens_per_s": tokens / max(dt, 1e-9), "step_time_s": dt,
                    "skipped_nonfinite": run.skipped})
            if t.eval_every and config.data.eval_split and step % t.eval_every == 0:
                ev = evaluate_loss(run, eval_fn)
                eval_history.append((step, ev))
                writer.write_scalars(step, {"eval_loss": ev})
            writer.advance()
            run.maybe_save(step, last=step == steps, data_state=loader.get_state())
    finally:
        writer.close()
        run.finish_saves()
    summary = {"mode": "sft", "steps": steps, "resumed_from": start, "first_loss": first_loss,
               "last_loss": last_loss, "eval_loss": eval_history, "skipped_nonfinite": run.skipped,
               "data": loader.summary()}
    if (t.export_hf if export is None else export):
        summary.update(run.export(hf=hf))
    run.print_summary(summary_lines(summary))
    return summary


def evaluate_loss(run: "loop.Run", eval_fn) -> float:
    """Token-mean NLL over `train.eval_batches` batches of the eval split (same order every time)."""
    c = run.config
    loader = run.loader(c.data.eval_split, batch_size=c.train.batch_size // c.train.grad_accum_steps,
                        mode="sft", shuffle=False, num_epochs=None)
    nll = tokens = 0.0
    for _ in range(c.train.eval_batches):
        arrays, _ = host_batch([next(loader)], run.mcfg, groups=shd.data_parallel_size(run.mesh, run.rules))
        out = eval_fn(run.params, run.rest, common.put_batch(
            arrays, run.mesh, run.rules, batch_size=arrays["input_ids"].shape[0]))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loader.close()
    return nll / max(tokens, 1.0)


def summary_lines(s: Mapping[str, Any]) -> list[str]:
    lines = [f"SFT finished: {s['steps']} steps (resumed from step {s['resumed_from']})"]
    if s["first_loss"] is not None:
        lines.append(f"  train loss: first step {s['first_loss']:.4f} -> last step {s['last_loss']:.4f}")
    if s["eval_loss"]:
        lines.append("  eval loss: " + ", ".join(f"step {k}: {v:.4f}" for k, v in s["eval_loss"]))
    if s["skipped_nonfinite"]:
        lines.append(f"  updates skipped for non-finite loss/gradients: {s['skipped_nonfinite']}")
    for key in ("model_dir", "hf_dir"):
        if key in s:
            lines.append(f"  {key}: {s[key]}")
    return lines
