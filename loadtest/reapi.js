// k6 load test of the Remote Execution API beyond the CAS batches, as Bazel uses it:
//
// - bytestream: upload a blob with ByteStream Write (chunked, client-streaming), read it back with
//   ByteStream Read (server-streaming) and compare.
// - actioncache: GetActionResult on an action this VU executed once (the all-hit rebuild's call).
// - execute: Execute a trivial action no one ran before (its own command line), follow the
//   operation stream to the end, check its result, then find it in the action cache.
//
//   k6 run -e TARGET=127.0.0.1:8980 -e KEY=<API key> loadtest/reapi.js
//   k6 run -e TARGET=... -e KEY=... -e SCENARIOS=execute -e VUS=8 -e DURATION=60s loadtest/reapi.js
//
// The key needs the read, write-cas and execute roles (`motorpool up` prints a developer key).
// Thresholds make k6 exit non-zero when a call fails or is slow; tune the p95s with P95_*_MS.
import grpc from 'k6/net/grpc';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const TARGET = __ENV.TARGET || '127.0.0.1:8980';
const INSTANCE = __ENV.INSTANCE || 'loadtest';
const VUS = parseInt(__ENV.VUS || '2');
const DURATION = __ENV.DURATION || '20s';
const BLOB_BYTES = parseInt(__ENV.BLOB_BYTES || String(256 * 1024));
const CHUNK_BYTES = 64 * 1024;
const RUN = __ENV.RUN_ID || String(Date.now());
const SCENARIOS = (__ENV.SCENARIOS || 'bytestream,actioncache,execute').split(',');
const PARAMS = __ENV.KEY ? { metadata: { authorization: `Bearer ${__ENV.KEY}` } } : {};

const scenario = (exec) => ({ executor: 'constant-vus', vus: VUS, duration: DURATION, exec });
const all = {
  bytestream: scenario('bytestream'),
  actioncache: scenario('actioncache'),
  execute: scenario('execute'),
};

export const options = {
  scenarios: Object.fromEntries(SCENARIOS.map((s) => [s, all[s]])),
  thresholds: {
    checks: ['rate==1'],
    'motorpool_bytestream_round_trip': [`p(95)<${__ENV.P95_BYTESTREAM_MS || '1000'}`],
    'motorpool_get_action_result': [`p(95)<${__ENV.P95_GET_ACTION_RESULT_MS || '200'}`],
    'motorpool_execute': [`p(95)<${__ENV.P95_EXECUTE_MS || '5000'}`],
  },
};

const client = new grpc.Client();
client.load(['proto'], 'cas.proto', 'reapi.proto', 'bytestream.proto');

const bytestreamRoundTrip = new Trend('motorpool_bytestream_round_trip', true);
const getActionResult = new Trend('motorpool_get_action_result', true);
const executeTime = new Trend('motorpool_execute', true);
const bytesMoved = new Counter('motorpool_bytestream_bytes');
const executed = new Counter('motorpool_actions_executed');

let connected = false;
function connect() {
  if (!connected) {
    client.connect(TARGET, { plaintext: true });
    connected = true;
  }
}

// Protobuf, by hand: the action's digest is the hash of its exact bytes.
function varint(n) {
  const out = [];
  while (n > 127) {
    out.push((n % 128) | 128);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}
const ascii = (s) => Array.from(s, (c) => c.charCodeAt(0));
const lenField = (num, bytes) => [...varint(num * 8 + 2), ...varint(bytes.length), ...bytes];
function digestBytes(d) {
  const out = lenField(1, ascii(d.hash));
  return d.size_bytes > 0 ? [...out, ...varint(16), ...varint(d.size_bytes)] : out;
}
const buffer = (bytes) => new Uint8Array(bytes).buffer;
const digestOf = (bytes) => ({ hash: crypto.sha256(buffer(bytes), 'hex'), size_bytes: bytes.length });
const EMPTY = { hash: crypto.sha256('', 'hex'), size_bytes: 0 };

// A trivial action with its own command line: stored in the CAS, its digest returned.
function storeAction(words) {
  const command = words.flatMap((w) => lenField(1, ascii(w)));
  const commandDigest = digestOf(command);
  const action = [...lenField(1, digestBytes(commandDigest)), ...lenField(2, digestBytes(EMPTY))];
  const actionDigest = digestOf(action);
  const r = client.invoke('build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs', {
    instance_name: INSTANCE,
    requests: [
      { digest: commandDigest, data: encoding.b64encode(buffer(command)) },
      { digest: actionDigest, data: encoding.b64encode(buffer(action)) },
    ],
  }, PARAMS);
  check(r, { 'action and command stored': (x) => x && x.status === grpc.StatusOK });
  return actionDigest;
}

// Executes an action; `then(ok)` runs once its operation stream ends.
function runAction(digest, then) {
  const start = Date.now();
  let last = null;
  let error = null;
  const stream = new grpc.Stream(client, 'build.bazel.remote.execution.v2.Execution/Execute', PARAMS);
  stream.on('data', (op) => { last = op; });
  stream.on('error', (e) => { error = e; });
  stream.on('end', () => {
    const response = last && last.response;
    const ok = check({ last, error, response }, {
      'Execute stream ends without an error': (x) => x.error === null,
      'the operation is done': (x) => x.last !== null && x.last.done === true,
      'the action ran and exited 0': (x) => x.response && !(x.response.status && x.response.status.code)
        && x.response.result && !x.response.result.exitCode,
    });
    executeTime.add(Date.now() - start);
    then(ok);
  });
  stream.write({ instance_name: INSTANCE, action_digest: digest });
  stream.end();
}

export function bytestream() {
  connect();
  const head = `run=${RUN} vu=${__VU} iter=${__ITER} `;
  const data = head + 'b'.repeat(Math.max(0, BLOB_BYTES - head.length));
  const digest = { hash: crypto.sha256(data, 'hex'), size_bytes: data.length };
  const start = Date.now();
  const uuid = crypto.hmac('sha256', RUN, head, 'hex').slice(0, 32);
  const upload = `${INSTANCE}/uploads/${uuid.slice(0, 8)}-${uuid.slice(8, 12)}-4${uuid.slice(13, 16)}-8${uuid.slice(17, 20)}-${uuid.slice(20, 32)}/blobs/${digest.hash}/${digest.size_bytes}`;
  const write = new grpc.Stream(client, 'google.bytestream.ByteStream/Write', PARAMS);
  let committed = null;
  let failed = null;
  write.on('data', (r) => { committed = r.committedSize; });
  write.on('error', (e) => { failed = e; });
  write.on('end', () => {
    check({ committed, failed }, {
      'ByteStream Write commits the whole blob': (x) => x.failed === null && Number(x.committed) === data.length,
    });
    const chunks = [];
    let readFailed = null;
    const read = new grpc.Stream(client, 'google.bytestream.ByteStream/Read', PARAMS);
    read.on('data', (r) => { chunks.push(r.data || ''); });
    read.on('error', (e) => { readFailed = e; });
    read.on('end', () => {
      const back = chunks.map((c) => encoding.b64decode(c, 'std', 's')).join('');
      check({ back, readFailed }, {
        'ByteStream Read returns what was written': (x) => x.readFailed === null && x.back.length === data.length
          && crypto.sha256(x.back, 'hex') === digest.hash,
      });
      bytestreamRoundTrip.add(Date.now() - start);
      bytesMoved.add(2 * data.length);
    });
    read.write({ resource_name: `${INSTANCE}/blobs/${digest.hash}/${digest.size_bytes}` });
    read.end();
  });
  for (let offset = 0; offset < data.length; offset += CHUNK_BYTES) {
    const chunk = data.slice(offset, offset + CHUNK_BYTES);
    write.write({
      resource_name: offset === 0 ? upload : '',
      write_offset: offset,
      finish_write: offset + chunk.length >= data.length,
      data: encoding.b64encode(chunk),
    });
  }
  write.end();
}

// Per VU: the action it executed, once its result is in the action cache.
let cached = null;

export function actioncache() {
  connect();
  if (cached === null) {
    const digest = storeAction(['/bin/sh', '-c', `echo k6 ${RUN} cached by vu ${__VU}`]);
    runAction(digest, (ok) => { if (ok) { cached = digest; } });
    return;
  }
  const start = Date.now();
  const r = client.invoke('build.bazel.remote.execution.v2.ActionCache/GetActionResult', {
    instance_name: INSTANCE,
    action_digest: cached,
  }, PARAMS);
  getActionResult.add(Date.now() - start);
  check(r, { 'GetActionResult finds the result': (x) => x && x.status === grpc.StatusOK && !x.message.exitCode });
}

export function execute() {
  connect();
  const digest = storeAction(['/bin/sh', '-c', `echo k6 ${RUN} vu ${__VU} iter ${__ITER}`]);
  runAction(digest, (ok) => {
    executed.add(1);
    if (!ok) {
      return;
    }
    const r = client.invoke('build.bazel.remote.execution.v2.ActionCache/GetActionResult', {
      instance_name: INSTANCE,
      action_digest: digest,
    }, PARAMS);
    check(r, { 'an executed action is in the action cache': (x) => x && x.status === grpc.StatusOK });
  });
}
