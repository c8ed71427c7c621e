#!/usr/bin/env python3
"""Short prompts under OmniKV's configured budget, with floors on the rows a
selection keeps (`min_selected_tokens`): for each floor, serve SmolLM2-135M
with configs/smollm2-135m.json plus that floor, send each prompt twice (the
configured selection, and full attention through the request option
{"kv_cache": {"enabled": false}}) and count the greedy answers (24 tokens)
that equal full attention's. Writes results/short-prompt-floor.md.

Run from the repository root after `make build`:
    python3 scripts/short-prompt-floor.py
"""
import json, subprocess, time, urllib.request, platform, os

FLOORS = [0, 32, 64, 128, 256]
COLS = ["red", "blue", "green", "yellow", "black", "white", "purple"]


def records(n, seed):
    return "".join(f"Record {i}: the {COLS[(i + seed) % 7]} box is on shelf {(i * 13 + seed * 7) % 97}. " for i in range(n))


STORY = ("Once upon a time a grey donkey lived on a farm by the river with a brown horse, three white geese "
         "and an old black dog. Every morning the farmer's daughter brought the donkey a basket of carrots. "
         "One day the horse ran away to the hills. ")
PROMPTS = ["What is the capital of Japan?", "What is the capital of France? Answer in one sentence.",
           "Name three primary colours.", STORY + "Question: What colour is the donkey? Answer:",
           STORY + "Question: Where did the horse go? Answer:"]
PROMPTS += [records(n, s) + f"Question: which shelf holds the box of record {n // 2}? Answer briefly."
            for n, s in [(4, 1), (8, 2), (12, 3), (18, 4), (26, 5), (36, 6)]]


def post(port, prompt, full=False):
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": 24}
    if full:
        body["kv_cache"] = {"enabled": False}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=600))
    return r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens"]


def main():
    base = json.load(open("configs/smollm2-135m.json"))
    results = {}
    lengths = []
    for floor in FLOORS:
        cfg = dict(base, min_selected_tokens=floor)
        path = f"target/short-prompt-floor-{floor}.json"
        json.dump(cfg, open(path, "w"))
        port = 18400 + floor
        srv = subprocess.Popen(["target/debug/mistralrs", "serve", "--host", "127.0.0.1", "-p", str(port),
                                "--kv-cache", "omnikv", "--kv-cache-config", path, "--format", "gguf",
                                "-m", "models/smollm2", "-f", "SmolLM2-135M-Instruct.Q4_1.gguf"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                    break
                except Exception:
                    time.sleep(1)
            same, lengths = [], []
            for p in PROMPTS:
                a, n = post(port, p)
                f, _ = post(port, p, full=True)
                same.append(a == f)
                lengths.append(n)
            results[floor] = same
            print(f"floor {floor}: {sum(same)}/{len(same)} equal to full attention", flush=True)
        finally:
            srv.kill()
            srv.wait()
    out = ["# Short prompts: a floor on the selected rows", "",
           "SmolLM2-135M-Instruct Q4_1, `configs/smollm2-135m.json` (budget 0.1, filter layers 2, 8, 18) "
           "plus `min_selected_tokens` = floor; greedy, 24 tokens; a cell is `=` when the answer equals "
           "full attention's on the same server (`{\"kv_cache\": {\"enabled\": false}}`).", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores; build profile dev (optimised dependencies). "
           "Command: `python3 scripts/short-prompt-floor.py`.", "",
           "| prompt tokens | " + " | ".join(f"floor {f}" for f in FLOORS) + " |",
           "|---|" + "---|" * len(FLOORS)]
    for i, n in enumerate(lengths):
        out.append(f"| {n} | " + " | ".join("=" if results[f][i] else "differs" for f in FLOORS) + " |")
    out.append("| **equal to full attention** | " + " | ".join(f"**{sum(results[f])}/{len(PROMPTS)}**" for f in FLOORS) + " |")
    open("results/short-prompt-floor.md", "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
