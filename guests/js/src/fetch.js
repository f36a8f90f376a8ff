// fetch for Airlock's JavaScript isolate, over the native __airlockHttp.
// Each request blocks the isolate until its response has arrived whole (the
// host bounds its size and time); the promise is settled when fetch returns.
(function () {
  const raw = globalThis.__airlockHttp;
  class Headers {
    constructor(init) {
      this._map = new Map();
      if (init == null) return;
      if (init instanceof Headers) init.forEach((v, k) => this.append(k, v));
      else if (Array.isArray(init)) for (const [k, v] of init) this.append(k, v);
      else for (const k of Object.keys(init)) this.append(k, init[k]);
    }
    append(k, v) {
      k = String(k).toLowerCase(); v = String(v);
      const old = this._map.get(k);
      this._map.set(k, old === undefined ? v : old + ", " + v);
    }
    set(k, v) { this._map.set(String(k).toLowerCase(), String(v)); }
    get(k) { const v = this._map.get(String(k).toLowerCase()); return v === undefined ? null : v; }
    has(k) { return this._map.has(String(k).toLowerCase()); }
    delete(k) { this._map.delete(String(k).toLowerCase()); }
    forEach(f, self) { for (const [k, v] of this._map) f.call(self, v, k, this); }
    entries() { return this._map.entries(); }
    keys() { return this._map.keys(); }
    values() { return this._map.values(); }
    [Symbol.iterator]() { return this._map.entries(); }
  }
  class Response {
    constructor(body, init) {
      init = init || {};
      this._body = body == null ? "" : String(body);
      this.status = init.status === undefined ? 200 : init.status;
      this.statusText = init.statusText || "";
      this.ok = this.status >= 200 && this.status < 300;
      this.headers = new Headers(init.headers);
      this.url = init.url || "";
      this.bodyUsed = false;
    }
    text() { this.bodyUsed = true; return Promise.resolve(this._body); }
    json() { this.bodyUsed = true; return Promise.resolve(this._body).then((b) => JSON.parse(b)); }
  }
  function fetch(input, init) {
    return new Promise((resolve) => {
      init = init || {};
      const url = typeof input === "string" ? input : (input && input.url) || String(input);
      const method = String(init.method || "GET").toUpperCase();
      const pairs = [];
      new Headers(init.headers).forEach((v, k) => pairs.push([k, v]));
      const body = init.body == null ? null : String(init.body);
      const answer = JSON.parse(raw(url, method, JSON.stringify(pairs), body));
      resolve(new Response(answer.body, { status: answer.status, headers: answer.headers, url }));
    });
  }
  globalThis.Headers = Headers;
  globalThis.Response = Response;
  globalThis.fetch = fetch;
})();
