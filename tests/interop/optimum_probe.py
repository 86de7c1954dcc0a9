"""Runs inside the Optimum test environment (transformers 4.57, optimum-onnx), never imported by the suite.

Reads a JSON request on stdin and prints a JSON answer on stdout:

* ``{"generate": DEVICE_DIR, "prompts": [...], "max_new_tokens": N, "file_name": "shadow.onnx"}``: loads the
  tokenizer and ``ORTModelForCausalLM`` from the device folder, left-pads the prompts into one batch and
  decodes greedily; answers ``{"tokens": [[ids...] per prompt, cut after the first EOS], "prompt_ids": [[...]],
  "class": tokenizer class}``.
* ``{"logits": MODEL_DIR, "ids": [...]}``: loads the config and a ``LlamaForCausalLM`` (any ``AutoModelForCausalLM``)
  with this transformers; answers ``{"rope_theta": ..., "logits": [[...]]}``.

It imports nothing of shadowpeft: the environment has none of it.
"""

from __future__ import annotations

import json
import sys


def generate(request: dict) -> dict:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    folder = request["generate"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder, file_name=request["file_name"])
    batch = tokenizer(request["prompts"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=request["max_new_tokens"], do_sample=False)
    width = batch["input_ids"].shape[1]
    tokens = []
    for row in out[:, width:].tolist():
        if model.generation_config.eos_token_id in row:
            row = row[: row.index(model.generation_config.eos_token_id) + 1]
        tokens.append(row)
    prompt_ids = tokenizer(request["prompts"])["input_ids"]
    return {"tokens": tokens, "prompt_ids": prompt_ids, "class": type(tokenizer).__name__}


def logits(request: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(request["logits"])
    model = AutoModelForCausalLM.from_pretrained(request["logits"], dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([request["ids"]])).logits[0]
    return {"rope_theta": config.rope_theta, "logits": out.tolist()}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    answer = generate(request) if "generate" in request else logits(request)
    json.dump(answer, sys.stdout)
