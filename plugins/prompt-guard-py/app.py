"""prompt-guard: a Warden sanitizer in Python that refuses chat and completion input
carrying common prompt-injection phrasings ("ignore all previous instructions", "reveal your
system prompt", ...), and releases generated text as it comes. Built with componentize-py
(see docs/plugins.md); the patterns can be extended with the `extra_patterns` setting.
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import sanitizer as s
from wit_world.imports.types import Refusal

PATTERNS = [
    r"\b(ignore|disregard|forget)\b.{0,20}\b(all|any|the)?\s*(previous|prior|above|earlier)\s+(instructions|prompts?|rules|messages)",
    r"\b(reveal|print|show|repeat)\b.{0,20}\b(your|the)\s+(system\s+prompt|hidden\s+instructions|initial\s+instructions)",
    r"\byou\s+are\s+now\s+(dan|in\s+developer\s+mode|jailbroken|unrestricted)\b",
    r"\bpretend\s+(that\s+)?you\s+(have\s+no|are\s+free\s+of)\s+(rules|restrictions|guidelines)",
    r"<\|im_start\|>|<\|im_end\|>|\[/?INST\]",
]

# Compiled when the component is built (componentize-py pre-initializes the module), so a
# fresh instance does not compile them again.
_base = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in PATTERNS]
_patterns = _base
# Embeddings are not instructions to a model: only generating kinds are checked, unless
# `check_embeddings` is set.
_check_embeddings = False


class Lifecycle(exports.Lifecycle):
    def configure(self, config: str) -> None:
        global _patterns, _check_embeddings
        try:
            settings = json.loads(config)
        except ValueError as e:
            raise Err(f"invalid configuration: {e}")
        if not isinstance(settings, dict):
            raise Err("invalid configuration: expected a JSON object")
        unknown = set(settings) - {"extra_patterns", "check_embeddings"}
        if unknown:
            raise Err(f"invalid configuration: unknown field `{sorted(unknown)[0]}`")
        extra = settings.get("extra_patterns", [])
        if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
            raise Err("invalid configuration: extra_patterns must be a list of strings")
        try:
            compiled = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in extra]
        except re.error as e:
            raise Err(f"invalid configuration: extra_patterns: {e}")
        _patterns = _base + compiled
        _check_embeddings = bool(settings.get("check_embeddings", False))


class Sanitizer(exports.Sanitizer):
    def check_input(self, input: s.InferenceInput) -> s.InputVerdict:
        if input.kind == s.InputKind.EMBEDDINGS and not _check_embeddings:
            return s.InputVerdict_Pass()
        payload = input.payload
        if isinstance(payload, s.Payload_Texts):
            named = [("prompt" if input.kind == s.InputKind.COMPLETION else f"input[{i}]", t)
                     for i, t in enumerate(payload.value)]
        else:
            named = [(f"messages[{i}]", m.content) for i, m in enumerate(payload.value)
                     if m.role != "assistant"]
        for name, text in named:
            for pattern in _patterns:
                if pattern.search(text):
                    raise Err(Refusal(
                        status=400,
                        code="prompt_injection",
                        message=f"{name} looks like a prompt injection and was refused",
                    ))
        return s.InputVerdict_Pass()
