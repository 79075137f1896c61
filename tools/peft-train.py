#!/usr/bin/env python3
"""Train a LoRA adapter the common way, PEFT + transformers on the CPU, on examples written by
`agentflux data check --examples`, and report examples per second (tools/train-vs-peft runs it
beside AgentFlux's trainer).

Every example is the whole token sequence, forward and backward (standard LoRA, active on every
token); the loss is the mean cross-entropy of its target tokens, as in `agentflux train`.
Gradients of `--batch` examples are summed before each AdamW step (weight decay 0.01, a constant
learning rate: the schedule does not change the speed measured). Steps take the examples in
order, from the first again after the last (more steps than examples make several epochs).

usage: tools/peft-train.py --model M.gguf --examples E.jsonl [--adapter selector|TOOL]
           [--steps S] [--batch B] [--lr LR] [--rank R] [--alpha A] [--threads T] [--json]
"""
import argparse
import json
import os
import sys
import time

import peft
import torch
import transformers

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--adapter", default="selector")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    with open(a.examples) as f:
        examples = [e for e in map(json.loads, f) if e["adapter"] == a.adapter]
    need = a.steps * a.batch
    if not examples:
        sys.exit(f"{a.examples}: no examples of {a.adapter}")

    base = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(a.model)), gguf_file=os.path.basename(a.model), dtype=torch.float32)
    config = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=MODULES, bias="none")
    model = peft.get_peft_model(base, config)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    t0 = time.perf_counter()
    losses = []
    for step in range(a.steps):
        total = 0.0
        for i in range(step * a.batch, (step + 1) * a.batch):
            e = examples[i % len(examples)]
            ids = torch.tensor([e["tokens"]])
            labels = torch.full_like(ids, -100)
            for start, end in e["targets"]:
                labels[0, start:end] = ids[0, start:end]
            # transformers shifts the labels: position p's logits predict token p + 1.
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total / a.batch)
        if not a.json:
            print(f"step {step + 1}/{a.steps} loss {losses[-1]:.3f}", file=sys.stderr)
    secs = time.perf_counter() - t0
    out = {"examples": need, "seconds": secs, "examples_per_s": need / secs, "losses": losses, "threads": a.threads,
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(json.dumps(out) if a.json else f"{need} examples in {secs:.1f} s: {need / secs:.3f} examples/s")


if __name__ == "__main__":
    main()
