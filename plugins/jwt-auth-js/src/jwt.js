// HS256 JSON Web Tokens (RFC 7519, RFC 7515 compact form): parse, verify, check claims.
//
// Functions of their arguments alone (the time included), so `node --test` runs them as
// they run inside the component.

import { hmacKey, hmacSha256, sameBytes } from './hmac.js';

/** The longest token looked at; anything longer is refused before it is decoded. */
export const MAX_TOKEN_BYTES = 8192;
const MAX_SCOPES = 32;
const MAX_CLAIM_BYTES = 128;

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** A reason to refuse a token: the refusal code and a message that never quotes the token. */
export class TokenError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const invalid = (message) => new TokenError('invalid_api_key', message);

/** Checks an operator's configuration (a parsed JSON object) and returns the verifier's. */
export async function settings(config) {
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new Error('the configuration must be a JSON object');
  }
  const known = ['secret', 'secrets', 'issuer', 'audience', 'leeway_seconds', 'tenant_claim'];
  for (const key of Object.keys(config)) {
    if (!known.includes(key)) throw new Error(`unknown setting \`${key}\` (known: ${known.join(', ')})`);
  }
  const secrets = config.secrets ?? (config.secret === undefined ? [] : [config.secret]);
  if (config.secret !== undefined && config.secrets !== undefined) {
    throw new Error('give `secret` or `secrets`, not both');
  }
  if (!Array.isArray(secrets) || secrets.length === 0 || secrets.length > 8) {
    throw new Error('`secret` is required (or `secrets`, one to eight of them for a rotation)');
  }
  for (const secret of secrets) {
    // RFC 7518 3.2: a key of at least the hash's size, 256 bits.
    if (typeof secret !== 'string' || encoder.encode(secret).length < 32) {
      throw new Error('every secret must be a string of at least 32 bytes');
    }
  }
  for (const name of ['issuer', 'audience']) {
    if (typeof config[name] !== 'string' || config[name] === '') {
      throw new Error(`\`${name}\` is required: tokens are only accepted from one issuer for one audience`);
    }
  }
  const leeway = config.leeway_seconds ?? 30;
  if (!Number.isInteger(leeway) || leeway < 0 || leeway > 300) {
    throw new Error('`leeway_seconds` must be a whole number from 0 to 300');
  }
  const tenantClaim = config.tenant_claim ?? 'tenant';
  if (typeof tenantClaim !== 'string' || tenantClaim === '') {
    throw new Error('`tenant_claim` must be a claim name');
  }
  return {
    keys: await Promise.all(secrets.map((secret) => hmacKey(encoder.encode(secret)))),
    issuer: config.issuer,
    audience: config.audience,
    leeway,
    tenantClaim,
  };
}

/** Decodes unpadded base64url (RFC 4648 section 5), refusing any other alphabet or padding. */
export function base64url(text) {
  if (text.length % 4 === 1) throw invalid('malformed token');
  const bytes = new Uint8Array(Math.floor((text.length * 3) / 4));
  let buffer = 0;
  let bits = 0;
  let at = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    let value;
    if (c >= 65 && c <= 90) value = c - 65;
    else if (c >= 97 && c <= 122) value = c - 71;
    else if (c >= 48 && c <= 57) value = c + 4;
    else if (c === 45) value = 62;
    else if (c === 95) value = 63;
    else throw invalid('malformed token');
    buffer = (buffer << 6) | value;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes[at++] = (buffer >>> bits) & 0xff;
    }
  }
  return bytes.subarray(0, at);
}

function json(part) {
  let value;
  try {
    value = JSON.parse(decoder.decode(base64url(part)));
  } catch (error) {
    throw error instanceof TokenError ? error : invalid('malformed token');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw invalid('malformed token');
  return value;
}

function shortString(value, what) {
  if (typeof value !== 'string' || value === '' || encoder.encode(value).length > MAX_CLAIM_BYTES) {
    throw invalid(`the token's \`${what}\` claim is missing or not a short string`);
  }
  return value;
}

function scopesOf(claims) {
  // OAuth's `scope` (RFC 8693: space-separated) or the array form `scp` some issuers use.
  let scopes = [];
  if (claims.scope !== undefined) {
    if (typeof claims.scope !== 'string') throw invalid('the token\'s `scope` claim is not a string');
    scopes = claims.scope.split(' ').filter((scope) => scope !== '');
  } else if (claims.scp !== undefined) {
    if (!Array.isArray(claims.scp)) throw invalid('the token\'s `scp` claim is not a list');
    scopes = claims.scp;
  }
  if (scopes.length > MAX_SCOPES) throw invalid('the token has too many scopes');
  return [...new Set(scopes.map((scope) => shortString(scope, 'scope')))];
}

/**
 * Verifies `token` under `config` (from `settings`) at `now` (seconds since the epoch) and
 * returns the principal it names, or throws a TokenError.
 */
export async function verify(token, config, now) {
  if (token.length > MAX_TOKEN_BYTES) throw invalid('the token is too long');
  const parts = token.split('.');
  if (parts.length !== 3) throw invalid('malformed token');
  const [headerPart, claimsPart, signaturePart] = parts;

  // The algorithm is fixed by the configuration, never chosen by the token: `none` and the
  // RS256/HS256 confusion are refused here.
  const header = json(headerPart);
  if (header.alg !== 'HS256') throw invalid('the token is not signed with HS256');
  if (header.typ !== undefined && header.typ !== 'JWT') throw invalid('the token is not a JWT');
  if (header.crit !== undefined) throw invalid('the token has critical extensions this verifier does not know');

  const signature = base64url(signaturePart);
  const signed = encoder.encode(`${headerPart}.${claimsPart}`);
  // The current secret first: a rotation's older ones cost a digest only for old tokens.
  // Which secret matched is no secret; each comparison is constant-time.
  let verified = false;
  for (const key of config.keys) {
    verified = sameBytes(await hmacSha256(key, signed), signature);
    if (verified) break;
  }
  if (!verified) throw invalid('the token\'s signature does not verify');

  // Claims are only read once the signature holds.
  const claims = json(claimsPart);
  if (typeof claims.exp !== 'number') throw invalid('the token has no expiry (`exp`)');
  if (now >= claims.exp + config.leeway) throw new TokenError('token_expired', 'the token has expired');
  if (claims.nbf !== undefined && (typeof claims.nbf !== 'number' || now < claims.nbf - config.leeway)) {
    throw new TokenError('token_not_yet_valid', 'the token is not valid yet');
  }
  if (claims.iss !== config.issuer) throw new TokenError('invalid_issuer', 'the token is from another issuer');
  const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (!audiences.includes(config.audience)) {
    throw new TokenError('invalid_audience', 'the token is for another audience');
  }
  const tenant = claims[config.tenantClaim];
  return {
    id: shortString(claims.sub, 'sub'),
    tenant: tenant === undefined ? undefined : shortString(tenant, config.tenantClaim),
    scopes: scopesOf(claims),
  };
}
