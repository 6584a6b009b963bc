// HMAC-SHA-256 (RFC 2104) on the runtime's native SHA-256 (`crypto.subtle.digest`).
//
// The key's inner and outer pads are computed once per key (`hmacKey`), so a verification
// is two native digests. Works the same in the component and in Node (`node --test`).

const BLOCK = 64;

/** The inner and outer pads of `key` (bytes), ready for `hmacSha256`. */
export async function hmacKey(key) {
  const block = new Uint8Array(BLOCK);
  block.set(key.length > BLOCK ? new Uint8Array(await crypto.subtle.digest('SHA-256', key)) : key);
  return {
    inner: block.map((byte) => byte ^ 0x36),
    outer: block.map((byte) => byte ^ 0x5c),
  };
}

/** HMAC-SHA-256 of `message` (bytes) under a key from `hmacKey`, as 32 bytes. */
export async function hmacSha256(key, message) {
  const inner = new Uint8Array(BLOCK + message.length);
  inner.set(key.inner);
  inner.set(message, BLOCK);
  const outer = new Uint8Array(BLOCK + 32);
  outer.set(key.outer);
  outer.set(new Uint8Array(await crypto.subtle.digest('SHA-256', inner)), BLOCK);
  return new Uint8Array(await crypto.subtle.digest('SHA-256', outer));
}

/** Whether two byte strings are equal, in time that depends only on their lengths. */
export function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  let difference = 0;
  for (let i = 0; i < a.length; i++) difference |= a[i] ^ b[i];
  return difference === 0;
}
