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
assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"], models

# Chat, whole and streamed with usage: the same greedy text.
CHAT = "SmolLM2-135M-Instruct"
messages = [{"role": "user", "content": "What is the capital of France?"}]
whole = client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=24)
choice = whole.choices[0]
assert choice.message.role == "assistant" and choice.message.content, whole
assert choice.finish_reason in ("stop", "length"), whole
assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0, whole.usage
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
assert whole.model == CHAT and whole.id.startswith("chatcmpl-"), whole

stream = client.chat.completions.create(
    model=CHAT, messages=messages, temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, reasons = [], None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            reasons.append(c.finish_reason)
assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
assert reasons == [choice.finish_reason], reasons
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

# Text completion with a stop string, which is not returned.
done = client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20, stop=["7"])
text = done.choices[0].text
assert text.startswith(" 5, 6,") and "7" not in text and done.choices[0].finish_reason == "stop", done

try:
    client.chat.completions.create(model=CHAT, messages=messages, n=2)
    raise SystemExit("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "n" == e.body.get("param"), e.body

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
