"""Regenerate tests/fixtures/embeddings-reference.json with sentence-transformers.

Usage: python make_reference.py <model dir> <output json>
Needs sentence-transformers 6.x and torch (not needed by `make test`, which only reads the
committed JSON).
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from sentence_transformers import SentenceTransformer  # noqa: E402

INPUTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "Warden serves embeddings behind sandboxed WebAssembly policy plugins.",
    "Ünïcödé têxt, emoji 🚀 and CJK 漢字 are tokenized too.",
    "Numbers like 3.14159 and 2026-11-22 and 1,000,000 matter.",
    "   leading and trailing whitespace   ",
    "tab\tseparated\nand multi-line\r\ntext",
    " ".join(["This sentence is repeated to exceed the 256 token limit."] * 40),
    "short",
    "What is the capital of France? Paris is the capital of France.",
]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(INPUTS, batch_size=4, normalize_embeddings=False)
    tokens = [len(model.tokenizer(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in INPUTS]
    data = {
        "model": "all-MiniLM-L6-v2",
        "generator": "sentence-transformers " + __import__("sentence_transformers").__version__,
        "max_seq_length": model.max_seq_length,
        "items": [
            {"input": t, "tokens": n, "embedding": [round(float(x), 7) for x in v]}
            for t, n, v in zip(INPUTS, tokens, vectors)
        ],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
