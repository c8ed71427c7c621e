#!/usr/bin/env python3
"""Prefill time of two `mistralrs` binaries side by side (A/B), on the same
2,162-token chat prompts (different per request, prefix cache off), rounds
alternating between the two servers; prints per-round medians and the ratio.

    python3 scripts/prefill-ab.py OLD_BINARY NEW_BINARY [--rounds 3]

Each request has max_tokens 1, so its wall time is the prompt pass plus one
step. Serves SmolLM2-135M (make prepare) with --kv-cache omnikv and
configs/smollm2-135m.json.
"""
import json, statistics, subprocess, sys, time, urllib.request

COLS = ["red", "blue", "green", "yellow", "black", "white", "purple"]


def prompt(seed):
    return "".join(f"Record {i}: the {COLS[(i + seed) % 7]} box is on shelf {(i * 13 + seed) % 97}. "
                   for i in range(140)) + "Question: which shelf holds the box of record 7? Answer briefly."


def start(binary, port):
    p = subprocess.Popen([binary, "serve", "--host", "127.0.0.1", "-p", str(port), "--prefix-cache-n", "0",
                          "--kv-cache", "omnikv", "--kv-cache-config", "configs/smollm2-135m.json",
                          "--format", "gguf", "-m", "models/smollm2", "-f", "SmolLM2-135M-Instruct.Q4_1.gguf"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return p
        except Exception:
            time.sleep(1)
    raise SystemExit(f"{binary} did not start")


def round_times(port):
    out = []
    for seed in range(4):
        body = {"model": "default", "messages": [{"role": "user", "content": prompt(seed)}],
                "temperature": 0, "max_tokens": 1}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t = time.time()
        json.load(urllib.request.urlopen(req, timeout=900))
        out.append(time.time() - t)
    return statistics.median(out)


def main():
    a, b = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    sa, sb = start(a, 18501), start(b, 18502)
    try:
        ma, mb = [], []
        for r in range(rounds):
            ma.append(round_times(18501))
            mb.append(round_times(18502))
            print(f"round {r}: A {ma[-1]:.2f} s, B {mb[-1]:.2f} s", flush=True)
        print(f"median A {statistics.median(ma):.2f} s, B {statistics.median(mb):.2f} s, "
              f"B/A {statistics.median(mb) / statistics.median(ma):.3f}")
    finally:
        sa.kill()
        sb.kill()


if __name__ == "__main__":
    main()
