// `npm test` (node --test): the HMAC against RFC 4231 and node:crypto, and one verification.
// The policy's cases are in cases.jsonl, which `warden plugin test` runs on the component.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { hmacKey, hmacSha256 } from '../src/hmac.js';
import { settings, verify, TokenError } from '../src/jwt.js';

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const utf8 = (text) => new TextEncoder().encode(text);

test('hmac matches RFC 4231 test case 1', async () => {
  const key = await hmacKey(new Uint8Array(20).fill(0x0b));
  assert.equal(hex(await hmacSha256(key, utf8('Hi There'))), 'b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7');
});

test('hmac matches node:crypto for keys and messages around the block size', async () => {
  for (const keyLength of [0, 1, 32, 63, 64, 65, 131]) {
    const raw = Uint8Array.from({ length: keyLength }, (_, i) => (i * 7 + keyLength) & 0xff);
    const key = await hmacKey(raw);
    for (const messageLength of [0, 1, 55, 56, 64, 119, 200]) {
      const message = Uint8Array.from({ length: messageLength }, (_, i) => (i * 31) & 0xff);
      assert.equal(
        hex(await hmacSha256(key, message)),
        createHmac('sha256', raw).update(message).digest('hex'),
        `key ${keyLength}, message ${messageLength}`,
      );
    }
  }
});

test('a token signed by node:crypto verifies, and a minute after expiry does not', async () => {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const secret = 'a-secret-of-at-least-thirty-two-bytes';
  const signed = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ iss: 'i', aud: 'a', sub: 'bob', scp: ['inference'], exp: 1000 })}`;
  const token = `${signed}.${createHmac('sha256', secret).update(signed).digest('base64url')}`;
  const config = await settings({ secret, issuer: 'i', audience: 'a', leeway_seconds: 30 });
  assert.deepEqual(await verify(token, config, 1000), { id: 'bob', tenant: undefined, scopes: ['inference'] });
  await assert.rejects(verify(token, config, 1030), (error) => error instanceof TokenError && error.code === 'token_expired');
});

test('a configuration without an audience or with a short secret is refused', async () => {
  await assert.rejects(settings({ secret: 'x'.repeat(32), issuer: 'i' }), /audience/);
  await assert.rejects(settings({ secret: 'short', issuer: 'i', audience: 'a' }), /32 bytes/);
  await assert.rejects(settings({ secret: 'x'.repeat(32), issuer: 'i', audience: 'a', extra: 1 }), /unknown setting `extra`/);
});
