'use strict';
// The forked half of parent.js: streams to, or echoes for, the parent.

const [workload, nArg, sizeArg] = process.argv.slice(2);
const n = Number(nArg);
const size = Number(sizeArg || 0);

process.on('disconnect', () => process.exit(0));

if (workload === 'stream') {
  process.once('message', () => {
    // A tight loop, as an application would write it: Node queues what the
    // socket does not take at once.
    for (let i = 0; i < n; i++) {
      process.send({ op: 'put', key: 'k12345', value: 123456, ok: true, n: i });
    }
  });
} else if (workload === 'bulk') {
  const payload = Buffer.alloc(size, 0x61);
  process.once('message', () => {
    // Keep a few 1 MiB messages in flight rather than queueing all of them.
    let i = 0;
    let inflight = 0;
    const pump = () => {
      while (i < n && inflight < 8) {
        i++;
        inflight++;
        process.send(payload, () => {
          inflight--;
          pump();
        });
      }
    };
    pump();
  });
} else if (workload === 'pingpong') {
  process.on('message', (m) => process.send(m));
}
process.send('ready');
