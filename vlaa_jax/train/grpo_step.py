"""One GRPO step as a chain of typed hand-offs, each produced once (arXiv 2504.11468 sec. 4, appendix C).

    PromptBatch (data_pipeline.model_inputs, from the loader)
      -> `GRPOStep.rollout`     -> Rollout       responses, their mask and sampling log-probs, prompt index
      -> `GRPOStep.score`       -> ScoredRollout  rewards and per-type statistics (vlaa_jax.rewards)
      -> `GRPOStep.train_batch` -> TrainBatch     advantages, old-policy and reference log-probs
      -> `GRPOStep.update`      -> UpdateResult   `update_epochs` passes of jitted sharded updates, and the
                                                  rollout batch's KL to the reference for the controller
The trainer (grpo_trainer.py) runs this chain once per step and owns the loop around it (loader, KL
controller, metrics, checkpoints); benchmarks/gpu.py runs the same `train_batch` and `update`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipeline.model_inputs import GroupShape, PromptBatch
from vlaa_jax import rollout as rollout_lib
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import layout
from vlaa_jax.rl import grpo as grpo_lib
from vlaa_jax.rl.dynamic_sampling import filter_zero_variance_groups
from vlaa_jax.rl.kl import kl_penalty
from vlaa_jax.rl.logprobs import token_logprobs
from vlaa_jax.train import common
from vlaa_jax.train import step as step_lib

# rewards, stats = reward_fn(response texts, records, (original_hw, resized_hw) per response)
RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]], Sequence[tuple]], tuple[np.ndarray, dict]]
UPDATE_METRICS = ("loss", "grad_norm", "pg_loss", "kl", "kl_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean",
                  "advantage_std")


# ------------------------------------------------------------------------------------------ hand-offs
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Sampled responses of a rollout batch; rows are prompt-major (row i*n + j = sample j of prompt i)."""
    prompts: PromptBatch
    prompt_index: np.ndarray  # int [R] the prompt each row answers
    tokens: np.ndarray        # int32 [R, T] response ids, pad after the end
    mask: np.ndarray          # int32 [R, T] 1 up to and including the stop token
    logprobs: np.ndarray      # float32 [R, T] log-probs under the sampling distribution (0 after the end)
    texts: tuple              # R decoded responses (special tokens dropped)
    stats: rollout_lib.EngineStats  # what the engine did (slot utilisation, prefill / decode time, ...)


@dataclasses.dataclass(frozen=True)
class ScoredRollout:
    rollout: Rollout
    rewards: np.ndarray       # float32 [R]
    stats: dict               # the reward function's statistics ("<type>/mean", "extract_fail", ...)


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """What the optimiser updates consume; `old_logp` None = the update's own forward is the old policy."""
    scored: ScoredRollout
    advantages: np.ndarray        # float32 [R]
    response_mask: np.ndarray     # int32 [R, T] the rollout's mask, 0 on groups dynamic sampling dropped
    old_logp: np.ndarray | None   # float32 [R, T]
    ref_logp: np.ndarray | None   # float32 [R, T]; None without a reference (beta = 0)
    kl_coef: float                # beta of these updates (the KL controller's value at the rollout)


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    metrics: dict             # mean over the updates of UPDATE_METRICS
    kl: float                 # KL(old || ref) per response token of the rollout batch (0 without reference)


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The config fields one GRPO step reads, read once."""
    num_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    rollout_micro_batch: int       # prompts per generate call (0: all)
    rollout_engine: str            # "continuous" | "static"
    rollout_slots: int             # decode slots of the continuous engine
    logprob_chunk: int
    update_epochs: int
    batch_size: int                # samples per optimiser update
    grad_accum_steps: int
    dynamic_sampling: bool
    old_logprobs: str              # "recompute" | "sampler" (see `old_logprob_source`)
    use_ref: bool
    loss: grpo_lib.GRPOConfig
    updates_per_step: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "GRPOSettings":
        g, t = config.grpo, config.train
        loss = grpo_lib.GRPOConfig.from_config(g.loss)
        return cls(num_samples=g.num_samples, temperature=g.temperature, top_p=g.top_p,
                   max_new_tokens=g.max_new_tokens, rollout_micro_batch=g.rollout_micro_batch,
                   rollout_engine=g.rollout_engine,
                   rollout_slots=g.rollout_slots or (g.rollout_micro_batch or g.rollout_batch_prompts) * g.num_samples,
                   logprob_chunk=g.logprob_chunk, update_epochs=g.update_epochs, batch_size=t.batch_size,
                   grad_accum_steps=t.grad_accum_steps, dynamic_sampling=g.dynamic_sampling,
                   old_logprobs=g.old_logprobs, use_ref=g.init_kl_coef > 0,
                   loss=loss, updates_per_step=g.update_epochs * g.rollout_batch_prompts * g.num_samples // t.batch_size)

    @property
    def micro(self) -> int:
        """Rows per forward / update micro-batch."""
        return self.batch_size // self.grad_accum_steps


def old_logprob_source(settings: GRPOSettings) -> str:
    """Where the old-policy log-probs of the PPO ratio come from: the one place this is decided.

    "update": one optimiser update per rollout batch, so the parameters being updated are the ones that
        sampled: the update's own forward, held constant, is exactly the old policy (ratio 1) at no extra
        cost (TRL and verl do the same).
    "sampler": grpo.old_logprobs="sampler" and no top-p: the sampler's log-probs of the drawn tokens, from
        the same temperature-scaled distribution. Saves a forward over the rollout batch, but they come
        from the decode path (KV cache, decode kernels), which differs from the training forward in the
        last bits, so the first update's ratio is not exactly 1.
    "recompute" (default, as OpenRLHF / verl): the training forward over the rollout batch before the
        first update. Also whenever top-p is on: the sampler's log-probs are then of the truncated
        distribution, not the one the loss differentiates.
    """
    if settings.updates_per_step == 1:
        return "update"
    if settings.old_logprobs == "sampler" and settings.top_p >= 1.0:
        return "sampler"
    return "recompute"


# --------------------------------------------------------------------------------------------- losses
def response_logprobs(model: Any, batch: Mapping[str, jax.Array], *, chunk_size: int, temperature: float
                      ) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) [R, T] of the R responses' tokens under the policy's temperature-scaled
    distribution, the one they were sampled from. Two layouts (`GRPOStep.micro_batch`): R rows, each a
    prompt and its response in the last T columns; or grouped, G = R / n rows: a prompt once (segment 1)
    then its n responses, T columns each (segments 2..n+1, `nn.attention_mask(shared_prefix=True)`), so
    the n samples share one forward of their prompt and its image."""
    mask = batch["response_mask"]
    rows, t = mask.shape
    groups = batch["input_ids"].shape[0]
    hidden = common.hidden_states(model, batch, shared_prefix=rows != groups)
    length = hidden.shape[1]
    if rows == groups:
        h = hidden[:, length - t - 1:length - 1]
        targets = batch["input_ids"][:, length - t:]
    else:
        n, dim = rows // groups, hidden.shape[-1]
        start = length - n * t                      # first response column
        # token k of response j is predicted at column start + j*t + k - 1; its first at the prompt's last
        last = jnp.broadcast_to(hidden[:, None, start - 1:start], (groups, n, 1, dim))
        h = jnp.concatenate([last, hidden[:, start:].reshape(groups, n, t, dim)[:, :, :-1]], axis=2)
        h = h.reshape(rows, t, dim)
        targets = batch["input_ids"][:, start:].reshape(rows, t)
    return token_logprobs(h, common.lm_head(model), targets, mask, chunk_size=chunk_size, temperature=temperature)


def grpo_loss_fn(model: Any, batch: Mapping[str, jax.Array], *, cfg: grpo_lib.GRPOConfig, chunk_size: int,
                 temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss of a micro-batch. Without `old_logp` in the batch the old policy is this forward's own
    log-probs, held constant (`old_logprob_source` "update"). Adds `kl_sum`, the per-token KL to the
    reference summed over the valid tokens (the controller's measurement in that case)."""
    logp, entropy = response_logprobs(model, batch, chunk_size=chunk_size, temperature=temperature)
    old_logp = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    loss, metrics = grpo_lib.grpo_loss(logp, old_logp, batch.get("ref_logp"), batch["advantages"],
                                       batch["response_mask"], cfg, kl_coef=batch["kl_coef"], entropy=entropy,
                                       normalizer=batch["loss_normalizer"])
    if "kl" in metrics:
        metrics["kl_sum"] = metrics["kl"] * metrics["num_tokens"]
    return loss, metrics


def make_grpo_step(config: ml_collections.ConfigDict, graphdef: Any, tx: Any, params: Any, rest: Any, mesh: Any,
                   rules: Any) -> step_lib.TrainStep:
    """The jitted sharded optimiser update of `grpo_loss_fn` with the config's loss, chunk, temperature,
    gradient accumulation and frozen parts."""
    s = GRPOSettings.from_config(config)
    return step_lib.make_train_step(
        graphdef, lambda model, batch: grpo_loss_fn(
            model, batch, cfg=s.loss, chunk_size=s.logprob_chunk, temperature=s.temperature),
        tx, params, rest, mesh, rules, micro_batches=s.grad_accum_steps,
        trainable=common.run_trainable_mask(config, params))


def reference_params(params: Any, ref_dtype: str) -> Any:
    """The frozen reference policy: a copy of `params` (the trained ones are donated each update) with
    floating leaves in `ref_dtype` ("param": as stored), each leaf sharded like its parameter. A bf16
    copy of fp32 master weights halves the reference's memory; the model casts to the compute dtype."""
    dtype = None if ref_dtype == "param" else jnp.dtype(ref_dtype)

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)

    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def rollout_chunks(num_prompts: int, micro_batch: int) -> list[np.ndarray]:
    """Prompt indices of each generate call: consecutive runs of `micro_batch` (0: all in one call)."""
    size = min(micro_batch or num_prompts, num_prompts)
    return [np.arange(i, min(i + size, num_prompts)) for i in range(0, num_prompts, size)]


def program_key(batch: Mapping[str, np.ndarray], *, n: int, greedy: bool) -> tuple:
    """What makes generate compile a new program for a prompt batch: its field shapes and the static
    options a trainer varies (samples per prompt, greedy)."""
    return tuple(sorted((k, np.shape(v)) for k, v in batch.items())), n, greedy


# ----------------------------------------------------------------------------------------------- step
@dataclasses.dataclass
class GRPOStep:
    """The pieces a GRPO step needs besides the changing parameters: model graph and non-trainable state,
    mesh, token ids, the reward and the jitted update. Its methods are the hand-offs, in order."""
    settings: GRPOSettings
    graphdef: Any
    rest: Any
    mcfg: Any
    mesh: Any
    rules: Any
    stop_ids: tuple
    pad_id: int
    detokenize: Callable[[list], list] | None = None   # response token arrays -> texts (for `rollout`)
    reward_fn: RewardFn | None = None                   # for `score`
    train_step: step_lib.TrainStep | None = None        # for `update`
    rollout_programs: set = dataclasses.field(default_factory=set)  # generate calls' shapes so far

    def __post_init__(self):
        s = self.settings
        # (params, rest, forward micro-batch) -> response log-probs: the old-policy / reference forward.
        self.logprob_fn = jax.jit(lambda p, r, b: response_logprobs(
            nnx.merge(self.graphdef, p, r), b, chunk_size=s.logprob_chunk, temperature=s.temperature)[0])

    def image_groups(self, rows: int) -> int:
        """Image groups of a batch of `rows` prompt rows: the data-parallel size (each device encodes only
        its own rows' images) when it divides the rows, else one group."""
        dp = shd.data_parallel_size(self.mesh, self.rules)
        return dp if rows % dp == 0 else 1

    # -- PromptBatch -> Rollout ----------------------------------------------------------------------
    def rollout_batches(self, prompts: PromptBatch) -> list[dict]:
        """The host prompt batches of a rollout, `grpo.rollout_micro_batch` prompts each (0: all), in order;
        each call's image groups padded to the pixel bucket of its row count (a bounded set of programs)."""
        out = []
        for idx in rollout_chunks(len(prompts), self.settings.rollout_micro_batch):
            shape = prompts.group_shape(idx, self.image_groups(len(idx)), self.mcfg)
            out.append(prompts.rows(idx, self.mcfg, shape))
        return out

    def rollout(self, params: Any, prompts: PromptBatch, rng: jax.Array, *, n: int, greedy: bool = False
                ) -> Rollout:
        """n responses per prompt (greedy: temperature 0). `grpo.rollout_engine` "continuous": streamed
        through `grpo.rollout_slots` decode slots; "static": generate calls of `grpo.rollout_micro_batch`
        prompts, each continuing the row numbering of the PRNG streams. Either way row r's tokens come
        from fold_in(rng, r): the samples depend on neither the engine nor its batching."""
        s = self.settings
        sampling = rollout_lib.SamplingConfig(temperature=0.0 if greedy else s.temperature, top_p=s.top_p)
        state = (params, self.rest)
        if s.rollout_engine == "continuous":
            def layout(idx: np.ndarray, groups: int) -> dict:
                batch = prompts.rows(idx, self.mcfg, prompts.group_shape(idx, groups, self.mcfg))
                self.rollout_programs.add(program_key(batch, n=n, greedy=greedy))
                return batch

            engine = rollout_lib.Engine(self.graphdef, self.mcfg, slots=s.rollout_slots, stop_ids=self.stop_ids,
                                        pad_id=self.pad_id, sampling=sampling, mesh=self.mesh, rules=self.rules)
            source = rollout_lib.PromptSource(len(prompts), prompts.input_ids.shape[1], layout)
            gen, stats = engine.generate(state, source, num_samples=n, max_new_tokens=s.max_new_tokens, rng=rng)
        else:
            t0, parts, rows = time.perf_counter(), [], 0
            for batch in self.rollout_batches(prompts):
                self.rollout_programs.add(program_key(batch, n=n, greedy=greedy))
                parts.append(rollout_lib.generate(
                    self.graphdef, state, batch, max_new_tokens=s.max_new_tokens, num_samples=n, sampling=sampling,
                    rng=rng, stop_ids=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh, rules=self.rules,
                    row_offset=rows))
                rows += len(batch["input_ids"]) * n
            gen = rollout_lib.concat_generations(parts, self.pad_id)
            stats = rollout_lib.static_stats(gen.lengths, [len(p.lengths) for p in parts], time.perf_counter() - t0)
        mask = gen.mask
        texts = self.detokenize([t[m > 0] for t, m in zip(gen.tokens, mask)])
        return Rollout(prompts=prompts, prompt_index=np.repeat(np.arange(len(prompts)), n), tokens=gen.tokens,
                       mask=mask, logprobs=gen.logprobs, texts=tuple(texts), stats=stats)

    # -- Rollout -> ScoredRollout --------------------------------------------------------------------
    def score(self, rollout: Rollout) -> ScoredRollout:
        records, image_hw = rollout.prompts.row_records(rollout.prompt_index)
        rewards, stats = self.reward_fn(list(rollout.texts), records, image_hw)
        return ScoredRollout(rollout, np.asarray(rewards, np.float32), dict(stats))

    # -- ScoredRollout -> TrainBatch -----------------------------------------------------------------
    def grouped(self, rollout: Rollout) -> bool:
        """Whether this rollout's log-prob forwards and update are laid out grouped: each prompt once
        before its n responses (`response_logprobs`), so its forward and its image's run once, not n
        times. Taken when the whole rollout batch is one update (its micro-batches can then be whole
        groups; the reference / old-policy forwards and the update then use the same layout, so equal
        parameters give equal log-probs), every data-parallel device gets whole groups, and the
        attention scores do not grow: a grouped row of Lp + n*T columns against n rows of Lp + T (short
        responses after long prompts, as in GRPO on images; long responses keep one row each)."""
        s = self.settings
        n, rows = s.num_samples, s.micro
        lp, t = rollout.prompts.input_ids.shape[1], rollout.tokens.shape[1]
        return (s.updates_per_step == 1 and n > 1 and rows % n == 0
                and (rows // n) % shd.data_parallel_size(self.mesh, self.rules) == 0
                and (lp + n * t) ** 2 <= n * (lp + t) ** 2)

    def update_shape(self, prompts: PromptBatch, grouped: bool = False) -> GroupShape:
        """One image-group shape for every forward / update micro-batch of this rollout batch (they stack
        for gradient accumulation); grouped: of micro / n prompt rows."""
        rows = self.settings.micro // (self.settings.num_samples if grouped else 1)
        return prompts.uniform_shape(rows, self.image_groups(rows), self.mcfg)

    def micro_batch(self, batch: TrainBatch, idx: np.ndarray, shape: GroupShape, *,
                    loss_normalizer: float | None = None, grouped: bool = False) -> dict[str, np.ndarray]:
        """Host fields of the rollout rows `idx`: prompts + responses laid out and the response mask (a
        log-prob forward's input); with `loss_normalizer`, also what the loss reads (an update's input):
        advantages, beta, the normaliser, old-policy and reference log-probs where there are any.
        grouped: `idx` is whole groups (the n rows of a prompt, consecutive), one row per prompt: the
        prompt, then each response at its own segment id 2..n+1 with the positions it was sampled at."""
        r = batch.scored.rollout
        if grouped:
            n = self.settings.num_samples
            rows = np.asarray(idx).reshape(-1, n)
            if (r.prompt_index[rows] != r.prompt_index[rows[:, :1]]).any():
                raise ValueError("a grouped micro-batch needs the rows of each prompt together")
            fields = r.prompts.rows(r.prompt_index[rows[:, 0]], self.mcfg, shape)
            t = r.tokens.shape[1]
            segments = (2 + np.arange(n, dtype=np.int32))[None, :, None] * batch.response_mask[rows]
            positions = layout.response_positions(fields["attention_mask"], fields["rope_deltas"], t)
            fields.update(
                input_ids=np.concatenate([fields["input_ids"], r.tokens[rows].reshape(len(rows), -1)], axis=1),
                attention_mask=np.concatenate([fields["attention_mask"], segments.reshape(len(rows), -1)], axis=1),
                position_ids=np.concatenate([fields["position_ids"], np.tile(positions, (1, 1, n))], axis=2))
        else:
            fields = r.prompts.rows(r.prompt_index[idx], self.mcfg, shape, responses=r.tokens[idx],
                                    response_mask=batch.response_mask[idx])
        fields.pop("rope_deltas")
        fields["response_mask"] = batch.response_mask[idx]
        if loss_normalizer is not None:
            fields.update(advantages=batch.advantages[idx], kl_coef=np.float32(batch.kl_coef),
                          loss_normalizer=np.float32(loss_normalizer))
            if batch.old_logp is not None:
                fields["old_logp"] = batch.old_logp[idx]
            if batch.ref_logp is not None:
                fields["ref_logp"] = batch.ref_logp[idx]
        return fields

    def train_batch(self, scored: ScoredRollout, params: Any, ref_params: Any | None, kl_coef: float) -> TrainBatch:
        """ref_params: the frozen reference (None without one: `settings.use_ref` False). Group advantages (dynamic sampling masks the groups it drops), then the old-policy log-probs
        (`old_logprob_source`) and the reference log-probs, over the whole rollout batch."""
        s, r = self.settings, scored.rollout
        num_prompts = len(r.prompts)
        adv = np.asarray(grpo_lib.group_advantages(
            scored.rewards.reshape(num_prompts, s.num_samples), mode=s.loss.advantage_mode,
            eps=s.loss.advantage_eps)).reshape(-1).astype(np.float32)
        resp_mask = r.mask.copy()
        if s.dynamic_sampling:
            kept = filter_zero_variance_groups(scored.rewards.reshape(num_prompts, s.num_samples))
            drop = np.ones(len(resp_mask), bool)
            drop[kept.kept_indices] = False
            resp_mask[drop] = 0
        batch = TrainBatch(scored, adv, resp_mask, None, None, float(kl_coef))
        source = old_logprob_source(s)
        fwd = self._forward_batches(batch, r.prompts) if source == "recompute" or s.use_ref else []
        old = {"update": None, "sampler": r.logprobs,
               "recompute": self._forward_logprobs(params, fwd) if source == "recompute" else None}[source]
        ref = self._forward_logprobs(ref_params, fwd) if s.use_ref else None
        return dataclasses.replace(batch, old_logp=old, ref_logp=ref)

    def _forward_batches(self, batch: TrainBatch, prompts: PromptBatch) -> list[dict]:
        micro, n = self.settings.micro, len(batch.advantages)
        grouped = self.grouped(batch.scored.rollout)
        shape = self.update_shape(prompts, grouped)
        return [self.micro_batch(batch, np.arange(i, min(i + micro, n)), shape, grouped=grouped)
                for i in range(0, n, micro)]

    def _forward_logprobs(self, params: Any, batches: list[dict]) -> np.ndarray:
        out = []
        for b in batches:
            dev = common.put_batch(b, self.mesh, self.rules, batch_size=b["response_mask"].shape[0])
            with shd.activate(self.mesh, self.rules):
                out.append(np.asarray(jax.device_get(self.logprob_fn(params, self.rest, dev))))
        return np.concatenate(out, axis=0)

    # -- TrainBatch -> updates -----------------------------------------------------------------------
    def update(self, params: Any, opt_state: Any, batch: TrainBatch, key: jax.Array
               ) -> tuple[Any, Any, UpdateResult]:
        """`update_epochs` passes of shuffled minibatches of `train.batch_size` samples, each one jitted
        sharded update with gradient accumulation and the minibatch's global loss normaliser."""
        s = self.settings
        n, micro = len(batch.advantages), s.micro
        grouped = self.grouped(batch.scored.rollout)       # one update: whole groups, shuffled as groups
        shape = self.update_shape(batch.scored.rollout.prompts, grouped)
        mask = batch.response_mask
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64))
        all_metrics = []
        for _ in range(s.update_epochs):
            if grouped:
                order = (rng.permutation(n // s.num_samples)[:, None] * s.num_samples
                         + np.arange(s.num_samples)).reshape(-1)
            else:
                order = rng.permutation(n)
            for start in range(0, n, s.batch_size):
                mb = order[start:start + s.batch_size]
                norm = float(grpo_lib.loss_normalizer(mask[mb], s.loss.loss_agg_mode))
                micro_batches = [self.micro_batch(batch, mb[m * micro:(m + 1) * micro], shape,
                                                  loss_normalizer=max(norm, 1.0) / s.grad_accum_steps, grouped=grouped)
                                 for m in range(s.grad_accum_steps)]
                host = micro_batches[0] if s.grad_accum_steps == 1 else step_lib.stack_micro_batches(micro_batches)
                dev = common.put_batch(host, self.mesh, self.rules, batch_size=micro,
                                       micro_batched=s.grad_accum_steps > 1)
                params, opt_state, metrics = self.train_step(params, opt_state, self.rest, dev)
                all_metrics.append(jax.device_get(metrics))
        mean = {k: float(np.mean([np.asarray(m[k]) for m in all_metrics])) for k in UPDATE_METRICS
                if k in all_metrics[0]}
        return params, opt_state, UpdateResult(mean, self.rollout_kl(batch, all_metrics))

    def rollout_kl(self, batch: TrainBatch, update_metrics: Sequence[Mapping[str, Any]]) -> float:
        """KL(old || ref) per response token of the rollout batch, the KL controller's input: the config's
        estimator summed over the valid tokens, divided by their number. The per-token values come from
        the recomputed / sampler old log-probs, or, when the update's forward is the old policy, from that
        forward (its `kl_sum`, one update over the whole batch)."""
        if not self.settings.use_ref:
            return 0.0
        tokens = max(float(batch.response_mask.sum()), 1.0)
        if batch.old_logp is not None:
            kl_tok = np.asarray(kl_penalty(jnp.asarray(batch.old_logp), jnp.asarray(batch.ref_logp),
                                           self.settings.loss.kl_estimator))
            return float((kl_tok * batch.response_mask).sum() / tokens)
        kl_sum = float(np.mean([np.asarray(m["kl_sum"]) for m in update_metrics])) * self.settings.grad_accum_steps
        return kl_sum / tokens

