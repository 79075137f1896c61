"""Clients of `agentflux serve` for tools/bench-serve: an agent framework's 3-step filesystem
conversation over the OpenAI API (a tool call, its result, the next call, its result, the next
call; streamed, tool_choice required, the filesystem server's own tool list), the whole
conversation sent on every step. The tool results are fixed strings, so every server sees the
same conversations.

  python3 tools/bench_serve.py steps PORT LABEL REPS       one conversation, a table row per step
  python3 tools/bench_serve.py clients PORT LABEL N        N conversations at once (N=1: one at a
                                                           time), one row of totals
"""
import json
import subprocess
import sys
import threading
import time
import urllib.request

RESULTS = ["[FILE] notes.txt\n[FILE] todo.txt\n[DIR] drafts", "buy milk\nwater the plants"]
QUESTIONS = [
    "What is in /tmp/ws, and what does todo.txt say?",
    "List /tmp/notes and read the first file.",
    "Show me the folders in /tmp/projects and what plan.md holds.",
    "What files are in /tmp/docs? Open the readme.",
    "Look in /tmp/inbox and read the newest message.",
    "What is inside /tmp/music? Read playlist.txt.",
    "Check /tmp/recipes and show me soup.txt.",
    "What does /tmp/work contain, and what is in tasks.txt?",
]


def list_tools(command):
    """The filesystem MCP server's own tool list, as OpenAI `tools`."""
    p = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def rpc(i, method, params):
        p.stdin.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}) + "\n")
        p.stdin.flush()
        while True:
            msg = json.loads(p.stdout.readline())
            if msg.get("id") == i:
                return msg["result"]

    rpc(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench-serve", "version": "0"}})
    p.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
    p.stdin.flush()
    tools = rpc(2, "tools/list", {})["tools"]
    p.kill()
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""), "parameters": t["inputSchema"]}} for t in tools]


def post(port, tools, messages):
    """One streamed step: the tool's name and arguments, the usage, the time to the first piece
    (the tool's name) and to the end."""
    body = json.dumps({"messages": messages, "tools": tools, "tool_choice": "required", "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0, first, name, args, usage = time.time(), None, "", "", None
    for line in urllib.request.urlopen(req, timeout=1200):
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            for tc in delta.get("tool_calls", []):
                first = first or time.time() - t0
                name += tc["function"].get("name") or ""
                args += tc["function"].get("arguments") or ""
            if delta.get("content"):
                first = first or time.time() - t0
    return name, args, usage, first, time.time() - t0


def conversation(port, tools, question, on_step):
    messages = [{"role": "user", "content": question}]
    for step in range(3):
        name, args, usage, first, total = post(port, tools, messages)
        on_step(step, name, usage, first, total)
        call_id = f"call_{step}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": RESULTS[step % len(RESULTS)]})


def metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    return {line.split()[0]: int(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def steps(port, label, reps, tools):
    for rep in range(reps):
        def row(step, name, usage, first, total):
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            print(f"| {label} | {rep + 1} | {step + 1} | {name} | {usage['prompt_tokens']} | {usage['prompt_tokens'] - cached} | {cached} | {first:.2f} | {total:.2f} |", flush=True)
        conversation(port, tools, QUESTIONS[0], row)


def clients(port, label, n, tools):
    """n conversations at once (n = 1 with label `one at a time` runs all of QUESTIONS' first
    `count` one after another instead); prints one row: conversations, steps, wall time, steps per
    minute, mean time to the first piece, and the server's pass counters."""
    count = n if n > 0 else -n
    firsts, lock = [], threading.Lock()

    def record(step, name, usage, first, total):
        with lock:
            firsts.append(first)

    before = metrics(port)
    t0 = time.time()
    if n > 0:
        threads = [threading.Thread(target=conversation, args=(port, tools, QUESTIONS[i % len(QUESTIONS)], record)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(count):
            conversation(port, tools, QUESTIONS[i % len(QUESTIONS)], record)
    wall = time.time() - t0
    after = metrics(port)
    d = {k: after[k] - before.get(k, 0) for k in after}
    passes = max(d["agentflux_passes_total"], 1)
    print(f"| {label} | {count} | {len(firsts)} | {wall:.1f} | {60 * len(firsts) / wall:.2f} | {sum(firsts) / len(firsts):.2f} | "
          f"{d['agentflux_passes_total']} | {d['agentflux_pass_sequences_total'] / passes:.2f} | {after['agentflux_widest_pass_sequences']} | "
          f"{d['agentflux_shared_passes_total']} | {d['agentflux_mixed_adapter_passes_total']} |", flush=True)


if __name__ == "__main__":
    mode, port, label, arg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tools = list_tools(["tools/mcp/node_modules/.bin/mcp-server-filesystem", "/tmp"])
    {"steps": steps, "clients": clients}[mode](port, label, arg, tools)
