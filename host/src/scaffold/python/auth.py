"""An auth plugin: a bearer token from the configuration, compared in constant time."""

import hmac
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import Principal, Refusal, RequestInfo

_token = ""


class Lifecycle(exports.Lifecycle):
    def configure(self, config: str) -> None:
        global _token
        settings = json.loads(config)
        token = settings.get("token", "")
        if len(token) < 16:
            raise Err("token must be at least 16 characters")
        _token = token


class Auth(exports.Auth):
    def authenticate(self, request: RequestInfo) -> Principal:
        header = next((h.value for h in request.headers if h.name == "authorization"), None)
        if header is None or not header.startswith("Bearer "):
            raise Err(Refusal(status=401, code="missing_api_key", message="send a bearer token"))
        if not hmac.compare_digest(header[7:].strip().encode(), _token.encode()):
            raise Err(Refusal(status=401, code="invalid_api_key", message="invalid token"))
        return Principal(id="client", tenant=None, scopes=["inference"])
