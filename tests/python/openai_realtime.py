"""Hold a Realtime API text conversation with a Warden server through the official OpenAI
Python client (`client.realtime.connect`, from `openai[realtime]`).

Usage: python openai_realtime.py <base url ending in /v1> <api key>
Exits non-zero on the first failed check.
"""
import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
MODEL = "SmolLM2-135M-Instruct"
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def until(conn, kind):
    """Events up to and including the next of `kind`; an error event fails the run."""
    events = []
    for event in conn:
        assert event.type != "error", event
        events.append(event)
        if event.type == kind:
            return events
    raise AssertionError(f"the connection ended before {kind}")


def turn(conn, question):
    """Ask, stream the answer; return its text and the typed response.done."""
    conn.conversation.item.create(
        item={
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": question}],
        }
    )
    added = until(conn, "conversation.item.done")
    assert added[-1].item.role == "user", added
    assert added[-1].item.content[0].text == question, added

    conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 16})
    events = until(conn, "response.done")
    assert events[0].type == "response.created", events[0]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1, "the answer streams in pieces"
    text = "".join(deltas)
    done_text = [e.text for e in events if e.type == "response.output_text.done"]
    assert done_text == [text], (done_text, text)
    done = events[-1]
    assert done.response.status in ("completed", "incomplete"), done
    assert done.response.output[0].content[0].text == text, done
    usage = done.response.usage
    assert usage.output_tokens > 0 and usage.input_tokens > 0, usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens, usage
    return text, done


with client.realtime.connect(model=MODEL) as conn:
    created = until(conn, "session.created")[-1]
    assert created.session.model == MODEL, created

    conn.session.update(
        session={
            "type": "realtime",
            "output_modalities": ["text"],
            "instructions": "Answer in a few words.",
        }
    )
    updated = until(conn, "session.updated")[-1]
    assert updated.session.instructions == "Answer in a few words.", updated

    first, done1 = turn(conn, "What is the capital of France?")
    assert first.strip(), first
    # The second turn's prompt holds the first question and answer.
    second, done2 = turn(conn, "And of Italy?")
    assert second.strip(), second
    assert done2.response.usage.input_tokens > done1.response.usage.input_tokens, (
        done1.response.usage,
        done2.response.usage,
    )
    # The first turn's tokens came from the kept cache, not computed again.
    cached = done2.response.usage.input_token_details.cached_tokens
    assert cached >= done1.response.usage.input_tokens, done2.response.usage

    # A bad event is an error event, and the conversation goes on.
    conn.send({"type": "conversation.item.delete", "item_id": "no-such-item"})
    error = next(iter(conn))
    assert error.type == "error" and error.error.code == "item_not_found", error

print("openai realtime: all checks passed")
