"""VLAA-Thinking-style data for your own images: the paper's six-step construction pipeline over any
OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs, tools/serve.py).

    python -m data_pipeline.construct --config configs/construct.py:<preset> --out DIR [--stages caption,distill]

1. metadata  read (image, question, ground truth, source, verifier type) records from a JSON / JSON Lines
             file, or a CSV beside a folder of images; validate (errors name file, line, record, key); ids
2. caption   a vision-language model describes each image in detail
3. distill   a reasoning model (text only, as R1) answers from caption + question: a <think> trace + answer
4. rewrite   the trace is retold as seen in the image ("the caption says" -> what one sees), fluently;
             the answer is kept
5. verify    the answer against the ground truth: the rule verifiers of vlaa_jax.rewards (digit, mcq,
             math, iou), an LLM judge for open-ended; each dropped record keeps its reason
6. split     SFT and RL (GRPO) sets per source (the paper's per-source counts an optional target), in
             the released layout (data_pipeline.release), which data_pipeline's loader reads as it is

Each stage has its prompt template under templates/ (templates/README.md: the format and placeholders),
its model in the config, and its outputs and report in DIR (pipeline.py); every reply is cached
(client.py), so a rerun pays only for what is new or changed.
"""
