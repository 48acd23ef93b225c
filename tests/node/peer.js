// A Node child of a Python parent (ipcbus.spawn(..., protocol="node")).
'use strict';
require('./peer_lib').serve(process);
