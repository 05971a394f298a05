// k6 load test of the CAS as Bazel uses it: FindMissingBlobs for a batch of digests, upload the
// missing ones with BatchUpdateBlobs, read them back with BatchReadBlobs and compare.
//
//   k6 run -e TARGET=127.0.0.1:8980 -e KEY=<API key> loadtest/cas.js
//   k6 run -e TARGET=127.0.0.1:8980 -e KEY=<API key> -e VUS=8 -e DURATION=60s -e BLOBS=200 -e BLOB_BYTES=4096 loadtest/cas.js
//
// Thresholds make k6 exit non-zero when the service errs or is slow; see the summary it prints.
import grpc from 'k6/net/grpc';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const TARGET = __ENV.TARGET || '127.0.0.1:8980';
const BLOBS = parseInt(__ENV.BLOBS || '100');
const BLOB_BYTES = parseInt(__ENV.BLOB_BYTES || '2048');
const INSTANCE = __ENV.INSTANCE || 'loadtest';
// Blobs differ from run to run, so a second run against the same stack uploads new ones too.
const RUN = __ENV.RUN_ID || String(Date.now());
// An API key with the read and write-cas roles (`motorpool up` prints its developer key).
const PARAMS = __ENV.KEY ? { metadata: { authorization: `Bearer ${__ENV.KEY}` } } : {};

export const options = {
  vus: parseInt(__ENV.VUS || '4'),
  duration: __ENV.DURATION || '20s',
  thresholds: {
    checks: ['rate==1'],
    grpc_req_duration: ['p(95)<500'],
  },
};

const client = new grpc.Client();
client.load(['proto'], 'cas.proto');

const blobsUploaded = new Counter('motorpool_blobs_uploaded');
const roundTrip = new Trend('motorpool_cas_round_trip', true);

function blob(vu, iter, i) {
  // Unique content per VU, iteration and index, padded to BLOB_BYTES.
  const head = `run=${RUN} vu=${vu} iter=${iter} i=${i} `;
  return head + 'x'.repeat(Math.max(0, BLOB_BYTES - head.length));
}

export default function () {
  if (__ITER === 0) {
    client.connect(TARGET, { plaintext: true });
  }
  const start = Date.now();
  const blobs = [];
  for (let i = 0; i < BLOBS; i++) {
    const data = blob(__VU, __ITER, i);
    blobs.push({ data, digest: { hash: crypto.sha256(data, 'hex'), size_bytes: data.length } });
  }
  const digests = blobs.map((b) => b.digest);

  const missing = client.invoke('build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs', {
    instance_name: INSTANCE,
    blob_digests: digests,
  }, PARAMS);
  check(missing, { 'FindMissingBlobs OK': (r) => r && r.status === grpc.StatusOK });
  const missingSet = new Set(((missing.message || {}).missingBlobDigests || []).map((d) => d.hash));
  check(missingSet, { 'new blobs are reported missing': (s) => s.size === BLOBS });

  const update = client.invoke('build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs', {
    instance_name: INSTANCE,
    requests: blobs
      .filter((b) => missingSet.has(b.digest.hash))
      .map((b) => ({ digest: b.digest, data: encoding.b64encode(b.data) })),
  }, PARAMS);
  check(update, {
    'BatchUpdateBlobs OK': (r) => r && r.status === grpc.StatusOK,
    'every blob stored': (r) => r && r.message.responses.every((x) => !x.status || !x.status.code),
  });
  blobsUploaded.add(missingSet.size);

  const read = client.invoke('build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs', {
    instance_name: INSTANCE,
    digests,
  }, PARAMS);
  check(read, {
    'BatchReadBlobs OK': (r) => r && r.status === grpc.StatusOK,
    'read back what was written': (r) =>
      r && r.message.responses.every((x, i) => encoding.b64decode(x.data, 'std', 's') === blobs[i].data),
  });
  roundTrip.add(Date.now() - start);
}

export function teardown() {
  client.close();
}
