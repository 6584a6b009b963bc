"""Regenerate tests/fixtures/llama-reference.json with llama.cpp (llama-cpp-python).

Usage: python make_llama_reference.py <model.gguf> <output json>
Needs llama-cpp-python 0.3.x (not needed by `make test`, which only reads the committed JSON).

The fixture holds:
- tokenization cases: llama.cpp's token ids for texts, with and without special-token parsing;
- chat cases: the GGUF's chat template rendered by Jinja2 with the generation prompt, its ids,
  llama.cpp's greedy continuation and the top 5 logits at each of its steps;
- completion cases: a raw prompt, its ids, the greedy continuation and its top logits.
"""
import json
import sys

import jinja2
import numpy as np
import llama_cpp
from llama_cpp import Llama, __version__

TOKENIZE = [
    ("Hello, world!", True),
    ("The year 2026 has 365 days; pi is 3.14159.", True),
    ("1234567890", True),
    ("  leading spaces and\ttabs\nand new lines\n\n", True),
    ("Ünïcödé têxt, emoji 🚀 and CJK 漢字", True),
    ("<|im_start|>user\nHi<|im_end|>\n", True),
    ("<|im_start|>user\nHi<|im_end|>\n", False),
    ("text<|endoftext|>more", True),
    ("text<|endoftext|>more", False),
    ("don't won't I'm we'll they've", True),
    ("x" * 50, True),
    ("", True),
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Count from 1 to 5."}],
]

COMPLETIONS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
]

GREEDY_TOKENS = 16


def greedy(m: Llama, ids: list[int]) -> tuple[list[int], list[list[list[float]]]]:
    """Greedy decoding one token at a time, as llama.cpp's server does it, with the top 5
    logits of every step (so that a test can tell a numerical tie from a real difference)."""
    m.reset()
    m.eval(ids)
    out, tops = [], []
    while len(out) < GREEDY_TOKENS:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1),
                                       shape=(m.n_vocab(),)).copy()
        top = np.argsort(-logits, kind="stable")[:5]
        tok = int(top[0])
        if tok == m.token_eos():
            break
        out.append(tok)
        tops.append([[int(t), round(float(logits[t]), 4)] for t in top])
        m.eval([tok])
    return out, tops


def main() -> None:
    path, target = sys.argv[1], sys.argv[2]
    m = Llama(model_path=path, n_ctx=2048, n_threads=2, verbose=False)
    template = jinja2.Environment(loader=jinja2.BaseLoader()).from_string(
        m.metadata["tokenizer.chat_template"])
    data = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "generator": "llama-cpp-python " + __version__,
        "tokenize": [
            {"content": t, "parse_special": s,
             "tokens": m.tokenize(t.encode(), add_bos=False, special=s)}
            for t, s in TOKENIZE
        ],
        "chat": [],
        "completion": [],
    }
    for messages in CHATS:
        text = template.render(messages=messages, add_generation_prompt=True)
        ids = m.tokenize(text.encode(), add_bos=False, special=True)
        out, tops = greedy(m, ids)
        data["chat"].append({"messages": messages, "prompt": text, "prompt_tokens": ids,
                             "greedy": out, "top_logits": tops})
    for prompt in COMPLETIONS:
        ids = m.tokenize(prompt.encode(), add_bos=False, special=True)
        out, tops = greedy(m, ids)
        data["completion"].append({"prompt": prompt, "prompt_tokens": ids,
                                   "greedy": out, "top_logits": tops})
    with open(target, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
