// Airlock's Node.js kernel: one persistent JavaScript context per code
// context, in a sandbox container (see crates/container/src/kernel.rs for the
// host's side, and python_kernel.py for the protocol, which is the same).
//
// The host starts it as `node -e <this source>` through the sandbox's agent,
// as the sandbox's user in /workspace, with a pipe on stdin. Each evaluation
// runs in one vm context kept for the kernel's life, so top-level `let`,
// `const`, functions and globals persist; its completion value (the last
// expression's) is the evaluation's value, awaited when it is a promise.
'use strict';

const vm = require('vm');
const util = require('util');
const { createRequire } = require('module');

const CODE_FILENAME = '<code>';
// Longest value text, traceback or repr sent, in characters (as in the Python kernel).
const TEXT_CHARS = 1 << 20;
const REPR_METHODS = [
  ['image/png', '_repr_png_'],
  ['image/jpeg', '_repr_jpeg_'],
  ['image/svg+xml', '_repr_svg_'],
  ['text/html', '_repr_html_'],
  ['text/markdown', '_repr_markdown_'],
  ['text/latex', '_repr_latex_'],
  ['application/json', '_repr_json_'],
];

// Frames go through the streams' own write functions, taken before the
// user's code can replace them; on Linux both are synchronous for pipes, so
// a frame comes after everything written before it.
const writeOut = process.stdout.write.bind(process.stdout);
const writeErr = process.stderr.write.bind(process.stderr);
let mark = null;

function clean(text) {
  let s = typeof text === 'string' ? text : String(text);
  if (s.length > TEXT_CHARS) s = s.slice(0, TEXT_CHARS) + '... [truncated]';
  // Lone surrogates cannot travel in JSON to the host: replace them.
  return typeof s.toWellFormed === 'function' ? s.toWellFormed() : s.replace(/[\ud800-\udfff]/g, (c, i, all) => {
    const code = c.charCodeAt(0);
    if (code <= 0xdbff) {
      const next = all.charCodeAt(i + 1);
      return next >= 0xdc00 && next <= 0xdfff ? c : '\ufffd';
    }
    const prev = all.charCodeAt(i - 1);
    return prev >= 0xd800 && prev <= 0xdbff ? c : '\ufffd';
  });
}

function ascii(json) {
  // Pure ASCII, so a frame is bytes the host can take apart without decoding.
  return json.replace(/[\u007f-\uffff]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

function send(message, toStderr) {
  const frame = mark + ascii(JSON.stringify(message)) + '\n';
  (toStderr ? writeErr : writeOut)(frame);
}

function plain(value) {
  try {
    return clean(util.inspect(value, { depth: 4 }));
  } catch (error) {
    return '<unprintable>';
  }
}

function encode(mime, value) {
  if (value === null || value === undefined) return null;
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    const bytes = Buffer.from(value);
    return mime.startsWith('image/') && mime !== 'image/svg+xml' ? bytes.toString('base64') : bytes.toString('utf8');
  }
  if ((mime === 'application/json' || mime.endsWith('+json')) && typeof value !== 'string') {
    try {
      return JSON.stringify(value);
    } catch (error) {
      return null;
    }
  }
  return clean(String(value));
}

function richData(value) {
  const data = {};
  if (value === null || (typeof value !== 'object' && typeof value !== 'function')) return data;
  for (const [mime, name] of REPR_METHODS) {
    let method;
    try {
      method = value[name];
    } catch (error) {
      continue;
    }
    if (typeof method !== 'function') continue;
    try {
      const encoded = encode(mime, method.call(value));
      if (encoded !== null) data[mime] = encoded;
    } catch (error) {
      // A representation that fails is left out, as Jupyter does.
    }
  }
  return data;
}

function sendDisplay(data) {
  const clean_data = {};
  for (const [mime, value] of Object.entries(data)) clean_data[clean(mime)] = clean(value);
  send({ t: 'display', data: clean_data });
}

// display(value, {raw}): a rich output, from the value's _repr_*_ methods and
// its inspection; with {raw: true}, the value is a MIME bundle already
// ({'text/html': '<b>hi</b>'}; Buffers of binary types are base64-encoded).
function display(value, options) {
  let data = {};
  if (options && options.raw && value !== null && typeof value === 'object') {
    for (const [mime, representation] of Object.entries(value)) {
      const encoded = encode(mime, representation);
      if (encoded !== null) data[mime] = encoded;
    }
  } else {
    data = richData(value);
    if (!('text/plain' in data)) data['text/plain'] = plain(value);
  }
  if (Object.keys(data).length > 0) sendDisplay(data);
}

function isPlainData(value) {
  if (Array.isArray(value)) return true;
  const proto = Object.getPrototypeOf(value);
  return proto === null || Object.prototype.toString.call(value) === '[object Object]' && (proto.constructor === undefined || proto.constructor.name === 'Object');
}

function valueOf(result) {
  if (result === undefined) return null;
  let json = null;
  // JSON only where it stands for the value: not for a Map or a class
  // instance, which JSON.stringify would flatten to `{}`.
  const serialisable =
    result === null ||
    ['number', 'boolean', 'string'].includes(typeof result) ||
    (typeof result === 'object' && (isPlainData(result) || typeof result.toJSON === 'function'));
  if (serialisable) {
    try {
      const encoded = JSON.stringify(result);
      if (typeof encoded === 'string' && encoded.length <= TEXT_CHARS) json = encoded;
    } catch (error) {
      json = null;
    }
  }
  let text;
  if (typeof result === 'string') text = clean(JSON.stringify(result));
  else if (result !== null && typeof result === 'object' && json !== null && isPlainData(result)) text = clean(json);
  else text = plain(result);
  return { text, json: json === null ? null : clean(json) };
}

function lineOf(stack) {
  const found = /<code>:(\d+)/.exec(stack || '');
  return found ? Number(found[1]) : null;
}

function codeError(error) {
  const isObject = error !== null && typeof error === 'object';
  let kind = 'Error';
  let message;
  let stack = '';
  try {
    if (isObject && typeof error.name === 'string') kind = error.name;
    message = isObject && error.message !== undefined ? String(error.message) : plain(error);
    if (isObject && typeof error.stack === 'string') stack = error.stack;
  } catch (failure) {
    message = '<unprintable>';
  }
  // Only the frames of the user's code and of what it called, not the kernel's.
  const frames = stack
    .split('\n')
    .filter((line) => !/^\s+at /.test(line) || !/(\[eval\]|node:vm|node:internal|evaluate \()/.test(line));
  const traceback = frames.length > 0 ? frames.join('\n') : `${kind}: ${message}`;
  return { kind: clean(kind), message: clean(message), traceback: clean(traceback), line: lineOf(stack) };
}

const sandbox = {
  console,
  process,
  Buffer,
  URL,
  URLSearchParams,
  TextEncoder,
  TextDecoder,
  AbortController,
  setTimeout,
  clearTimeout,
  setInterval,
  clearInterval,
  setImmediate,
  clearImmediate,
  queueMicrotask,
  structuredClone: globalThis.structuredClone,
  fetch: globalThis.fetch,
  performance: globalThis.performance,
  require: createRequire('/workspace/'),
  display,
};
const context = vm.createContext(sandbox, { name: 'airlock' });

// Top-level await, cheaply and without a parser: the snippet runs as an
// async function. Declarations at the start of a line (`let x = ...`,
// `const`, `var`) become assignments to globals so that they outlive it, and
// a last line that is an expression is returned, so that it is the value.
function wrapAsync(code) {
  const lines = code.split('\n');
  let last = lines.length - 1;
  while (last >= 0 && lines[last].trim() === '') last -= 1;
  const declaration = /^(?:let|const|var)\s+([A-Za-z_$][\w$]*)\s*=/;
  const hoisted = lines.map((line) => line.replace(declaration, '$1 ='));
  const bodies = [];
  if (last >= 0 && /^\S/.test(lines[last]) && !/^(?:let|const|var|function|class|if|for|while|do|switch|try|return|throw|import|export|async\s+function)\b|^[})\]]/.test(lines[last])) {
    const returning = hoisted.slice(0, last + 1);
    returning[last] = 'return (' + returning[last].replace(/;\s*$/, '') + ');';
    bodies.push(returning.join('\n'));
  }
  bodies.push(hoisted.join('\n'));
  for (const body of bodies) {
    try {
      return new vm.Script(`(async () => {\n${body}\n})()`, { filename: CODE_FILENAME, lineOffset: -1 });
    } catch (error) {
      // The next way, or the original error.
    }
  }
  return null;
}

function compile(code) {
  try {
    return new vm.Script(code, { filename: CODE_FILENAME });
  } catch (error) {
    if (!/\bawait\b/.test(code) || !(error && error.name === 'SyntaxError')) throw error;
    const wrapped = wrapAsync(code);
    if (wrapped === null) throw error;
    return wrapped;
  }
}

function isThenable(value) {
  try {
    return value !== null && (typeof value === 'object' || typeof value === 'function') && typeof value.then === 'function';
  } catch (error) {
    return false;
  }
}

async function evaluate(code) {
  let compiled;
  try {
    compiled = compile(code);
  } catch (error) {
    return { status: 'syntax', error: codeError(error) };
  }
  let value;
  try {
    value = compiled.runInContext(context, { displayErrors: false });
    if (isThenable(value)) value = await value;
  } catch (error) {
    return { status: 'runtime', error: codeError(error) };
  }
  const result = { status: 'ok', value: valueOf(value) };
  try {
    const rich = richData(value);
    if (Object.keys(rich).length > 0) {
      if (!('text/plain' in rich)) rich['text/plain'] = result.value.text;
      sendDisplay(rich);
    }
  } catch (error) {
    writeErr(`could not show the value: ${plain(error)}\n`);
  }
  return result;
}

// A callback's error after its evaluation ended is reported, not fatal:
// the context and its state stay.
process.on('uncaughtException', (error) => {
  writeErr(`Uncaught ${codeError(error).traceback}\n`);
});
process.on('unhandledRejection', (reason) => {
  writeErr(`Unhandled rejection: ${codeError(reason).traceback}\n`);
});

let pending = '';
const queue = [];
let busy = false;
// The host closed stdin: exit once the evaluations already asked for are done.
let closing = false;

async function drain() {
  if (busy) return;
  busy = true;
  while (queue.length > 0) {
    const line = queue.shift();
    let request;
    try {
      request = JSON.parse(line);
    } catch (error) {
      writeErr(`airlock kernel: bad request: ${error}\n`);
      continue;
    }
    if (mark === null) {
      mark = '\x1eairlock:' + String(request.nonce || '') + '\x1f';
      send({ t: 'ready', pid: process.pid });
      continue;
    }
    const result = await evaluate(String(request.code));
    try {
      send({ t: 'end', id: request.id, result });
    } catch (error) {
      send({ t: 'end', id: request.id, result: { status: 'runtime', error: codeError(error) } });
    }
    send({ t: 'end', id: request.id }, true);
  }
  busy = false;
  if (closing) process.exit(0);
}

process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf('\n')) >= 0) {
    queue.push(pending.slice(0, newline));
    pending = pending.slice(newline + 1);
  }
  drain();
});
process.stdin.on('end', () => {
  closing = true;
  if (!busy) process.exit(0);
});
