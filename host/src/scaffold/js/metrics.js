// A metrics policy: route and status class; a caller with the `metrics` scope sees all.
//
// componentize-js maps the WIT to JavaScript: records are plain objects and a variant is
// `{tag, val}`.

export const lifecycle = {
  configure(config) {},
};

export const metricsPolicy = {
  labels(request) {
    return [
      { name: 'route', value: request.route },
      { name: 'status_class', value: `${Math.floor(request.status / 100)}xx` },
    ];
  },

  visibleSeries(caller) {
    return caller.scopes.includes('metrics') ? { tag: 'all' } : { tag: 'none' };
  },
};
