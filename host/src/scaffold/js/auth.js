// An auth plugin: a bearer token from the configuration, compared in constant time.
//
// componentize-js maps the WIT to JavaScript: each exported interface is an exported object
// named after it (camelCase), records are plain objects, `option` is a value or undefined,
// and an `err` is what the function throws.

let token = null;

const encoder = new TextEncoder();

/** Whether two strings are equal, in time that depends only on their lengths. */
function same(a, b) {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  let difference = x.length ^ y.length;
  for (let i = 0; i < Math.min(x.length, y.length); i++) difference |= x[i] ^ y[i];
  return difference === 0;
}

export const lifecycle = {
  configure(config) {
    const settings = JSON.parse(config);
    if (typeof settings.token !== 'string' || settings.token.length < 16) {
      throw 'token must be at least 16 characters';
    }
    token = settings.token;
  },
};

export const auth = {
  authenticate(request) {
    const header = request.headers.find((h) => h.name === 'authorization');
    if (header === undefined || !/^bearer /i.test(header.value)) {
      throw { status: 401, code: 'missing_api_key', message: 'send a bearer token' };
    }
    if (!same(header.value.slice(7).trim(), token)) {
      throw { status: 401, code: 'invalid_api_key', message: 'invalid token' };
    }
    return { id: 'client', tenant: undefined, scopes: ['inference'] };
  },
};
