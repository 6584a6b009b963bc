"""Warden's embeddings next to sentence-transformers on this machine, in one run.

Usage (from the workspace root, see docs/performance.md):
    python bench_embeddings.py MODEL_DIR WARDEN_BIN BENCH_EMBEDDINGS_BIN TEXT [rounds]

MODEL_DIR is the all-MiniLM-L6-v2 directory (its parent is Warden's models directory), TEXT
a public-domain English text the inputs are cut from. Needs sentence-transformers 6.2.0 and
torch 2.15.0 (torch on 2 threads). The inputs: one sentence of about 15 tokens, 256 short
sentences (about 13 tokens) and 64 long ones (123 tokens), cut from TEXT by token count with
the model's own tokenizer. In-process figures alternate sentence-transformers and Warden for
`rounds` rounds and report medians; over HTTP, Warden runs with its three policy plugins
(key auth, the PII sanitizer, the metrics policy) in the path.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchlib import free_port, wait_ready
import torch
from sentence_transformers import SentenceTransformer

MODEL_DIR, WARDEN, BENCH_EMBEDDINGS, TEXT = sys.argv[1:5]
ROUNDS = int(sys.argv[5]) if len(sys.argv) > 5 else 3
THREADS = 2
ONE_RUNS = 50
KEY = "bench-key"
MODEL = "all-MiniLM-L6-v2"


def cut(words, tokenizer, start, tokens):
    """The shortest run of words from `start` whose encoding (with [CLS] and [SEP]) has at
    least `tokens` tokens, and the index after it."""
    end = start + 1
    while len(tokenizer(" ".join(words[start:end]))["input_ids"]) < tokens:
        end += 1
    return " ".join(words[start:end]), end


def inputs(tokenizer):
    words = open(TEXT, encoding="utf-8").read().split()
    out = {"one": None, "short": [], "long": []}
    at = 0
    out["one"], at = cut(words, tokenizer, at, 15)
    for kind, count, tokens in (("short", 256, 13), ("long", 64, 123)):
        for _ in range(count):
            if at + 200 > len(words):
                at = 0
            text, at = cut(words, tokenizer, at, tokens)
            out[kind].append(text)
    return out


def st_figures(model, data):
    out = {}
    model.encode([data["one"]])
    times = []
    for _ in range(ONE_RUNS):
        t = time.perf_counter()
        model.encode([data["one"]])
        times.append(time.perf_counter() - t)
    out["one"] = statistics.median(times)
    for kind, batch in (("short", 32), ("long", 16)):
        t = time.perf_counter()
        model.encode(data[kind], batch_size=batch)
        out[kind] = time.perf_counter() - t
    # Called one sentence at a time, as a server without batching would.
    t = time.perf_counter()
    for s in data["short"][:64]:
        model.encode([s])
    out["one_at_a_time"] = 64 / (time.perf_counter() - t)
    return out


def warden_figures(path):
    res = subprocess.run([BENCH_EMBEDDINGS, MODEL_DIR, path], check=True, capture_output=True,
                         text=True)
    return {(d := json.loads(line))["figure"]: d["seconds"] for line in res.stdout.splitlines()}


class Client:
    """One keep-alive connection: the server's time, not a client library's."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def embed(self, texts):
        body = json.dumps({"model": MODEL, "input": texts})
        self.conn.request("POST", "/v1/embeddings", body=body,
                          headers={"Authorization": f"Bearer {KEY}",
                                   "Content-Type": "application/json"})
        r = self.conn.getresponse()
        payload = r.read()
        if r.status != 200:
            raise SystemExit(f"embeddings: {r.status} {payload[:200]!r}")
        return [d["embedding"] for d in json.loads(payload)["data"]]


def http_figures(port, data):
    out = {}
    c = Client(port)
    c.embed([data["one"]])
    times = []
    for _ in range(ONE_RUNS):
        t = time.perf_counter()
        c.embed([data["one"]])
        times.append(time.perf_counter() - t)
    out["one"] = statistics.median(times)
    t = time.perf_counter()
    c.embed(["hi"])
    out["hi"] = time.perf_counter() - t
    for kind, batch in (("short", 32), ("long", 16)):
        t = time.perf_counter()
        for i in range(0, len(data[kind]), batch):
            c.embed(data[kind][i:i + batch])
        out[kind] = time.perf_counter() - t
    # 8 concurrent clients, one sentence per request.
    latencies, lock = [], threading.Lock()

    def client_loop(offset):
        me = Client(port)
        for i in range(32):
            s = data["short"][(offset * 32 + i) % len(data["short"])]
            t = time.perf_counter()
            me.embed([s])
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    out["clients_8_per_s"] = len(latencies) / wall
    lat = sorted(latencies)
    out["clients_8_p50_ms"] = statistics.median(lat) * 1000
    out["clients_8_p99_ms"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
    out["vectors"] = c.embed(data["short"][:32])
    return out


def main():
    torch.set_num_threads(THREADS)
    model = SentenceTransformer(MODEL_DIR, device="cpu")
    data = inputs(model.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.json")
        with open(path, "w") as f:
            json.dump(data, f)
        peer, ours = [], []
        for _ in range(ROUNDS):
            peer.append(st_figures(model, data))
            ours.append(warden_figures(path))
        reference = model.encode(data["short"][:32], normalize_embeddings=True)

        port = free_port()
        env = dict(os.environ, WARDEN_LISTEN=f"127.0.0.1:{port}", WARDEN_API_KEY=KEY,
                   WARDEN_MODELS_DIR=os.path.dirname(os.path.abspath(MODEL_DIR)), RUST_LOG="warn")
        proc = subprocess.Popen([WARDEN, "serve"], env=env, cwd=os.getcwd(),
                                stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(tmp, "log"), "w"))
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready")
            web = http_figures(port, data)
        finally:
            proc.terminate()
            proc.wait()

    got = np.array(web.pop("vectors"), dtype=np.float64)
    cosines = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))

    def median(runs, fig):
        return statistics.median(r[fig] for r in runs)

    n = {"short": 256, "long": 64}
    st_one = median(peer, "one")
    print("| figure | Warden | sentence-transformers (torch, 2 threads) | Warden / sentence-transformers |")
    print("|---|---|---|---|")
    w = median(ours, "one")
    print(f"| one sentence, in-process (ms) | {w * 1e3:.2f} | {st_one * 1e3:.2f} | {w / st_one:.2f} (latency) |")
    print(f"| one sentence, HTTP with plugins (ms) | {web['one'] * 1e3:.2f} | {st_one * 1e3:.2f} (in-process) "
          f"| {web['one'] / st_one:.2f} (latency) |")
    print(f"| the word `hi`, HTTP with plugins (ms) | {web['hi'] * 1e3:.2f} | | |")
    for kind, label in (("short", "256 short sentences, batches of 32"),
                        ("long", "64 long sentences (123 tokens), batches of 16")):
        w, p = n[kind] / median(ours, kind), n[kind] / median(peer, kind)
        print(f"| {label}, in-process (sentences/s) | {w:.0f} | {p:.0f} | {w / p:.2f} |")
        h = n[kind] / web[kind]
        print(f"| {label}, HTTP with plugins (sentences/s) | {h:.0f} | {p:.0f} (in-process) | {h / p:.2f} |")
    p = median(peer, "one_at_a_time")
    print(f"| 8 HTTP clients, one sentence each (sentences/s) | {web['clients_8_per_s']:.0f} "
          f"| {p:.0f} (in-process, one at a time) | {web['clients_8_per_s'] / p:.2f} |")
    print(f"| 8 HTTP clients, request latency p50 / p99 (ms) | {web['clients_8_p50_ms']:.1f} / "
          f"{web['clients_8_p99_ms']:.1f} | | |")
    print(f"\nCosine of Warden's vectors (HTTP) against sentence-transformers' on 32 short inputs: "
          f"min {cosines.min():.6f}, mean {cosines.mean():.6f}")


if __name__ == "__main__":
    main()
