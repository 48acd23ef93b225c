// A Node parent of a Python child: `node fork_python.js script.py args...`
// forks `python3 script.py args...` (child_process.fork, execPath python),
// serves it like peer.js does, and exits with the child's exit code.
'use strict';
const {fork} = require('child_process');
const python = process.env.IPCBUS_TEST_PYTHON || 'python3';
const [script, ...args] = process.argv.slice(2);
const child = fork(script, args, {execPath: python, execArgv: []});
require('./peer_lib').serve(child, () => child.disconnect());
child.on('exit', (code, signal) => process.exit(signal ? 100 : code));
