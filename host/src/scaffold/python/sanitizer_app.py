"""A sanitizer: refuses input that contains a configured word; output passes through."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import sanitizer as s
from wit_world.imports.types import Refusal

_blocked: list = []


class Lifecycle(exports.Lifecycle):
    def configure(self, config: str) -> None:
        global _blocked
        _blocked = [w.lower() for w in json.loads(config).get("blocked", [])]


class Sanitizer(exports.Sanitizer):
    def check_input(self, input: s.InferenceInput) -> s.InputVerdict:
        p = input.payload
        texts = p.value if isinstance(p, s.Payload_Texts) else [m.content for m in p.value]
        for i, text in enumerate(texts):
            for word in _blocked:
                if word in text.lower():
                    message = f"input {i} contains the blocked word `{word}`"
                    raise Err(Refusal(status=400, code="blocked_word", message=message))
        return s.InputVerdict_Pass()
