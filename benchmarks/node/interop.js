'use strict';
// Node's half of bench_node.py. Two roles:
//
//   node interop.js child                  the peer: a Node child, of a Node
//                                          parent or of a Python (ipcbus) one
//   node interop.js parent WORKLOAD N      Node <-> Node: forks `interop.js
//                                          child`, times WORKLOAD, prints JSON
//
// Workloads (messages as in node-ipc.md §8: {t:'d', i, s:'hello'} streamed,
// {t:'ping', i} / {t:'pong', i} for ping-pong):
//   from-child   the child streams N messages to the parent (a tight loop)
//   to-child     the parent streams N messages to the child, which answers
//                {done: N} once it has parsed them all
//   pingpong     N round trips
const { fork } = require('child_process');

const now = () => Number(process.hrtime.bigint()) / 1e9;

function child() {
  let sink = 0;
  let expected = 0;
  process.on('disconnect', () => process.exit(0));
  process.on('message', (m) => {
    if (m.t === 'd') {
      if (++sink === expected) process.send({ done: sink });
    } else if (m.t === 'ping') {
      process.send({ t: 'pong', i: m.i });
    } else if (m.op === 'stream') {
      for (let i = 0; i < m.n; i++) process.send({ t: 'd', i, s: 'hello' });
    } else if (m.op === 'sink') {
      sink = 0;
      expected = m.n;
      process.send({ sinking: m.n });
    }
  });
  process.send('ready');
}

function parent(workload, n) {
  const c = fork(__filename, ['child'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const done = (seconds) => {
    process.stdout.write(JSON.stringify({ seconds, n }) + '\n');
    c.disconnect();
  };
  let t0 = 0;
  let count = 0;
  let i = 0;
  c.on('message', (m) => {
    if (m === 'ready') {
      t0 = now();
      if (workload === 'from-child') c.send({ op: 'stream', n });
      else if (workload === 'to-child') c.send({ op: 'sink', n });
      else c.send({ t: 'ping', i: i++ });
      return;
    }
    if (workload === 'from-child') {
      if (++count === n) done(now() - t0);
    } else if (workload === 'to-child') {
      if (m.sinking !== undefined) {
        for (let j = 0; j < n; j++) c.send({ t: 'd', i: j, s: 'hello' });
      } else if (m.done === n) {
        done(now() - t0);
      }
    } else if (i === n) {
      done(now() - t0);
    } else {
      c.send({ t: 'ping', i: i++ });
    }
  });
}

const [role, workload, nArg] = process.argv.slice(2);
if (role === 'child') child();
else parent(workload, Number(nArg));
