"""Warden next to llama.cpp on this machine, in one run: prefill and decode in-process, and
chat through each one's OpenAI-compatible HTTP server.

Usage (from the workspace root, see docs/performance.md):
    python bench_generation.py MODEL.gguf WARDEN_BIN BENCH_TEXT_BIN LLAMA_SERVER_BIN [rounds]

Needs llama-cpp-python==0.3.36 built with CMAKE_ARGS=-DGGML_NATIVE=ON (in-process peer),
llama.cpp's own llama-server from the same release (tests/bench/build_llama_cpp.sh; the HTTP
peer) and openai.
In-process figures alternate A/B for `rounds` rounds (each a warm-up plus 5 timed runs) and
report medians; HTTP figures are medians of 5 requests after a warm-up, or one timed burst.
"""
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
from llama_cpp import Llama

MODEL, WARDEN, BENCH_TEXT, LLAMA_SERVER = sys.argv[1:5]
ROUNDS = int(sys.argv[5]) if len(sys.argv) > 5 else 3
THREADS = 2
RUNS = 5


def prompt(n):
    """The same deterministic token ids as host/examples/bench_text.rs."""
    return [1000 + (i * 7919) % 30000 for i in range(n)]


def llama_figures(llm):
    out = {}
    for n in (64, 512, 2048):  # 2048 in batches of n_batch = 512
        times = []
        for run in range(RUNS + 1):
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompt(n))
            if run:
                times.append(time.perf_counter() - t)
        out[f"prefill_{n}"] = statistics.median(times)
    times = []
    for run in range(RUNS + 1):
        llm.reset()
        llm.eval(prompt(16))
        t = time.perf_counter()
        for _ in range(128):
            logits = np.ctypeslib.as_array(
                __import__("llama_cpp").llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        if run:
            times.append(time.perf_counter() - t)
    out["decode_128"] = statistics.median(times)
    return out


def warden_figures():
    res = subprocess.run([BENCH_TEXT, MODEL, str(RUNS)], check=True, capture_output=True, text=True)
    return {(d := json.loads(line))["figure"]: d["seconds"] for line in res.stdout.splitlines()}


def chat_figures(base, key, model, extra):
    """One server's HTTP figures: one client's chat latency (max_tokens 64), time to first
    token of a 512-token prompt (streamed, no prompt cache), and aggregate tokens/s with 1,
    8 and 32 concurrent clients with request latency p50/p99 at 8."""
    import openai

    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]

    def one():
        t = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=64, extra_body=extra)
        return time.perf_counter() - t, r.usage.completion_tokens

    one()
    runs = [one() for _ in range(RUNS)]
    out = {"chat_64_latency_ms": statistics.median(t for t, _ in runs) * 1000,
           "chat_64_tokens": statistics.median(n for _, n in runs)}

    def first_token():
        t = time.perf_counter()
        stream = client.completions.create(model=model, prompt=prompt(512), max_tokens=4,
                                           temperature=0, stream=True, extra_body=extra)
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t
        return first if first is not None else time.perf_counter() - t

    first_token()
    out["ttft_512_ms"] = statistics.median(first_token() for _ in range(RUNS)) * 1000

    for clients in (1, 8, 32):
        results = []
        lock = threading.Lock()

        def client_loop():
            for _ in range(2):
                r = one()
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        out[f"clients_{clients}_tok_per_s"] = sum(n for _, n in results) / wall
        if clients == 8:
            lat = sorted(t for t, _ in results)
            out["clients_8_p50_ms"] = statistics.median(lat) * 1000
            out["clients_8_p99_ms"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
    return out


def http_figures():
    out = {}
    # Warden.
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, WARDEN_LISTEN=f"127.0.0.1:{port}", WARDEN_API_KEY="bench-key",
                   WARDEN_MODELS_DIR=os.path.dirname(os.path.abspath(MODEL)),
                   WARDEN_TEXT_MODEL=os.path.basename(MODEL), RUST_LOG="warn",
                   # Like llama-server's `cache_prompt: false`: every request prefills its
                   # whole prompt, so the time to first token compares the engines.
                   WARDEN_PREFIX_CACHE_TOKENS="0")
        proc = subprocess.Popen([WARDEN, "serve"], env=env, cwd=os.getcwd(),
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "log"), "w"))
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready")
            out["warden"] = chat_figures(f"http://127.0.0.1:{port}/v1", "bench-key",
                                         "SmolLM2-135M-Instruct", None)
        finally:
            proc.terminate()
            proc.wait()
    # llama.cpp's own C++ server, as an operator would run it: 8 slots of 2,048 tokens,
    # continuous batching; the prompt cache off per request, so every prompt is prefilled.
    port = free_port()
    proc = subprocess.Popen([LLAMA_SERVER, "-m", MODEL, "-t", str(THREADS), "-tb", str(THREADS),
                             "-np", "8", "--cont-batching", "-c", str(8 * 2048),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health")
        out["llama.cpp"] = chat_figures(f"http://127.0.0.1:{port}/v1", "none", "x",
                                        {"cache_prompt": False})
    finally:
        proc.terminate()
        proc.wait()
    return out


def main():
    llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=512, verbose=False)
    peer, ours = [], []
    for _ in range(ROUNDS):
        peer.append(llama_figures(llm))
        ours.append(warden_figures())
    del llm

    def median(runs, fig):
        return statistics.median(r[fig] for r in runs)

    print("| figure | Warden | llama.cpp (in-process: llama-cpp-python; HTTP: llama-server -np 8) | Warden / llama.cpp |")
    print("|---|---|---|---|")
    for fig, tokens in (("prefill_64", 64), ("prefill_512", 512), ("decode_128", 128)):
        w, p = tokens / median(ours, fig), tokens / median(peer, fig)
        print(f"| {fig} (tok/s, in-process) | {w:.0f} | {p:.0f} | {w / p:.2f} |")
    for batch in (4, 8):
        fig = f"decode_128_batch_{batch}"
        w, p = 128 * batch / median(ours, fig), 128 / median(peer, "decode_128")
        print(f"| {fig} (aggregate tok/s, in-process; peer: one stream) | {w:.0f} | {p:.0f} | {w / p:.2f} |")
    http = http_figures()
    w, p = http["warden"], http["llama.cpp"]
    print(f"| chat, max_tokens 64, one client (ms/request) | {w['chat_64_latency_ms']:.0f} "
          f"({w['chat_64_tokens']:.0f} tokens) | {p['chat_64_latency_ms']:.0f} ({p['chat_64_tokens']:.0f} tokens) "
          f"| {w['chat_64_latency_ms'] / p['chat_64_latency_ms']:.2f} (latency) |")
    print(f"| time to first token, 512-token prompt (ms) | {w['ttft_512_ms']:.0f} | {p['ttft_512_ms']:.0f} "
          f"| {w['ttft_512_ms'] / p['ttft_512_ms']:.2f} (latency) |")
    for clients in (1, 8, 32):
        fig = f"clients_{clients}_tok_per_s"
        print(f"| chat, {clients} concurrent clients (aggregate tok/s) | {w[fig]:.0f} | {p[fig]:.0f} "
              f"| {w[fig] / p[fig]:.2f} |")
    for q in ("p50", "p99"):
        fig = f"clients_8_{q}_ms"
        print(f"| chat, 8 clients, request latency {q} (ms) | {w[fig]:.0f} | {p[fig]:.0f} "
              f"| {w[fig] / p[fig]:.2f} (latency) |")

    print()
    print("| prefill of a 2,048-token prompt (seconds, in-process) | Warden | llama.cpp | Warden / llama.cpp |")
    print("|---|---|---|---|")
    w, p = median(ours, "prefill_2048_chunked"), median(peer, "prefill_2048")
    print(f"| whole prompt (Warden: chunks of 256; llama.cpp: batches of 512) | {w:.2f} | {p:.2f} | {p / w:.2f} (speed) |")
    print(f"| other streams held up, fed in chunks of 256 (longest chunk) "
          f"| {median(ours, 'prefill_2048_longest_chunk'):.2f} | | |")
    print(f"| other streams held up, prompt fed whole (before chunking) | {median(ours, 'prefill_2048'):.2f} | | |")


if __name__ == "__main__":
    main()
