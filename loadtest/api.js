// k6 load test of the platform's JSON API, what the web UI's pages and people's scripts read:
// queues and workers (the dashboards' polling), shards, invocations, alerts, drives, image builds
// and labels, each at a fixed total rate spread over the endpoints.
//
//   k6 run -e TARGET=http://127.0.0.1:8080 -e KEY=<API key> loadtest/api.js
//   k6 run ... -e RATE=200 -e DURATION=60s loadtest/api.js
//
// Thresholds make k6 exit non-zero when a read fails or is slow (P95_MS, default 200).
import http from 'k6/http';
import { check } from 'k6';

const TARGET = __ENV.TARGET || 'http://127.0.0.1:8080';
const RATE = parseInt(__ENV.RATE || '50');
const PATHS = [
  '/api/v1/queues',
  '/api/v1/workers',
  '/api/v1/shards',
  '/api/v1/invocations',
  '/api/v1/alerts',
  '/api/v1/drives',
  '/api/v1/image-builds',
  '/api/v1/labels',
];

export const options = {
  scenarios: {
    reads: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '20s',
      preAllocatedVUs: Math.max(5, Math.ceil(RATE / 10)),
      maxVUs: Math.max(20, RATE),
    },
  },
  thresholds: {
    checks: ['rate==1'],
    dropped_iterations: ['count==0'],
    'http_req_duration{expected_response:true}': [`p(95)<${__ENV.P95_MS || '200'}`],
  },
};

const headers = __ENV.KEY ? { Authorization: `Bearer ${__ENV.KEY}` } : {};

export default function () {
  const path = PATHS[__ITER % PATHS.length];
  const r = http.get(`${TARGET}${path}`, { headers, tags: { name: path } });
  check(r, {
    'answered 200': (x) => x.status === 200,
    'answered JSON': (x) => {
      try {
        x.json();
        return true;
      } catch (e) {
        return false;
      }
    },
  });
}
