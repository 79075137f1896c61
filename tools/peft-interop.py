#!/usr/bin/env python3
"""Adapters between AgentFlux and Hugging Face PEFT, both ways, on the same base model: PEFT's
logits for the fixture tests/peft.rs compares AgentFlux's against (tools/peft-interop runs this).

  ours       - the committed selector adapter (trained by `agentflux train`, activated LoRA) loaded
               with peft.PeftModel.from_pretrained on SmolLM2-135M-Instruct (transformers reads the
               GGUF, dequantised to f32);
  peft_made  - an activated LoRA made and saved by PEFT itself (LoraConfig with
               alora_invocation_tokens, init_lora_weights=False so B is not zero) into
               tests/fixtures/peft/peft-made, for AgentFlux to load.

For each case (a user request, the selector's invocation tokens, a tool name) it records the token
ids and the top-5 logits at every position from two before the invocation on, with the adapter
(`adapted`) and without it (`base`). Positions before the invocation must not move: activated LoRA
applies from the start of its invocation sequence.

usage: tools/peft-interop.py --model M.gguf --adapter DIR --out-dir tests/fixtures/peft [--threads T]
"""
import argparse
import hashlib
import json
import os
import shlex
import sys

import peft
import torch
import transformers

REQUESTS = [
    "Show me what is in notes/todo.txt",
    "Which files are in the reports folder, with their sizes?",
    "Rename draft.md to final.md",
]
TOOL = " read_text_file"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top5(row, position):
    v, i = torch.topk(row, 5)
    return {"position": position, "ids": i.tolist(), "logits": [round(x, 5) for x in v.tolist()]}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def records(model, cases, start):
    out = []
    for ids, s in zip(cases, start):
        rows = logits(model, ids)
        out.append([top5(rows[p], p) for p in range(max(0, s - 2), len(ids))])
    return out


def load_base(model_path):
    d, f = os.path.split(model_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True, help="the AgentFlux-trained adapter directory")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(20261204)
    d, f = os.path.split(a.model)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    invocation = json.load(open(os.path.join(a.adapter, "adapter_config.json")))["alora_invocation_tokens"]
    cases, start = [], []
    for r in REQUESTS:
        text = tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False)
        prompt = tok.encode(text, add_special_tokens=False)
        cases.append(prompt + invocation + tok.encode(TOOL, add_special_tokens=False))
        start.append(len(prompt))

    base = load_base(a.model)
    base_rows = records(base, cases, start)
    ours = peft.PeftModel.from_pretrained(base, a.adapter)
    ours_rows = records(ours, cases, start)

    made_dir = os.path.join(a.out_dir, "peft-made")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          alora_invocation_tokens=invocation, task_type="CAUSAL_LM")
    made = peft.get_peft_model(load_base(a.model), cfg)
    made.peft_config["default"].base_model_name_or_path = os.path.basename(a.model)
    made.save_pretrained(made_dir)
    os.remove(os.path.join(made_dir, "README.md"))  # PEFT's model-card template
    made_rows = records(made, cases, start)

    def section(adapter, rows):
        return {"adapter": adapter, "cases": [{"tokens": ids, "activation": s, "base": b, "adapted": r}
                                              for ids, s, b, r in zip(cases, start, base_rows, rows)]}

    fixture = {
        "made_by": shlex.join(["tools/peft-interop.py"] + sys.argv[1:]) +
                   f" ; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                   f"f32 on the CPU",
        "model": os.path.basename(a.model),
        "model_sha256": sha256(a.model),
        "ours": section(a.adapter, ours_rows),
        "peft_made": section(made_dir, made_rows),
    }
    out = os.path.join(a.out_dir, "interop.json")
    with open(out, "w") as fh:
        json.dump(fixture, fh, separators=(",", ":"))
        fh.write("\n")
    print(out)


if __name__ == "__main__":
    main()
