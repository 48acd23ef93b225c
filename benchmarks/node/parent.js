'use strict';
// Node's own child_process IPC, measured the way bench_messages.py measures
// the Python contenders: the parent forks child.js, waits until it is ready,
// then times the workload. Prints one JSON line with the result.
//
//   node parent.js stream N      child -> parent, N small objects (json)
//   node parent.js pingpong N    N round trips of a small object (json)
//   node parent.js bulk N SIZE   child -> parent, N Buffers of SIZE bytes (advanced)

const { fork } = require('child_process');
const path = require('path');

const [workload, nArg, sizeArg] = process.argv.slice(2);
const n = Number(nArg);
const size = Number(sizeArg || 0);
const serialization = workload === 'bulk' ? 'advanced' : 'json';
const child = fork(path.join(__dirname, 'child.js'), [workload, String(n), String(size)], {
  serialization,
  stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
});

function done(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
  child.disconnect();
}

const now = () => Number(process.hrtime.bigint()) / 1e9;
let t0 = 0;

if (workload === 'stream' || workload === 'bulk') {
  let count = 0;
  let nbytes = 0;
  child.on('message', (m) => {
    if (t0 === 0) {
      // The child's "ready": start the clock and ask for the stream.
      t0 = now();
      child.send('go');
      return;
    }
    count++;
    if (workload === 'bulk') nbytes += m.length;
    if (count === n) {
      const seconds = now() - t0;
      done({ seconds, n, bytes: nbytes });
    }
  });
} else if (workload === 'pingpong') {
  const warmup = Math.max(10, Math.floor(n / 100));
  const lat = new Float64Array(n);
  let i = -warmup;
  let sent = 0;
  let start = 0;
  const ping = () => {
    sent = now();
    child.send({ op: 'put', key: 'k12345', value: 123456, ok: true, n: i });
  };
  child.on('message', (m) => {
    if (m === 'ready') {
      ping();
      return;
    }
    if (i >= 0) lat[i] = now() - sent;
    i++;
    if (i === 0) start = now();
    if (i === n) {
      const seconds = now() - start;
      done({ seconds, n, latencies: Array.from(lat) });
      return;
    }
    ping();
  });
} else {
  console.error(`unknown workload ${workload}`);
  process.exit(2);
}
