// An auth plugin: HS256 JWT bearer tokens, checked for signature, issuer, audience and time.
// The principal is the token's `sub`, its tenant a claim, its scopes `scope` or `scp`.
//
// Configuration: {"secret": "...", "issuer": "...", "audience": "..."}, optionally
// "secrets": [...] (current first) instead of "secret" during a rotation,
// "leeway_seconds" (30) and "tenant_claim" ("tenant").

import { log } from 'warden:policy/host@0.1.0';
import { settings, verify, TokenError, MAX_TOKEN_BYTES } from './jwt.js';

let config = null;

export const lifecycle = {
  // componentize-js runs an async export's promise to completion before the call returns.
  async configure(text) {
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw 'the configuration is not JSON';
    }
    try {
      config = await settings(parsed);
    } catch (error) {
      throw error.message;
    }
  },
};

export const auth = {
  async authenticate(request) {
    const headers = request.headers.filter((header) => header.name === 'authorization');
    if (headers.length === 0) {
      throw { status: 401, code: 'missing_api_key', message: 'send a bearer token: Authorization: Bearer <JWT>' };
    }
    // A token too long to verify is refused before any pattern runs over it.
    if (headers.length === 1 && headers[0].value.length > MAX_TOKEN_BYTES + 16) {
      throw { status: 401, code: 'invalid_api_key', message: 'the token is too long' };
    }
    const match = /^bearer +(\S+) *$/i.exec(headers.length === 1 ? headers[0].value : '');
    if (match === null) {
      throw { status: 401, code: 'invalid_api_key', message: 'send one bearer token: Authorization: Bearer <JWT>' };
    }
    try {
      // The host's wall clock, in whole seconds.
      return await verify(match[1], config, Math.floor(Date.now() / 1000));
    } catch (error) {
      if (!(error instanceof TokenError)) throw error;
      log('debug', `request ${request.requestId}: token refused (${error.code})`);
      throw { status: 401, code: error.code, message: error.message };
    }
  },
};

// Pre-initialization. componentize-js evaluates this module when it builds the component and
// snapshots the result, so what runs here is done once, at build time, not in every instance:
// the runtime's SHA-256 sets itself up on first use (about 1 ms), and SpiderMonkey compiles a
// function on its first call. One verification of a throw-away token does both.
{
  const encode = (bytes) => btoa(String.fromCharCode(...bytes)).replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
  const json = (value) => encode(new TextEncoder().encode(JSON.stringify(value)));
  const secret = 'pre-initialization-only-pre-initialization-only';
  const signed = `${json({ alg: 'HS256' })}.${json({ iss: 'i', aud: 'a', sub: 's', scope: 'x', exp: 2 })}`;
  const { hmacKey, hmacSha256 } = await import('./hmac.js');
  const key = await hmacKey(new TextEncoder().encode(secret));
  const token = `${signed}.${encode(await hmacSha256(key, new TextEncoder().encode(signed)))}`;
  const probe = await settings({ secret, issuer: 'i', audience: 'a' });
  if ((await verify(token, probe, 1)).id !== 's') throw new Error('the pre-initialization token did not verify');
}
