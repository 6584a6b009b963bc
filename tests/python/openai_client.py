"""Drive a Warden server with the official OpenAI Python client.

Usage: python openai_client.py <base url ending in /v1> <api key>
Exits non-zero on the first failed check.
"""
import math
import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)

# The client asks for base64 by default and decodes it.
result = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello world", "second text"])
assert len(result.data) == 2, result
for i, item in enumerate(result.data):
    assert item.index == i
    assert len(item.embedding) == 384
    norm = math.sqrt(sum(x * x for x in item.embedding))
    assert abs(norm - 1.0) < 1e-4, norm
assert result.usage.prompt_tokens > 0, result.usage
assert result.model == "all-MiniLM-L6-v2"

floats = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello world", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, result.data[0].embedding)) < 1e-6

models = client.models.list()
assert [m.id for m in models.data] == ["all-MiniLM-L6-v2"], models

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).embeddings.create(
        model="all-MiniLM-L6-v2", input="x"
    )
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

try:
    client.embeddings.create(model="no-such-model", input="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=8)
    raise SystemExit("dimensions was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400

print("openai client: all checks passed")
