"""The parts of the stages that read model replies: chat completions, reasoning traces, judge verdicts,
prompt templates."""
from __future__ import annotations

import json

import pytest

from data_pipeline.construct.client import Reply, parse_reply
from data_pipeline.construct.stages import Template, judge_verdict, split_reasoning


def _body(message: dict, **extra) -> bytes:
    return json.dumps({"choices": [{"message": message, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 3}, **extra}).encode()


def test_parse_reply():
    r = parse_reply(_body({"role": "assistant", "content": "hi", "reasoning_content": "think"}))
    assert (r.content, r.reasoning, r.finish_reason, r.prompt_tokens, r.completion_tokens) == ("hi", "think", "stop", 7, 3)
    assert parse_reply(_body({"content": None, "reasoning": "t"})).reasoning == "t"
    for bad in (b"{", b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}', b"[]"):
        with pytest.raises(ValueError, match="not a chat completion"):
            parse_reply(bad)


@pytest.mark.parametrize("reply, want", [
    (Reply("<think>a b</think>\n<answer>3</answer>"), ("a b", "3")),
    (Reply("<think>a b</think> The answer is 3."), ("a b", "The answer is 3.")),
    (Reply("a b</think><answer>C</answer>"), ("a b", "C")),  # R1 without the opening tag
    (Reply("<answer>7</answer>", reasoning="counted"), ("counted", "7")),  # a server's reasoning parser
    (Reply("<think>a b", finish_reason="length"), "truncated"),
    (Reply("3"), "no_reasoning"),
    (Reply("<think> </think><answer>3</answer>"), "no_reasoning"),
    (Reply("<think>a</think><answer>1</answer><answer>2</answer>"), "no_answer"),
])
def test_split_reasoning(reply, want):
    assert split_reasoning(reply) == want


def test_judge_verdict():
    assert [judge_verdict(t) for t in ("Yes.", " no, because", "**YES**", "Perhaps yes", "")] == \
        [True, False, True, None, None]


def test_templates(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("[system]\nBe brief.\n[user]\nQ: {question} {json: {\"a\": 1}} \\frac{1}{2}\n")
    t = Template.load(p)
    assert t.render(question="x {caption}") == ("Be brief.", 'Q: x {caption} {json: {"a": 1}} \\frac{1}{2}')
    p.write_text("Q: {question} {captoin}")
    with pytest.raises(ValueError, match=r"t.txt: unknown placeholder \{captoin\}; this stage fills \{question\}"):
        Template.load(p).render(question="x")
    p.write_text("[system]\nno user section")
    with pytest.raises(ValueError, match="needs a \\[user\\] line"):
        Template.load(p)
