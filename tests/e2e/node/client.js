#!/usr/bin/env node
// Scriptable WebSocket client on the npm `ws` package, for gaia-gateway e2e tests.
//
//   node client.js URL [--protocol P]... [--header "Name: value"]... [--ca FILE]
//                      [--insecure] [--deflate | --no-deflate] [--timeout MS]
//
// Env equivalents (argv wins): WS_PROTOCOLS="a,b", WS_HEADERS='{"Authorization":"Bearer x"}',
// WS_CA=FILE, WS_INSECURE=1, WS_PERMESSAGE_DEFLATE=0|1, WS_HANDSHAKE_TIMEOUT=MS.
//
// stdin: JSON lines  {"op":"send","text":"..."} | {"op":"send","binary_b64":"..."}
//                    {"op":"close","code":N,"reason":"..."} | {"op":"ping","data":"..."}
//                    {"op":"terminate"}
// stdout: JSON lines {"event":"open","protocol":"...","extensions":"..."}
//                    {"event":"message","text":"..."} | {"event":"message","binary_b64":"..."}
//                    {"event":"ping","data":"..."} | {"event":"pong","data":"..."}
//                    {"event":"unexpected-response","status":N,"headers":{...},"body":"..."}
//                    {"event":"error","message":"..."} | {"event":"close","code":N,"reason":"..."}
// Commands sent before 'open' are queued.  stdin EOF closes the socket with 1000 (after the
// queued commands).  The process exits after the close event.
'use strict';

const fs = require('fs');
const readline = require('readline');
const WebSocket = require('ws');

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function usage(message) {
  process.stderr.write(`client.js: ${message}\nusage: node client.js URL [--protocol P]... ` +
    '[--header "Name: value"]... [--ca FILE] [--insecure] [--deflate|--no-deflate] ' +
    '[--timeout MS]\n');
  process.exit(2);
}

function parseArgs(argv) {
  const env = process.env;
  const opts = {
    url: null,
    protocols: env.WS_PROTOCOLS ? env.WS_PROTOCOLS.split(',').map((p) => p.trim()).filter(Boolean) : [],
    headers: env.WS_HEADERS ? JSON.parse(env.WS_HEADERS) : {},
    ca: env.WS_CA || null,
    insecure: env.WS_INSECURE === '1',
    deflate: env.WS_PERMESSAGE_DEFLATE ? env.WS_PERMESSAGE_DEFLATE !== '0' : true,
    timeout: env.WS_HANDSHAKE_TIMEOUT ? Number(env.WS_HANDSHAKE_TIMEOUT) : 10000,
  };
  let argProtocols = null;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--protocol') (argProtocols = argProtocols || []).push(value());
    else if (arg === '--header') {
      const header = value();
      const colon = header.indexOf(':');
      if (colon <= 0) usage(`bad header ${JSON.stringify(header)}`);
      opts.headers[header.slice(0, colon).trim()] = header.slice(colon + 1).trim();
    } else if (arg === '--ca') opts.ca = value();
    else if (arg === '--insecure') opts.insecure = true;
    else if (arg === '--deflate') opts.deflate = true;
    else if (arg === '--no-deflate') opts.deflate = false;
    else if (arg === '--timeout') opts.timeout = Number(value());
    else if (arg.startsWith('--')) usage(`unknown option ${arg}`);
    else if (opts.url === null) opts.url = arg;
    else usage(`unexpected argument ${arg}`);
  }
  if (argProtocols) opts.protocols = argProtocols;
  if (!opts.url) usage('missing URL');
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const wsOptions = {
  headers: opts.headers,
  perMessageDeflate: opts.deflate,
  handshakeTimeout: opts.timeout,
};
if (opts.ca) wsOptions.ca = fs.readFileSync(opts.ca);
if (opts.insecure) wsOptions.rejectUnauthorized = false;

const ws = new WebSocket(opts.url, opts.protocols, wsOptions);
let suppressErrors = false;

ws.on('open', () => emit({ event: 'open', protocol: ws.protocol, extensions: ws.extensions }));
ws.on('message', (data, isBinary) => {
  const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
  if (isBinary) emit({ event: 'message', binary_b64: buf.toString('base64') });
  else emit({ event: 'message', text: buf.toString('utf8') });
});
ws.on('ping', (data) => emit({ event: 'ping', data: data.toString('utf8') }));
ws.on('pong', (data) => emit({ event: 'pong', data: data.toString('utf8') }));
ws.on('unexpected-response', (req, res) => {
  const chunks = [];
  res.on('data', (chunk) => chunks.push(chunk));
  res.on('end', () => {
    emit({
      event: 'unexpected-response',
      status: res.statusCode,
      headers: res.headers,
      body: Buffer.concat(chunks).toString('utf8'),
    });
    suppressErrors = true; // terminate() reports "closed before the connection was established"
    ws.terminate();
  });
});
ws.on('error', (err) => {
  if (!suppressErrors) emit({ event: 'error', message: err.message });
});
ws.on('close', (code, reason) => {
  // Pipes to stdout are synchronous on POSIX; exit from the write callback regardless.
  process.stdout.write(JSON.stringify({ event: 'close', code, reason: reason.toString('utf8') }) + '\n',
    () => process.exit(0));
});

function run(cmd) {
  switch (cmd.op) {
    case 'send':
      if (typeof cmd.binary_b64 === 'string') ws.send(Buffer.from(cmd.binary_b64, 'base64'), { binary: true });
      else ws.send(String(cmd.text ?? ''), { binary: false });
      break;
    case 'close':
      ws.close(cmd.code, cmd.reason);
      break;
    case 'ping':
      ws.ping(cmd.data === undefined ? undefined : String(cmd.data));
      break;
    case 'terminate':
      ws.terminate();
      break;
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

// Commands that arrive while the handshake is in flight are queued until 'open'.
let pending = [];
ws.on('open', () => {
  const queued = pending;
  pending = null;
  queued.forEach(dispatch);
});
ws.on('close', () => { pending = null; });

function dispatch(cmd) {
  try {
    run(cmd);
  } catch (err) {
    emit({ event: 'error', message: `command failed: ${err.message}`, command: cmd });
  }
}

function submit(cmd) {
  if (pending && cmd.op !== 'terminate' && ws.readyState === WebSocket.CONNECTING) pending.push(cmd);
  else dispatch(cmd);
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    emit({ event: 'error', message: `bad command: ${err.message}`, command: line });
    return;
  }
  submit(cmd);
});
rl.on('close', () => {
  if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
    submit({ op: 'close', code: 1000 });
  }
});
