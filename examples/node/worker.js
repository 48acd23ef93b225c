// Node worker of examples/node/master.py: gets the shared listening socket
// from the Python master over Node's own IPC channel (process.send /
// 'message'), answers every HTTP request with its runtime name and pid, and
// reports each one to the master.
'use strict';
const http = require('http');

const app = http.createServer((req, res) => {
  res.writeHead(200, {'Content-Type': 'text/plain', 'Connection': 'close'});
  res.end(`node ${process.pid}\n`);
  report({served: req.url, runtime: 'node', pid: process.pid});
});

// A stopping master closes the channel while a request may still be
// answered: the report is moot then. The callback takes the send's error
// (EPIPE, ERR_IPC_CHANNEL_CLOSED), which would otherwise be an unhandled
// 'error' event and end us with status 1.
function report(msg) {
  if (process.connected) process.send(msg, () => {});
}

let listening = null;

function stop() {
  if (listening) listening.close();
  app.close();
  if (process.connected) process.disconnect();
  // Connections still open (a slow client) must not keep us alive.
  setTimeout(() => process.exit(0), 2000).unref();
}

// The master closed the channel, or died: leave too.
process.on('disconnect', stop);

process.on('message', (msg, handle) => {
  if (handle) {
    // A net.Server already listening on the master's socket: hand each
    // connection it accepts to the HTTP server.
    listening = handle;
    listening.on('connection', (sock) => app.emit('connection', sock));
    process.send({ready: 'node', pid: process.pid});
  } else if (msg && msg.op === 'stop') {
    stop();
  }
});

// Ctrl-C reaches the master only (it starts us in our own session); if we
// are signalled anyway, leave quietly.
process.on('SIGINT', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));
