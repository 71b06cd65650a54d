"""The paper's mixed reward (sec. 4.1): one verifier per sample, chosen by its `verifier_type`.

No weighted sum and no separate format term: a response whose answer cannot be extracted (see
extract.py) gets 0, which is the paper's implicit format reward; the thinking is not scored.

Records are dicts or objects (e.g. data_pipeline.records.Record) with
  verifier_type  digit | mcq | math | iou (bbox) | open_ended (open, open-ended, general)
  gt / ground_truth
  question       (mcq options are parsed from it; open-ended scorer input)
  image          (open-ended scorer input, a path)
  image_patches, image_grid   open-ended, in-process reward model: the prompt's image as the policy saw
                 it (the GRPO loader's records carry them: PromptBatch.row_records)
  options        optional, mcq: list or dict of option texts
  original_hw, resized_hw   iou: (height, width) of the image before / after smart_resize; may
                 instead be passed per sample as `image_hw=[(original_hw, resized_hw), ...]`.
Anything else is a ValueError naming the record (index and id).

Host side: `MixedReward(cfg)(responses, records)` keeps the Math-Verify process pool and the
reward-model client alive across steps; `compute_rewards(...)` is the one-call form.
Failure policy: math timeouts / Math-Verify errors score 0 and are counted; a reward-model server
that still fails after its retries, or answers anything but finite numbers, raises ScorerError
(training on silently-zero open-ended rewards would be worse); with no scorer (`reward.open_ended`
"none", or not chosen), open-ended answers score 0, counted as `open_ended_unscored` (the GRPO trainer
refuses a training split with open-ended records and no choice made, before compiling anything).
The open-ended scorer (`reward.open_ended`): "jax_rm", a Qwen2.5-VL reward model in this process
(jax_scorer.py); "http", a server (open_ended.HTTPScorer, tools/reward_server.py); "none".

Time bound: only the one `<answer>` part is scored, and an answer longer than
`max_answer_chars` scores 0 (counted as `answer_too_long`) before any verifier sees it. Extraction
and the digit / mcq / iou verifiers are linear in their input, so each costs at most a few
milliseconds; Math-Verify runs in worker processes under a hard deadline, the reward model under the
HTTP scorer's per-request deadline. Counted zeros are logged with the record ids (REWARD_COUNTERS).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipeline.records import VERIFIER_ALIASES  # the spellings of the reward types in the data
from vlaa_jax.rewards.digit import digit_reward
from vlaa_jax.rewards.extract import extract_answer
from vlaa_jax.rewards.iou import GT_FRAMES, PRED_FRAMES, iou_reward
from vlaa_jax.rewards.math import MathVerifyPool, shared_pool
from vlaa_jax.rewards.mcq import mcq_reward
from vlaa_jax.models.qwen2_5_vl.config import DTYPES
from vlaa_jax.rewards.jax_scorer import RewardModelScorer
from vlaa_jax.rewards.open_ended import (HTTPScorer, PromptImage, Scorer, check_reward_model_url,
                                         open_ended_rewards)

REWARD_TYPES = ("digit", "mcq", "math", "iou", "open_ended")
OPEN_ENDED_SCORERS = ("", "jax_rm", "http", "none")  # reward.open_ended ("" = not chosen)
# Counts of answers that scored 0 without being judged, per batch, in the stats (and metrics.jsonl).
REWARD_COUNTERS = ("answer_too_long", "math_timeouts", "math_errors", "open_ended_unscored")
_LOG = logging.getLogger("vlaa_jax.rewards")
_LOGGED_IDS = 10  # record ids named per counted-zero log line


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    answer_fallback_boxed: bool = False  # no <answer> tag at all -> use the last \boxed{} instead
    math_timeout_s: float = 5.0          # hard Math-Verify limit per answer, seconds (timeout -> 0)
    num_workers: int = 2                 # Math-Verify worker processes
    open_ended_beta: float = 1.0         # beta in R = 1 - exp(-(S(pred)-S(ref)) * beta); not in the paper
    open_ended: str = ""                 # the open-ended scorer: jax_rm | http | none; "" = not chosen (the
    #                                      GRPO trainer stops on open-ended records in its training split);
    #                                      a reward_model_url means http unless jax_rm is chosen
    reward_model_path: str = ""          # jax_rm: HF directory of a Qwen2.5-VL reward model (docs/rewards.md)
    reward_model_dtype: str = "bfloat16"  # jax_rm: storage and compute dtype of the frozen reward model
    reward_model_batch_size: int = 16    # jax_rm: rows per reward-model forward (a multiple of the data-parallel size)
    reward_model_url: str = ""           # http: tools/reward_server.py endpoint
    reward_model_timeout_s: float = 60.0  # per HTTP request, seconds
    reward_model_retries: int = 3        # retries after the first attempt (exponential back-off)
    iou_pred_frame: str = "auto"         # auto | normalized | resized_pixels | original_pixels (iou.py)
    iou_gt_frame: str = "auto"           # auto | normalized | original_pixels (iou.py)
    max_answer_chars: int = 8192         # longer <answer> parts score 0, counted (bounds verifier time)

    def __post_init__(self):
        def require(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"reward.{key} must be {rule}, got {getattr(self, key)!r}")

        def finite_positive(key: str) -> None:
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0, key, "a finite number > 0")

        def integer(key: str, low: int) -> None:
            value = getattr(self, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low, key,
                    f"an integer >= {low}")

        require(self.iou_pred_frame in PRED_FRAMES, "iou_pred_frame", f"one of {PRED_FRAMES}")
        require(self.iou_gt_frame in GT_FRAMES, "iou_gt_frame", f"one of {GT_FRAMES}")
        for key in ("open_ended_beta", "math_timeout_s", "reward_model_timeout_s"):
            finite_positive(key)
        integer("num_workers", 1)
        integer("reward_model_retries", 0)
        integer("max_answer_chars", 1)
        integer("reward_model_batch_size", 1)
        require(self.open_ended in OPEN_ENDED_SCORERS, "open_ended",
                f"one of {OPEN_ENDED_SCORERS[1:]} (or empty: not chosen)")
        require(self.reward_model_dtype in DTYPES, "reward_model_dtype", f"one of {DTYPES}")
        require(self.open_ended != "jax_rm" or bool(self.reward_model_path), "reward_model_path",
                "an HF reward-model directory for reward.open_ended='jax_rm'")
        require(self.open_ended != "http" or bool(self.reward_model_url), "reward_model_url",
                "a server URL for reward.open_ended='http'")
        require(not self.reward_model_path or self.open_ended == "jax_rm", "reward_model_path",
                f"empty unless reward.open_ended='jax_rm' (it is {self.open_ended!r})")
        require(isinstance(self.answer_fallback_boxed, bool), "answer_fallback_boxed", "True or False")
        try:
            check_reward_model_url(self.reward_model_url, allow_empty=True)
        except ValueError as e:
            raise ValueError(f"reward.reward_model_url {e}") from None
        require(not self.reward_model_url or self.open_ended != "jax_rm", "reward_model_url",
                "empty for reward.open_ended='jax_rm' (the reward model runs in this process)")

    @property
    def open_ended_scorer(self) -> str:
        """The scorer of open-ended answers: "jax_rm", "http", "none" or "" (none chosen). A
        reward_model_url means "http" unless "jax_rm" is chosen (the key of earlier versions keeps working,
        also on a preset that says "none")."""
        return "http" if self.reward_model_url and self.open_ended != "jax_rm" else self.open_ended

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RewardConfig":
        items = dict(config.items())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown reward config keys {unknown}; known: {sorted(names)}")
        return cls(**items)


def _get(record: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(record, Mapping):
            if record.get(name) is not None:
                return record[name]
        elif getattr(record, name, None) is not None:
            return getattr(record, name)
    return default


def _prompt_image(record: Any) -> PromptImage | None:
    """The prompt's image as the policy saw it, where the record carries it (GRPO: PromptBatch.row_records)."""
    patches, grid = _get(record, "image_patches"), _get(record, "image_grid")
    return None if patches is None or grid is None else PromptImage(patches, tuple(int(g) for g in grid))


def _describe(record: Any, index: int) -> str:
    rid = _get(record, "id")
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def canonical_verifier_type(record: Any, index: int = 0) -> str:
    raw = _get(record, "verifier_type")
    key = raw.strip().lower() if isinstance(raw, str) else None
    if key not in VERIFIER_ALIASES:
        raise ValueError(f"{_describe(record, index)}: unknown verifier_type {raw!r}; "
                         f"expected one of {sorted(VERIFIER_ALIASES)}")
    return VERIFIER_ALIASES[key]


class MixedReward:
    """Batch reward function; owns (or borrows) the Math-Verify pool and the open-ended scorer."""

    def __init__(self, cfg: RewardConfig | Mapping[str, Any] | None = None, *,
                 scorer: Scorer | None = None, math_pool: MathVerifyPool | None = None):
        cfg = cfg if isinstance(cfg, RewardConfig) else RewardConfig.from_config(cfg or {})
        self.cfg = cfg
        kind = cfg.open_ended_scorer
        if scorer is None and kind == "http":
            scorer = HTTPScorer(cfg.reward_model_url, timeout_s=cfg.reward_model_timeout_s,
                                retries=cfg.reward_model_retries)
        elif scorer is None and kind == "jax_rm":  # on the default device; the GRPO trainer passes one on its mesh
            scorer = RewardModelScorer(cfg.reward_model_path, dtype=cfg.reward_model_dtype,
                                       batch_size=cfg.reward_model_batch_size)
        self.scorer = None if kind == "none" else scorer
        self._math_pool = math_pool

    @property
    def math_pool(self) -> MathVerifyPool:
        if self._math_pool is None:
            self._math_pool = shared_pool(self.cfg.num_workers, self.cfg.math_timeout_s)
        return self._math_pool

    def __call__(self, responses: Sequence[str], records: Sequence[Any],
                 image_hw: Sequence[tuple | None] | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """(rewards float32 [N], stats) for N (response, record) pairs; stats are flat, for logging:
        `<type>/count`, `<type>/mean` (only for types present), `<type>/extract_fail`, `all/count`,
        `all/mean`, `extract_fail` and the REWARD_COUNTERS."""
        n = len(responses)
        if len(records) != n:
            raise ValueError(f"compute_rewards: {n} responses but {len(records)} records")
        if image_hw is not None and len(image_hw) != n:
            raise ValueError(f"compute_rewards: {n} responses but {len(image_hw)} image_hw entries")
        cfg = self.cfg
        types = [canonical_verifier_type(r, i) for i, r in enumerate(records)]
        gts = []
        for i, r in enumerate(records):
            gt = _get(r, "gt", "ground_truth")
            if gt is None or (isinstance(gt, str) and not gt.strip()):
                raise ValueError(f"{_describe(r, i)}: missing ground truth (gt)")
            gts.append(gt)
        answers = []
        for i, (resp, rec) in enumerate(zip(responses, records)):
            if not isinstance(resp, str):
                raise TypeError(f"{_describe(rec, i)}: response must be a str, got {type(resp).__name__}")
            answers.append(extract_answer(resp, cfg.answer_fallback_boxed))
        rewards = np.zeros(n, np.float32)
        counted: dict[str, list[int]] = {key: [] for key in REWARD_COUNTERS}
        math_items, open_items = [], []
        for i, (kind, ans, gt, rec) in enumerate(zip(types, answers, gts, records)):
            if ans is not None and len(ans) > cfg.max_answer_chars:
                counted["answer_too_long"].append(i)  # scores 0 unjudged: no verifier sees it
                continue
            try:
                if kind == "digit":
                    rewards[i] = digit_reward(ans, gt)
                elif kind == "mcq":
                    rewards[i] = mcq_reward(ans, gt, _get(rec, "question"), _get(rec, "options"))
                elif kind == "iou":
                    orig, resized = (image_hw[i] if image_hw is not None and image_hw[i] is not None
                                     else (_get(rec, "original_hw"), _get(rec, "resized_hw")))
                    rewards[i] = iou_reward(ans, gt, original_hw=orig, resized_hw=resized,
                                            pred_frame=cfg.iou_pred_frame, gt_frame=cfg.iou_gt_frame)
                elif ans is not None and kind == "math":
                    math_items.append(i)
                elif ans is not None and kind == "open_ended":
                    open_items.append(i)
            except ValueError as e:
                raise ValueError(f"{_describe(rec, i)} ({kind}): {e}") from e

        math_error = ""
        if math_items:
            for i, res in zip(math_items, self.math_pool.verify([(answers[i], str(gts[i])) for i in math_items])):
                rewards[i] = res.score
                if res.timed_out:
                    counted["math_timeouts"].append(i)
                if res.error is not None:
                    counted["math_errors"].append(i)
                    math_error = math_error or res.error
        if open_items:
            if self.scorer is None:
                counted["open_ended_unscored"] = open_items
            else:
                got = open_ended_rewards([answers[i] for i in open_items], [str(gts[i]) for i in open_items],
                                         [str(_get(records[i], "question", default="")) for i in open_items],
                                         [_get(records[i], "image") for i in open_items],
                                         self.scorer, cfg.open_ended_beta,
                                         prompt_ids=[_get(records[i], "id") for i in open_items],
                                         pixels=[_prompt_image(records[i]) for i in open_items])
                rewards[open_items] = got

        stats: dict[str, float] = {}
        failed = np.array([a is None for a in answers], bool)
        kinds = np.array(types, object)
        for kind in REWARD_TYPES:
            sel = kinds == kind
            stats[f"{kind}/count"] = int(sel.sum())
            stats[f"{kind}/extract_fail"] = int((sel & failed).sum())
            if sel.any():
                stats[f"{kind}/mean"] = float(rewards[sel].mean())
        stats["all/count"] = n
        if n:
            stats["all/mean"] = float(rewards.mean())
        stats["extract_fail"] = int(failed.sum())
        stats.update({key: len(rows) for key, rows in counted.items()})
        self._log_counted(counted, records, math_error)
        return rewards, stats

    def _log_counted(self, counted: Mapping[str, list[int]], records: Sequence[Any], math_error: str) -> None:
        """One warning per counted-zero kind of the batch, naming (the first) records."""
        why = {"answer_too_long": f"answer longer than reward.max_answer_chars={self.cfg.max_answer_chars}",
               "math_timeouts": f"Math-Verify over reward.math_timeout_s={self.cfg.math_timeout_s}s",
               "math_errors": f"Math-Verify error, first: {math_error[:200]}"}
        for key, rows in counted.items():
            if rows and key in why:
                named = ", ".join(_describe(records[i], i) for i in rows[:_LOGGED_IDS])
                more = f" and {len(rows) - _LOGGED_IDS} more" if len(rows) > _LOGGED_IDS else ""
                _LOG.warning("reward: %d answers scored 0 (%s): %s%s", len(rows), why[key], named, more)


def compute_rewards(responses: Sequence[str], records: Sequence[Any],
                    cfg: RewardConfig | Mapping[str, Any] | None = None, *, scorer: Scorer | None = None,
                    math_pool: MathVerifyPool | None = None,
                    image_hw: Sequence[tuple | None] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """One-call form of MixedReward (the Math-Verify pool is shared per process and reused)."""
    return MixedReward(cfg, scorer=scorer, math_pool=math_pool)(responses, records, image_hw)
