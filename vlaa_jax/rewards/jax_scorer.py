"""The open-ended scorer in this process: a JAX reward model (vlaa_jax.models.reward_model) on the policy's mesh.

`RewardModelScorer` answers the Scorer interface of open_ended.py (`score(list[ScoreRequest]) -> list[float]`).
Each request is one conversation in the reward model's own chat template, without a system prompt of
ours (the template's default, as the reward model was trained and as its model card scores):
    user: [the prompt's image] question      assistant: answer
The image is the one the policy saw (`ScoreRequest.pixels`: the loader's patches and grid), so the
reward model needs no image decoding and cuts images into the same patches as the policy (checked);
it sees them at the policy's `data.max_pixels`, not at its own processor's limits (docs/rewards.md).
Rows go through `reward.reward_model_batch_size` rows per forward, split over the data-parallel devices
(one image group per device); lengths and patch counts are rounded up to powers of two, so a run
compiles a handful of programs.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np

from data_pipeline.chat import ChatFormatter
from data_pipeline.model_inputs import PATCH_MULTIPLE, grouped_vision_fields
from data_pipeline.records import Record
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import layout as layout_lib
from vlaa_jax.models.qwen2_5_vl.config import VisionConfig
from vlaa_jax.models.reward_model import RewardModel, load_reward_model, score_batch
from vlaa_jax.rewards.open_ended import ScoreRequest, check_scores

MIN_LENGTH = 64  # shortest padded row length


def _bucket(n: int, low: int) -> int:
    """n rounded up to a power of two, at least `low`."""
    return max(low, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class RewardModelScorer:
    """Scores (image, question, answer) with a reward model loaded from an HF directory (frozen)."""

    def __init__(self, path: str, *, mesh: Any = None, rules: shd.RulesLike = None, dtype: str = "bfloat16",
                 batch_size: int = 16, vision: VisionConfig | None = None, attention_impl: str = "xla",
                 model: RewardModel | None = None):
        """vision: the policy's vision config, whose patches the requests carry (checked against the
        reward model's); model: an already loaded reward model (else read from `path`)."""
        self.model = model if model is not None else load_reward_model(
            path, mesh=mesh, rules=rules, dtype=dtype, attention_impl=attention_impl)
        self.mesh, self.rules, self.name = mesh, rules, f"reward model {path}"
        cfg = self.model.config
        self.formatter = ChatFormatter.create(path, system_prompt=None)
        ids = (self.formatter.image_pad_id, self.formatter.vision_start_id)
        if ids != (cfg.image_token_id, cfg.vision_start_token_id):
            raise ValueError(f"{path}: the tokenizer's <|image_pad|>, <|vision_start|> are ids {ids}, its config "
                             f"says {(cfg.image_token_id, cfg.vision_start_token_id)}")
        if vision is not None:
            mine, theirs = _patch_geometry(cfg.vision), _patch_geometry(vision)
            if mine != theirs:
                raise ValueError(f"{path}: the reward model cuts images into patches {mine} (channels, temporal, "
                                 f"patch, merge), the policy into {theirs}; it scores the policy's patches, so they "
                                 "must agree")
        self.dp = shd.data_parallel_size(mesh, rules) if mesh is not None else 1
        self.batch_size = -(-max(1, int(batch_size)) // self.dp) * self.dp
        graphdef = self.model.graphdef
        self._fn = jax.jit(lambda state, head, batch: score_batch(graphdef, state, head, batch))
        self.calls = 0       # forwards run (for tests and the benchmark)
        self.programs: set = set()  # compiled shapes so far

    def score(self, items: Sequence[ScoreRequest]) -> list[float]:
        rows = [self._row(k, it) for k, it in enumerate(items)]
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            out.extend(self._forward(rows[start:start + self.batch_size]))
        return check_scores(out, len(items), self.name)

    def _row(self, k: int, item: ScoreRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, patches, grid) of one request."""
        if item.pixels is None:
            raise ValueError(f"{self.name}: request {k} (prompt {item.prompt_id!r}) carries no image: the in-process "
                             "reward model scores the prompt's image as the policy saw it (GRPO loader records carry "
                             "it; evaluation records do not: use reward.open_ended='http' there)")
        patches, grid = np.asarray(item.pixels.patches, np.float32), np.asarray(item.pixels.grid, np.int64)
        merge = self.model.config.vision.spatial_merge_size
        record = Record(id=str(item.prompt_id or k), source="", image=str(item.image or ""), question=item.question,
                        response=item.answer, ground_truth="", verifier_type=None)
        ids, _ = self.formatter.encode_sft(record, int(np.prod(grid)) // merge ** 2)
        return ids, patches, grid

    def _forward(self, rows: list) -> list[float]:
        cfg = self.model.config
        n, B = len(rows), self.batch_size
        L = _bucket(max(len(r[0]) for r in rows), MIN_LENGTH)
        ids = np.full((B, L), self.formatter.pad_id, np.int32)
        mask = np.zeros((B, L), np.int32)
        for b, (row_ids, _, _) in enumerate(rows):   # left-padded, like the prompts
            ids[b, L - len(row_ids):] = row_ids
            mask[b, L - len(row_ids):] = 1
        grids = np.stack([r[2] for r in rows])
        per_group = B // self.dp
        member = np.arange(n) // per_group
        sizes = np.array([len(r[1]) for r in rows])
        most = max(int(sizes[member == g].sum()) for g in range(self.dp) if (member == g).any())
        patches = _bucket(-(-most // PATCH_MULTIPLE) * PATCH_MULTIPLE, PATCH_MULTIPLE)
        pos, _ = layout_lib.mrope_positions(ids, grids, mask, spatial_merge_size=cfg.vision.spatial_merge_size,
                                            image_token_id=cfg.image_token_id,
                                            vision_start_token_id=cfg.vision_start_token_id)
        fields = {"input_ids": ids, "attention_mask": mask, "position_ids": pos.astype(np.int32)}
        fields.update(grouped_vision_fields(np.concatenate([r[1] for r in rows]), grids, member, self.dp, cfg,
                                            num_patches=patches))
        self.programs.add(tuple(sorted((k, np.shape(v)) for k, v in fields.items())))
        self.calls += 1
        if self.mesh is None:
            scores = self._fn(self.model.state, self.model.head, fields)
        else:
            dev = shd.shard_batch(fields, shd.batch_shardings(fields, self.mesh, self.rules, batch_size=B))
            with shd.activate(self.mesh, self.rules):
                scores = self._fn(self.model.state, self.model.head, dev)
        return np.asarray(jax.device_get(scores))[:n].tolist()


def _patch_geometry(v: VisionConfig) -> tuple[int, int, int, int]:
    return v.in_channels, v.temporal_patch_size, v.patch_size, v.spatial_merge_size
