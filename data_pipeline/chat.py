"""Qwen2.5-VL chat formatting and tokenisation of VLAA-Thinking records (SFT and GRPO examples).

The chat template comes from the tokenizer directory (`tokenizer.chat_template`). It is rendered once with
marker strings in place of the question and the response; each record is then a string replacement, and
the single `<|image_pad|>` of the template is expanded in id space to N = t*h*w/4 copies (the same ids
the HF processor produces by expanding the text first). SFT loss masks come from character offsets, so
input_ids are exactly those of tokenising the full conversation text.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from data_pipeline.records import DataError, Record

# System prompt of the released VLAA-Thinker models (authors' inference script).
VLAA_SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a question, "
    "and you should try to solve it. You should first think about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>."
)

_Q, _R = "\x00VLAA_QUESTION\x00", "\x00VLAA_RESPONSE\x00"


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """`transformers.AutoTokenizer` of a checkpoint / processor directory (needs a chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{tokenizer_dir}: tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    return tok


@dataclasses.dataclass
class ChatFormatter:
    """Turns (record, number of image tokens) into token ids, for SFT (with loss mask) or GRPO prompts.

    Attributes:
      tokenizer: a transformers fast tokenizer with the Qwen2.5-VL chat template and special tokens.
      system_prompt: system message; None -> no system message (the template inserts its own default).
    """

    tokenizer: Any
    system_prompt: str | None = VLAA_SYSTEM_PROMPT

    def __post_init__(self):
        tok = self.tokenizer
        self._backend = tok.backend_tokenizer
        self.image_pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start_id = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tok.convert_tokens_to_ids("<|vision_end|>")
        self.im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        msgs = self.messages(_Q)
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": _R}], tokenize=False)
        if prompt.count(_Q) != 1 or full.count(_R) != 1 or not full.startswith(prompt):
            raise ValueError("chat template does not render question/response once each after the prompt")
        if prompt.count("<|image_pad|>") != 1:
            raise ValueError("chat template must render exactly one <|image_pad|> per image")
        self._prompt_template = prompt
        self._answer_template = full[len(prompt):]  # e.g. "{response}<|im_end|>\n"
        # Loss covers the response and the closing <|im_end|> (the model must learn to stop), not what follows.
        end = self._answer_template.index(_R) + len(_R)
        tail = self._answer_template[end:]
        if not tail.startswith("<|im_end|>"):
            raise ValueError("chat template: the assistant turn must end with <|im_end|>")
        self._loss_tail_chars = len("<|im_end|>")

    def messages(self, question: str, image: Any = None) -> list[dict]:
        """HF chat messages of one record: [system], user = [image, question text]."""
        msgs = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        img = {"type": "image"} if image is None else {"type": "image", "image": image}
        msgs.append({"role": "user", "content": [img, {"type": "text", "text": question}]})
        return msgs

    def prompt_text(self, question: str) -> str:
        return self._prompt_template.replace(_Q, question)

    def _expand_image(self, ids: np.ndarray, num_image_tokens: int, where: dict) -> tuple[np.ndarray, int]:
        pos = np.flatnonzero(ids == self.image_pad_id)
        if len(pos) != 1:
            raise DataError(
                f"expected one <|image_pad|> in the rendered prompt, found {len(pos)} (is it in the question text?)",
                kind="bad_field",
                field="question",
                **where,
            )
        p = int(pos[0])
        out = np.concatenate([ids[:p], np.full(num_image_tokens, self.image_pad_id, np.int32), ids[p + 1:]])
        return out, p

    def encode_prompt(self, record: Record, num_image_tokens: int) -> np.ndarray:
        """GRPO: int32 ids of the prompt up to `<|im_start|>assistant\\n`, image pads expanded."""
        where = {"file": record.file, "line": record.line, "record_id": record.id}
        enc = self._backend.encode(self.prompt_text(record.question), add_special_tokens=False)
        ids, _ = self._expand_image(np.asarray(enc.ids, np.int32), num_image_tokens, where)
        return ids

    def encode_sft(self, record: Record, num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """SFT: (int32 ids of the whole conversation, int32 loss mask: 1 on response and its <|im_end|>)."""
        where = {"file": record.file, "line": record.line, "record_id": record.id}
        if not record.response.strip():
            raise DataError("empty response", kind="missing_field", field="answer", **where)
        prompt = self.prompt_text(record.question)
        answer = self._answer_template.replace(_R, record.response)
        enc = self._backend.encode(prompt + answer, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int32)
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids))
        lo = len(prompt)
        hi = lo + len(record.response) + self._loss_tail_chars
        mask = ((starts >= lo) & (starts < hi)).astype(np.int32)
        ids, p = self._expand_image(ids, num_image_tokens, where)
        mask = np.concatenate([mask[:p], np.zeros(num_image_tokens, np.int32), mask[p + 1:]])
        return ids, mask
