// A sanitizer: refuses input that contains a configured word; output passes through.
//
// componentize-js maps the WIT to JavaScript: a variant is `{tag, val}`, an enum a string,
// a resource a class exported in its interface's object, and an `err` is what is thrown.

let blocked = [];

export const lifecycle = {
  configure(config) {
    blocked = (JSON.parse(config).blocked ?? []).map((word) => word.toLowerCase());
  },
};

class OutputFilter {
  constructor(kind) {}

  push(chunk) {
    return chunk;
  }

  finish() {
    return '';
  }
}

export const sanitizer = {
  OutputFilter,

  checkInput(input) {
    const { tag, val } = input.payload;
    const texts = tag === 'texts' ? val : val.map((message) => message.content);
    texts.forEach((text, i) => {
      const word = blocked.find((w) => text.toLowerCase().includes(w));
      if (word !== undefined) {
        throw { status: 400, code: 'blocked_word', message: `input ${i} contains the blocked word \`${word}\`` };
      }
    });
    return { tag: 'pass' };
  },
};
