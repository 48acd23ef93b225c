// The Node side of the interop tests: serve(channel) answers requests from a
// Python peer over `channel`, which is `process` (Node is the child) or a
// ChildProcess (Node is the parent). Requests are {op: ...} messages; a
// message that arrives with a handle is exercised according to its kind.
'use strict';
const net = require('net');
const dgram = require('dgram');

function serve(channel, onExit) {
  const kept = {};  // our copies of handles we sent, closed on request
  const send = (msg, handle, cb) => channel.send(msg, handle, cb);

  function gotHandle(msg, handle) {
    if (handle instanceof net.Server) {
      // Serve one connection on the listening socket Python sent.
      handle.once('connection', (conn) => {
        conn.end(`node ${process.pid} ${msg.tag}\n`);
        handle.close(() => send({served: msg.tag}));
      });
      send({got: 'net.Server', tag: msg.tag, listening: handle.listening});
    } else if (handle instanceof net.Socket) {
      handle.setEncoding('utf8');
      handle.write(`hello from node ${process.pid}\n`);
      let data = '';
      handle.on('data', (d) => {
        data += d;
        if (data.endsWith('\n')) { handle.end(`echo:${data}`); }
      });
      handle.on('close', () => send({socket_closed: data}));
      send({got: 'net.Socket', tag: msg.tag});
    } else if (handle instanceof dgram.Socket) {
      handle.once('message', (buf, rinfo) => {
        handle.send(`node:${buf}`, rinfo.port, rinfo.address, () => {
          handle.close();
          send({dgram_answered: String(buf)});
        });
      });
      send({got: 'dgram.Socket', tag: msg.tag, address: handle.address()});
    } else {
      send({got: handle ? handle.constructor.name : null, tag: msg.tag});
    }
  }

  const ops = {
    echo(msg) { send({echo: msg.data}); },
    'echo-all'(msg) { send({echo: msg}); },
    stream(msg) {
      for (let i = 0; i < msg.n; i++) send({i, s: 'x\u2028y'});
      send({done: msg.n});
    },
    // Python streams msg.n messages {i}; count them and check the order.
    expect(msg) {
      let next = 0, bad = null;
      const listener = (m) => {
        if (m && m.op === 'expect-end') {
          channel.removeListener('message', listener);
          send({received: next, bad});
        } else if (m && typeof m.i === 'number') {
          if (m.i !== next && bad === null) bad = {expected: next, got: m.i};
          next++;
        }
      };
      channel.on('message', listener);
      send({ready: true});
    },
    internal() {
      send({cmd: 'NODE_PRIVATE', secret: 1});
      send({cmd: 'NODE_HANDLE_BOGUS_BUT_INTERNAL'});
      send({cmd: 'NODE_'});  // exactly the prefix: an ordinary message
      send({after: 'internal'});
    },
    'send-server'(msg) {
      const srv = net.createServer();
      srv.listen(0, '127.0.0.1', () => {
        kept.server = srv;
        send({kind: 'net.Server', port: srv.address().port}, srv);
        send({after: 'net.Server'});  // must arrive after the handle
      });
    },
    'send-socket'(msg) {
      // pauseOnConnect: Node must not read what is meant for Python.
      const srv = net.createServer({pauseOnConnect: true});
      srv.once('connection', (conn) => {
        // The socket comes from a server, so its envelope has a key: Node
        // then asks the receiver for counts (getConnections) and, on
        // close(), waits for its NODE_SOCKET_ALL_CLOSED.
        kept.socketServer = srv;
        send({kind: 'net.Socket'}, conn);
        send({after: 'net.Socket'});
      });
      srv.listen(0, '127.0.0.1', () => {
        const client = net.connect(srv.address().port, '127.0.0.1', () => client.write('ping\n'));
        client.setEncoding('utf8');
        let got = '';
        client.on('data', (d) => { got += d; });
        client.on('end', () => { client.end(); send({client_got: got}); });
      });
    },
    count() {
      kept.socketServer.getConnections((err, n) => send({count: n, err: err ? String(err) : null}));
    },
    'send-dgram'() {
      const sock = dgram.createSocket('udp4');
      sock.bind(0, '127.0.0.1', () => {
        kept.dgram = sock;
        send({kind: 'dgram.Socket', port: sock.address().port}, sock);
        send({after: 'dgram.Socket'});
      });
    },
    'close-kept'(msg) {
      const h = kept[msg.which];
      delete kept[msg.which];
      h.close(() => send({closed: msg.which}));
    },
    exit() {
      if (onExit) onExit(); else { channel.disconnect(); }
    },
  };

  channel.on('message', (msg, handle) => {
    if (handle) return gotHandle(msg, handle);
    if (msg && typeof msg.op === 'string' && ops[msg.op]) return ops[msg.op](msg);
  });
}

module.exports = {serve};
