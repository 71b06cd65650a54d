"""Qwen2.5-VL chat formatting and tokenisation of VLAA-Thinking records (SFT and GRPO examples).

The chat template comes from the tokenizer directory (`tokenizer.chat_template`). It is rendered once with
marker strings in place of the question and the response; each record is then a string replacement, and
the single `<|image_pad|>` of the template is expanded in id space to N = t*h*w/4 copies (the same ids
the HF processor produces by expanding the text first). SFT loss masks come from character offsets, so
input_ids are exactly those of tokenising the full conversation text.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from data_pipeline.image import PROCESSOR_CONFIG, read_processor_config, update_processor_config
from data_pipeline.records import DataError, Record
from data_pipeline.tokenizer import pad_id, token_id

# System prompt of the released VLAA-Thinker models (authors' inference script).
VLAA_SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a question, "
    "and you should try to solve it. You should first think about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>."
)

# Config names of system prompts (data.system_prompt, eval.system_prompt, tools' --system_prompt).
SYSTEM_PROMPTS = {"vlaa": VLAA_SYSTEM_PROMPT, "default": None}


def system_prompt_of(name: str) -> str | None:
    """A configured system prompt: "vlaa" -> the VLAA-Thinker prompt (the paper's); "default" -> none of
    ours (the chat template's own, Qwen's "You are a helpful assistant."); any other text is the prompt."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"system prompt {name!r}: give 'vlaa', 'default' or the prompt's text")
    return SYSTEM_PROMPTS.get(name, name)


TRAINED_SYSTEM_PROMPT_KEY = "vlaa_jax_system_prompt"  # the data.system_prompt a vlaa-jax trainer trained with


def trained_system_prompt(model_dir: str) -> str | None:
    """The system prompt name (or text) a vlaa-jax export records in its processor config; None for any
    other directory."""
    name = (read_processor_config(model_dir) or {}).get(TRAINED_SYSTEM_PROMPT_KEY)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"{os.path.join(model_dir, PROCESSOR_CONFIG)}: {TRAINED_SYSTEM_PROMPT_KEY} must be "
                         f"'vlaa', 'default' or a prompt's text, got {name!r}")
    return name


def write_trained_system_prompt(model_dir: str, name: str) -> None:
    """Records the system prompt a model was trained with, so generation and evaluation prompt it alike."""
    system_prompt_of(name)  # a valid name
    update_processor_config(model_dir, {TRAINED_SYSTEM_PROMPT_KEY: name})


def resolve_system_prompt(model_dir: str, name: str = "") -> str:
    """The system prompt to generate with: `name` if given, else what the model directory records (a
    vlaa-jax trained model: its training prompt), else the paper's "vlaa". One rule for mode=eval and tools."""
    return name or trained_system_prompt(model_dir) or "vlaa"


_Q, _R = "\x00VLAA_QUESTION\x00", "\x00VLAA_RESPONSE\x00"


def _messages(system_prompt: str | None, question: str, image: Any = None) -> list[dict]:
    msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    img = {"type": "image"} if image is None else {"type": "image", "image": image}
    msgs.append({"role": "user", "content": [img, {"type": "text", "text": question}]})
    return msgs


_BACKEND_LOCK = threading.Lock()
_BACKENDS: dict[str, Any] = {}


def _load_backend(tokenizer_dir: str):
    """The `tokenizers.Tokenizer` of `tokenizer_dir/tokenizer.json`, cached per process."""
    if tokenizer_dir not in _BACKENDS:
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (a fast tokenizer file is needed)")
        _BACKENDS[tokenizer_dir] = Tokenizer.from_file(path)
    return _BACKENDS[tokenizer_dir]


def _added_tokens(tok_json: Path) -> list[dict]:
    """`added_tokens` of a tokenizer.json. They come first in the file: decode just them when possible
    (the whole file is ~18 MB of vocabulary and merges)."""
    with open(tok_json, encoding="utf-8") as f:
        head = f.read(1 << 18)
    key = head.find('"added_tokens"')
    if key >= 0:
        start = head.find("[", key)
        try:
            return json.JSONDecoder().raw_decode(head, start)[0]
        except json.JSONDecodeError:
            pass  # longer than the head: read everything
    return json.loads(tok_json.read_text(encoding="utf-8")).get("added_tokens", [])


class _TokenizerFiles:
    """Chat template and added-token ids of a tokenizer directory, read without a transformers tokenizer
    (seconds to load in every Grain worker). Answers HF's `convert_tokens_to_ids`, so the id rules of
    data_pipeline.tokenizer (`token_id`, `pad_id`) read both.

    The template is rendered like transformers does (sandboxed Jinja2, trim_blocks, lstrip_blocks,
    loopcontrols, raise_exception, tojson); tests compare the result with `apply_chat_template`.
    """

    def __init__(self, tokenizer_dir: str):
        d = Path(tokenizer_dir)
        tok_json = d / "tokenizer.json"
        if not tok_json.is_file():
            raise FileNotFoundError(f"{tok_json} not found (a fast tokenizer file is needed)")
        cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
        elif (d / "chat_template.json").is_file():
            template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
        if not template:
            raise ValueError(f"{tokenizer_dir}: no chat template (chat_template.jinja / tokenizer_config.json)")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(template)
        self._ids = {t["content"]: t["id"] for t in _added_tokens(tok_json)}
        self.added_tokens = tuple(self._ids)
        self._special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                         if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.name_or_path = os.fspath(tok_json)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """Id of an added token, None for any other (the special tokens are all added ones)."""
        return self._ids.get(token)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special)


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """`transformers.AutoTokenizer` of a checkpoint / processor directory (needs a chat template)."""
    tok = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{tokenizer_dir}: tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    return tok


@dataclasses.dataclass
class ChatFormatter:
    """Turns (record, number of image tokens) into token ids, for SFT (with loss mask) or GRPO prompts.

    Build with `ChatFormatter.create(tokenizer_dir, system_prompt)`: the chat template is rendered once
    with the HF tokenizer; encoding then uses only the Rust `tokenizers.Tokenizer` of `tokenizer.json`,
    which loads in well under a second in each Grain worker (AutoTokenizer takes seconds) and is what
    the HF tokenizer runs underneath (checked at creation). Picklable.
    """

    tokenizer_dir: str
    system_prompt: str | None
    prompt_template: str  # rendered prompt with the question marker, ends with "<|im_start|>assistant\n"
    answer_template: str  # assistant turn with the response marker, e.g. "{R}<|im_end|>\n"
    image_pad_id: int
    vision_start_id: int
    vision_end_id: int
    im_end_id: int
    pad_id: int
    added_tokens: tuple[str, ...] = ()  # every added token: the tokenizer never merges text across them

    @classmethod
    def create(cls, tokenizer_dir: str | os.PathLike, system_prompt: str | None = VLAA_SYSTEM_PROMPT,
               tokenizer: Any = None) -> "ChatFormatter":
        """Read the chat template and special ids from `tokenizer_dir` (no transformers tokenizer: fast in
        every process); with an HF `tokenizer`, render through its `apply_chat_template` instead."""
        tokenizer_dir = os.fspath(tokenizer_dir)
        msgs = _messages(system_prompt, _Q)
        full_msgs = msgs + [{"role": "assistant", "content": _R}]
        if tokenizer is not None:
            prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(full_msgs, tokenize=False)
            added = tuple(tokenizer.get_added_vocab())
            source = tokenizer
        else:
            source = _TokenizerFiles(tokenizer_dir)
            prompt = source.render(msgs, add_generation_prompt=True)
            full = source.render(full_msgs, add_generation_prompt=False)
            added = tuple(source.added_tokens)
        if prompt.count(_Q) != 1 or full.count(_R) != 1 or not full.startswith(prompt):
            raise ValueError(f"{tokenizer_dir}: chat template does not render question/response once each")
        if prompt.count("<|image_pad|>") != 1:
            raise ValueError(f"{tokenizer_dir}: chat template must render one <|image_pad|> per image")
        answer = full[len(prompt):]
        if not answer[answer.index(_R) + len(_R):].startswith("<|im_end|>"):
            raise ValueError(f"{tokenizer_dir}: the assistant turn of the chat template must end with <|im_end|>")
        ids = functools.partial(token_id, source)
        return cls(tokenizer_dir, system_prompt, prompt, answer, ids("<|image_pad|>"), ids("<|vision_start|>"),
                   ids("<|vision_end|>"), ids("<|im_end|>"), pad_id(source), tuple(sorted(added)))

    @property
    def backend(self):
        """The Rust tokenizer (loaded lazily, once per process)."""
        b = self.__dict__.get("_backend")
        if b is None:
            with _BACKEND_LOCK:  # Grain read threads: load once per process (an 18 MB JSON, ~1-2 s)
                b = self.__dict__.get("_backend") or _load_backend(self.tokenizer_dir)
                self.__dict__["_backend"] = b
        return b

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_backend", "_plans")}

    def _plan(self, template: str) -> list[tuple[str, Any]]:
        """`template` cut at added tokens into ("static", ids) runs and ("dyn", text with a marker) pieces.

        Tokenizers split text at added tokens before normalising and pre-tokenising, so encoding the
        pieces separately gives exactly the ids of the whole text, and the long static parts (system
        prompt, chat markup) are encoded once instead of per example.
        """
        plans = self.__dict__.setdefault("_plans", {})
        if template not in plans:
            pattern = "(" + "|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True)) + ")"
            parts = re.split(pattern, template) if self.added_tokens else [template]
            plan, static = [], ""
            for i, part in enumerate(parts):
                if i % 2 == 0 and (_Q in part or _R in part):
                    if static:
                        plan.append(("static", static))
                    plan.append(("dyn", part))
                    static = ""
                else:
                    static += part
            if static:
                plan.append(("static", static))
            plans[template] = [(k, self._encode_static(v) if k == "static" else v) for k, v in plan]
        return plans[template]

    def _encode_static(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, np.int32)

    def _encode(self, template: str, question: str, response: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss mask) of `template` with the markers replaced; mask = response + the <|im_end|> after it."""
        ids, mask = [], []
        after_response = False
        for kind, v in self._plan(template):
            if kind == "static":
                ids.append(v)
                m = np.zeros(len(v), np.int32)
                if after_response and len(v) and v[0] == self.im_end_id:
                    m[0] = 1
                mask.append(m)
                after_response = False
                continue
            text = v.replace(_Q, question)
            enc = self.backend.encode(text.replace(_R, response or ""), add_special_tokens=False)
            piece = np.asarray(enc.ids, np.int32)
            m = np.zeros(len(piece), np.int32)
            if _R in text:
                r0 = text.index(_R)
                starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(piece))
                m[(starts >= r0) & (starts < r0 + len(response))] = 1
                after_response = True
            ids.append(piece)
            mask.append(m)
        return np.concatenate(ids), np.concatenate(mask)

    def messages(self, question: str, image: Any = None) -> list[dict]:
        """HF chat messages of one record: [system], user = [image, question text]."""
        return _messages(self.system_prompt, question, image)

    def prompt_text(self, question: str) -> str:
        return self.prompt_template.replace(_Q, question)

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
        """GRPO: int32 ids of the prompt up to `<|im_start|>assistant\n`, image pads expanded."""
        where = {"file": record.file, "line": record.line, "record_id": record.id}
        ids, _ = self._encode(self.prompt_template, record.question, None)
        ids, _ = self._expand_image(ids, num_image_tokens, where)
        return ids

    def encode_sft(self, record: Record, num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """SFT: (int32 ids of the whole conversation, int32 loss mask: 1 on response and its <|im_end|>)."""
        where = {"file": record.file, "line": record.line, "record_id": record.id}
        if not record.response.strip():
            raise DataError("empty response", kind="missing_field", field="answer", **where)
        ids, mask = self._encode(self.prompt_template + self.answer_template, record.question, record.response)
        ids, p = self._expand_image(ids, num_image_tokens, where)
        mask = np.concatenate([mask[:p], np.zeros(num_image_tokens, np.int32), mask[p + 1:]])
        return ids, mask


@functools.lru_cache(maxsize=8)
def _template_files(tokenizer_dir: str) -> _TokenizerFiles:
    return _TokenizerFiles(tokenizer_dir)


def encode_messages(tokenizer_dir: str | os.PathLike, messages: list[dict], image_tokens: list[int]) -> np.ndarray:
    """int32 prompt ids of a whole chat (HF messages: role system / user / assistant, content a string or
    a list of {"type": "text", "text"} / {"type": "image"} parts), rendered with the directory's chat
    template up to the assistant's turn; the i-th image's <|image_pad|> is expanded to image_tokens[i]."""
    tokenizer_dir = os.fspath(tokenizer_dir)
    files = _template_files(tokenizer_dir)
    text = files.render(messages, add_generation_prompt=True)
    ids = np.asarray(_load_backend(tokenizer_dir).encode(text, add_special_tokens=False).ids, np.int32)
    pad = token_id(files, "<|image_pad|>")
    pos = np.flatnonzero(ids == pad)
    if len(pos) != len(image_tokens):
        raise ValueError(f"the chat renders {len(pos)} <|image_pad|> for {len(image_tokens)} images (is "
                         "<|image_pad|> in a message's text?)")
    pieces, last = [], 0
    for p, n in zip(pos, image_tokens):
        pieces += [ids[last:p], np.full(int(n), pad, np.int32)]
        last = p + 1
    return np.concatenate(pieces + [ids[last:]])
