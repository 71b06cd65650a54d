"""A reward model on the Qwen2.5-VL backbone: a scalar head over the final hidden state of the last
non-pad token, read from an HF directory, frozen (docs/rewards.md).

transformers has no Qwen2.5-VL sequence-classification class, so the head comes in the layouts reward
models are actually saved in (HEADS, the one table to fix if a checkpoint names its head otherwise):
  * "value_head": Skywork-VL-Reward-7B, i.e. Qwen2.5-VL-7B-Instruct plus a linear value head with bias
    (TRL's `AutoModelForCausalLMWithValueHead` names it `v_head.summary.*`, stored in the directory's
    `value_head.safetensors`; a reward-model class with `value_head.*` is read too);
  * "score": a linear `score.weight` without bias over the backbone, as TRL / OpenRLHF-style trainers
    and HF `*ForSequenceClassification` classes save one.
Either way the score is head(final-norm hidden state at the last position whose attention mask is 1),
which is the last non-pad token for left and right padding alike. The layout is found from the weight
names; the backbone is read by `qwen2_5_vl.from_pretrained` (onto a mesh, sharded like the policy)
without an output layer (a reward model needs none).

    rm = load_reward_model(hf_dir, mesh=mesh, rules=rules, dtype="bfloat16")
    scores = rm(input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)   # [B] float32
    scores = score_batch(rm.graphdef, rm.state, rm.head, fields)   # jit-friendly core over a model batch
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import layout as layout_lib
from vlaa_jax.models.qwen2_5_vl import params as hf_params
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig, load_config, read_hf_config, to_hf_dict
from vlaa_jax.models.qwen2_5_vl.loading import from_pretrained, safetensors_header, safetensors_tensor
from vlaa_jax.models.qwen2_5_vl.model import Qwen25VL


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where a saved reward model keeps its scalar head."""
    layout: str              # "value_head" | "score"
    weight: str              # HF tensor name of the [1, hidden] (or [hidden]) weight
    bias: str | None         # HF tensor name of the [1] bias, None = no bias
    saved_by: str            # who saves it this way (for messages and docs)


# Searched in order; the first whose weight is in the directory is used (names as stored, any file).
HEADS: tuple[HeadLayout, ...] = (
    HeadLayout("value_head", "v_head.summary.weight", "v_head.summary.bias",
               "TRL AutoModelForCausalLMWithValueHead / LLaMA-Factory (Skywork-VL-Reward-7B: value_head.safetensors)"),
    HeadLayout("value_head", "value_head.weight", "value_head.bias", "a reward-model class with a `value_head` Linear"),
    HeadLayout("score", "score.weight", None, "TRL / OpenRLHF reward trainers, HF *ForSequenceClassification"),
)
HEAD_FILES = ("value_head.safetensors",)  # side files beside the backbone's safetensors that may hold the head


class RewardHead(NamedTuple):
    """The scalar head (`head_scores`): score = hidden @ weight + bias, in float32."""
    weight: jax.Array   # [hidden] float32
    bias: jax.Array     # [] float32 (0 for the bias-free score head)


def head_scores(pooled: jax.Array, head: RewardHead) -> jax.Array:
    """pooled [B, D] -> scores [B] float32."""
    return pooled.astype(jnp.float32) @ head.weight + head.bias


def last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """hidden [B, L, D] at each row's last position with attention mask 1 -> [B, D] (left or right padding)."""
    length = attention_mask.shape[1]
    last = length - 1 - jnp.argmax(jnp.flip(attention_mask, axis=1) > 0, axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def score_batch(graphdef: nnx.GraphDef, state: Any, head: RewardHead, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Scores [B] float32 of a model batch (input_ids, position_ids, attention_mask, optional pixel_values
    and vision_* layout fields: what `data_pipeline.model_inputs` lays out for the policy)."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                              pixel_values=batch.get("pixel_values"), vision=layout_lib.layout_from_fields(batch),
                              return_hidden=True)
    return head_scores(last_token(hidden, batch["attention_mask"]), head)


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model: backbone (graphdef, frozen state; no output layer) and its head."""
    path: str
    config: Qwen25VLConfig
    graphdef: nnx.GraphDef
    state: Any
    head: RewardHead
    layout: HeadLayout

    def __call__(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                 image_grid_thw: Any = None) -> jax.Array:
        """Scores [B] float32 from HF-shaped inputs (positions and vision layout computed on the host, as
        `Qwen25VL.__call__` does)."""
        model = nnx.merge(self.graphdef, self.state)
        mask = np.ones(np.shape(input_ids), np.int32) if attention_mask is None else np.asarray(attention_mask)
        hidden = model(input_ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                       return_hidden=True)
        return head_scores(last_token(hidden, jnp.asarray(mask, jnp.int32)), self.head)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state)) + int(self.head.weight.size) + 1


def _tensor_sources(path: str) -> dict[str, tuple[str, str]]:
    """Stored tensor name -> (file, name in that file) over the backbone's safetensors and HEAD_FILES."""
    out = {}
    try:
        ckpt = hf_params.HFCheckpoint(path)
        out.update({stored: (os.path.join(path, shard), stored) for shard, stored in ckpt.files.values()})
    except FileNotFoundError:
        pass
    for name in HEAD_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            out.update({k: (file, k) for k in safetensors_header(file)})
    return out


def find_head(path: str) -> HeadLayout:
    """The head layout of the reward model in `path` (HEADS, first match); ValueError naming the directory
    and the names looked for when there is none."""
    names = _tensor_sources(path)
    for head in HEADS:
        if head.weight in names:
            return head
    try:
        archs = read_hf_config(path).get("architectures")
    except (OSError, ValueError):
        archs = None
    looked = ", ".join(h.weight for h in HEADS)
    raise ValueError(f"{path}: no reward head found (looked for {looked} in its safetensors and "
                     f"{', '.join(HEAD_FILES)}; config architectures {archs}): reward.reward_model_path must be a "
                     "Qwen2.5-VL reward model with a value or score head (docs/rewards.md); other reward models "
                     "(e.g. InternLM-XComposer2.5-Reward) run behind reward.open_ended='http'")


def _read_head(path: str, head: HeadLayout, hidden: int) -> RewardHead:
    names = _tensor_sources(path)

    def read(name: str, size: int) -> np.ndarray:
        file, stored = names[name]
        x = np.asarray(safetensors_tensor(file, safetensors_header(file)[stored]), np.float32)
        if x.size != size or x.ndim > 2:
            raise ValueError(f"{file}: reward head tensor {name!r} has shape {x.shape}, expected [1, {hidden}]"
                             if size == hidden else f"{file}: reward head bias {name!r} has shape {x.shape}, "
                             "expected [1] (one score)")
        return x.reshape(-1)

    weight = read(head.weight, hidden)
    if head.bias is not None and head.bias not in names:
        raise ValueError(f"{path}: reward head {head.weight!r} found but its bias {head.bias!r} is missing")
    bias = read(head.bias, 1)[0] if head.bias is not None else np.float32(0)
    return RewardHead(weight, np.asarray(bias, np.float32))


def load_reward_model(path: str, *, mesh: Mesh | None = None, rules: shd.RulesLike = None,
                      dtype: Any = "float32", attention_impl: str = "xla") -> RewardModel:
    """The reward model of an HF directory (backbone safetensors + a head of HEADS), frozen, in `dtype`
    (storage and compute); with `mesh`, the backbone is placed by `rules` like the policy (each device
    reads its shards) and the head is replicated."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"reward model {path!r} is not a directory")
    head_layout = find_head(path)
    # No output layer: a tied config has none, and a saved lm_head (Skywork keeps the LM's) is skipped.
    config = load_config(path, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl).replace(
        tie_word_embeddings=True)
    heads = {n for h in HEADS for n in (h.weight, h.bias) if n}
    model = from_pretrained(path, mesh=mesh, rules=rules, config=config, ignore_tensors=heads)
    graphdef, state = nnx.split(model)
    head = _read_head(path, head_layout, config.text.hidden_size)
    where = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    head = RewardHead(*(jax.device_put(x, where) for x in head))
    return RewardModel(path=path, config=config, graphdef=graphdef, state=state, head=head, layout=head_layout)


def reward_model_info(path: str) -> dict[str, Any]:
    """What a tool needs without loading the weights: the config and the head layout."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    return {"config": load_config(path), "layout": find_head(path), "architectures": raw.get("architectures")}


def save_reward_model(out_dir: str, config: Qwen25VLConfig, state: Any, head: RewardHead, *,
                      layout: str = "score") -> str:
    """Writes a reward model as an HF directory of `layout` ("score": `score.weight` beside the backbone
    in model.safetensors; "value_head": `v_head.summary.*` in value_head.safetensors), without an output
    layer. `state`: the backbone's nnx state or pure dict. Tokenizer files are the caller's to add."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = dict(hf_params.state_to_hf(config.replace(tie_word_embeddings=True), state))
    weight, bias = (np.asarray(x, np.float32) for x in head)
    head_tensors = {"score.weight": weight.reshape(1, -1)} if layout == "score" else {
        "v_head.summary.weight": weight.reshape(1, -1), "v_head.summary.bias": bias.reshape(1)}
    if layout == "score":
        tensors.update(head_tensors)
    else:
        save_file(head_tensors, os.path.join(out_dir, HEAD_FILES[0]))
    save_file(tensors, os.path.join(out_dir, hf_params.SAFETENSORS_SINGLE), metadata={"format": "pt"})
    hf = to_hf_dict(config.replace(tie_word_embeddings=True))
    hf["architectures"] = ["Qwen2_5_VLForSequenceClassification" if layout == "score" else
                           "Qwen2_5_VLForConditionalGeneration"]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return out_dir


def random_reward_model(config: Qwen25VLConfig, seed: int = 0) -> RewardModel:
    """A reward model with random weights (the backbone's init, a head of std 1/sqrt(hidden)): for demos,
    benchmarks and tests of the scoring path, not for judging answers."""
    model = Qwen25VL(config.replace(tie_word_embeddings=True), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    hidden = config.text.hidden_size
    weight = np.random.default_rng(seed).standard_normal(hidden).astype(np.float32) / np.sqrt(hidden)
    head = RewardHead(jnp.asarray(weight), jnp.zeros((), jnp.float32))
    return RewardModel(path="(random)", config=config, graphdef=graphdef, state=state, head=head,
                       layout=HEADS[-1])
