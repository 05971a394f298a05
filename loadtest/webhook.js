// k6 load test of the CI front door: signed GitHub pull-request events at a fixed rate, each a
// new delivery, so each queues jobs (verified, deduplicated, written to JetStream) before the
// answer. The latency threshold is the webhook-to-job-queued time a forge sees.
//
//   k6 run -e TARGET=http://127.0.0.1:8090 -e PROJECT=av/monorepo -e SECRET=<the project's secret> loadtest/webhook.js
//   k6 run ... -e RATE=200 -e DURATION=30s loadtest/webhook.js
//
// The project must be a GitHub one in the webhook's projects file. Thresholds make k6 exit
// non-zero when events are refused or slow.
import http from 'k6/http';
import crypto from 'k6/crypto';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const TARGET = __ENV.TARGET || 'http://127.0.0.1:8090';
const PROJECT = __ENV.PROJECT || 'av/monorepo';
const SECRET = __ENV.SECRET || '';
const RATE = parseInt(__ENV.RATE || '200');

export const options = {
  scenarios: {
    events: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '20s',
      preAllocatedVUs: Math.max(10, Math.ceil(RATE / 10)),
      maxVUs: Math.max(50, RATE),
    },
  },
  thresholds: {
    checks: ['rate==1'],
    'http_req_duration{expected_response:true}': [`p(99)<${__ENV.P99_MS || '20'}`],
    dropped_iterations: ['count==0'],
  },
};

const queued = new Counter('motorpool_ci_jobs_queued');

export default function () {
  const n = __VU * 1000000 + __ITER;
  const sha = crypto.sha1(`commit ${n}`, 'hex');
  const body = JSON.stringify({
    action: 'synchronize',
    number: 1 + (n % 500),
    pull_request: { head: { sha, ref: `feature-${n % 500}` }, base: { ref: 'main' }, labels: [] },
    repository: { full_name: PROJECT, clone_url: 'https://forge.invalid/repo.git' },
    sender: { login: 'k6' },
  });
  const res = http.post(`${TARGET}/hooks/${PROJECT}`, body, {
    headers: {
      'Content-Type': 'application/json',
      'X-GitHub-Event': 'pull_request',
      'X-GitHub-Delivery': `k6-${__VU}-${__ITER}-${Date.now()}`,
      'X-Hub-Signature-256': `sha256=${crypto.hmac('sha256', SECRET, body, 'hex')}`,
    },
  });
  const ok = check(res, { 'event queued jobs (201)': (r) => r.status === 201 });
  if (ok) {
    queued.add(res.json('jobs').length);
  }
}
