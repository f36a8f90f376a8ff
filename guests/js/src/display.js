// display() for Airlock's JavaScript isolate, over the native
// __airlockDisplay(bundleJson) and __airlockRepr(value).
//
// display(...objects) shows each object as a MIME bundle, as Jupyter does:
// text/plain (the value as the evaluation's result would show it) and what
// its methods _repr_html_(), _repr_markdown_(), _repr_svg_(), _repr_png_(),
// _repr_jpeg_(), _repr_json_(), _repr_latex_() and _repr_mimebundle_()
// return. display(bundle, { raw: true }) shows a plain object of
// MIME type -> data as given. Binary data (image/png, image/jpeg) is given
// as base64 text, or as a Uint8Array / ArrayBuffer.
(function () {
  const showNative = globalThis.__airlockDisplay;
  const repr = globalThis.__airlockRepr;
  const METHODS = [
    ["_repr_html_", "text/html"],
    ["_repr_markdown_", "text/markdown"],
    ["_repr_svg_", "image/svg+xml"],
    ["_repr_png_", "image/png"],
    ["_repr_jpeg_", "image/jpeg"],
    ["_repr_json_", "application/json"],
    ["_repr_latex_", "text/latex"],
  ];
  const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  function base64(bytes) {
    let out = "";
    let i = 0;
    for (; i + 2 < bytes.length; i += 3) {
      const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
      out += ALPHABET[n >> 18] + ALPHABET[(n >> 12) & 63] + ALPHABET[(n >> 6) & 63] + ALPHABET[n & 63];
    }
    if (i < bytes.length) {
      const rest = bytes.length - i;
      const n = (bytes[i] << 16) | (rest > 1 ? bytes[i + 1] << 8 : 0);
      out += ALPHABET[n >> 18] + ALPHABET[(n >> 12) & 63];
      out += rest > 1 ? ALPHABET[(n >> 6) & 63] + "=" : "==";
    }
    return out;
  }
  function isBinary(mime) {
    return mime.startsWith("image/") && mime !== "image/svg+xml";
  }
  // One representation as text: base64 for bytes, JSON for a JSON type's value.
  function encode(mime, value) {
    if (value == null) return null;
    if (value instanceof ArrayBuffer) value = new Uint8Array(value);
    if (ArrayBuffer.isView(value)) {
      const bytes = new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
      if (isBinary(mime)) return base64(bytes);
      let text = "";
      for (const b of bytes) text += String.fromCharCode(b);
      return text;
    }
    if (typeof value === "string") return value;
    if (mime === "application/json" || mime.endsWith("+json")) return JSON.stringify(value);
    return String(value);
  }
  function call(object, name) {
    try {
      const method = object[name];
      if (typeof method !== "function") return undefined;
      let got = method.call(object);
      // A [data, metadata] pair, as IPython allows.
      if (Array.isArray(got) && got.length === 2 && name !== "_repr_json_") got = got[0];
      return got;
    } catch (_) {
      // A representation that fails is left out, as Jupyter does.
      return undefined;
    }
  }
  function richBundle(object) {
    const pairs = [];
    if (object !== null && (typeof object === "object" || typeof object === "function")) {
      const mimebundle = call(object, "_repr_mimebundle_");
      if (mimebundle && typeof mimebundle === "object") {
        for (const mime of Object.keys(mimebundle)) {
          const text = encode(mime, mimebundle[mime]);
          if (text != null) pairs.push([mime, text]);
        }
      }
      for (const [name, mime] of METHODS) {
        if (pairs.some((pair) => pair[0] === mime)) continue;
        const text = encode(mime, call(object, name));
        if (text != null) pairs.push([mime, text]);
      }
    }
    return pairs;
  }
  // With the object's text as text/plain, unless it gave one.
  function withPlain(pairs, object) {
    if (!pairs.some((pair) => pair[0] === "text/plain")) pairs.push(["text/plain", repr(object)]);
    return pairs;
  }
  function bundleOf(object) {
    return withPlain(richBundle(object), object);
  }
  function rawBundle(object) {
    if (object === null || typeof object !== "object") {
      throw new TypeError("display(..., { raw: true }) takes an object of MIME type -> data");
    }
    const pairs = [];
    for (const mime of Object.keys(object)) {
      const text = encode(mime, object[mime]);
      if (text != null) pairs.push([mime, text]);
    }
    return pairs;
  }
  function isOptions(value) {
    if (value === null || typeof value !== "object" || Array.isArray(value)) return false;
    const keys = Object.keys(value);
    return keys.length === 1 && keys[0] === "raw" && typeof value.raw === "boolean";
  }
  function display(...objects) {
    let raw = false;
    if (objects.length > 1 && isOptions(objects[objects.length - 1])) raw = objects.pop().raw;
    for (const object of objects) showNative(JSON.stringify(raw ? rawBundle(object) : bundleOf(object)));
  }
  // The evaluation's last value, shown as a display too when it has a rich
  // representation (the value's own text stays as it is).
  function autoDisplay(value) {
    const pairs = richBundle(value);
    if (pairs.length === 0) return;
    showNative(JSON.stringify(withPlain(pairs, value)));
  }
  Object.defineProperty(globalThis, "display", { value: display, writable: true, configurable: true });
  Object.defineProperty(globalThis, "__airlockAutoDisplay", { value: autoDisplay });
})();
