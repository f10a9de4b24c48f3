// Unit tests of the panel's pure functions (src/format.ts), on the compiled lib/format.js:
// `npm test` (tsc, then node's own test runner; no other toolchain).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bytes, clientCode, engineText, parseOptions, secs, stateClass } from '../lib/format.js';

test('bytes: binary units, one decimal under 10', () => {
  assert.equal(bytes(null), '');
  assert.equal(bytes(undefined), '');
  assert.equal(bytes(0), '0 B');
  assert.equal(bytes(1023), '1023 B');
  assert.equal(bytes(1536), '1.5 kB');
  assert.equal(bytes(230 * 1024 * 1024), '230 MB');
  assert.equal(bytes(3 * 1024 ** 5), '3072 TB');
});

test('secs: seconds, minutes and seconds, hours', () => {
  assert.equal(secs(0), '0 s');
  assert.equal(secs(59.4), '59 s');
  assert.equal(secs(185), '3 min 5 s');
  assert.equal(secs(5400), '1.5 h');
});

const engine = {
  id: 2,
  state: 'busy',
  running: 'import time\ntime.sleep(60)',
  busy_since: 1000,
  pid: 1,
  host: 'box',
  rss: 50 * 1024 * 1024,
  cpu: 0,
  dead: null,
  local: true
};

test('engineText: first line and elapsed time of a busy engine, memory, remote host', () => {
  assert.equal(engineText(engine, 1065), 'import time (1 min 5 s) · 50 MB');
  assert.equal(engineText({ ...engine, busy_since: 1100 }, 1065), 'import time (0 s) · 50 MB');
  assert.equal(engineText({ ...engine, state: 'idle', busy_since: null }, 1065), 'idle · 50 MB');
  assert.equal(
    engineText({ ...engine, state: 'dead', rss: null, local: false, host: 'node7' }, 0),
    'dead · node7'
  );
});

test('stateClass: known states colour the dot, anything else is unknown', () => {
  assert.equal(stateClass('idle'), 'ipme-state-idle');
  assert.equal(stateClass('dead'), 'ipme-state-dead');
  assert.equal(stateClass('restarting'), 'ipme-state-unknown');
});

test('clientCode: a shared cluster by profile, an embedded one by its file', () => {
  const c = { id: 'x', file: '/r/embedded-1.json', profile: 'p"q', shared: true };
  assert.equal(
    clientCode(c),
    'from ipy_multiengine import client\nmec = client.MultiEngineClient(profile="p\\"q")\nmec.activate()'
  );
  assert.match(clientCode({ ...c, shared: false }), /MultiEngineClient\("\/r\/embedded-1.json"\)/);
});

test('parseOptions: key=value lines, JSON values where they parse, errors name the line', () => {
  assert.deepEqual(parseOptions(''), {});
  assert.deepEqual(parseOptions(' hosts = ["a", "b"]\n\nnodes=2\npartition=debug\n'), {
    hosts: ['a', 'b'],
    nodes: 2,
    partition: 'debug'
  });
  assert.throws(() => parseOptions('nodes=2\noops'), /option line 2 \("oops"\): expected key=value/);
  assert.throws(() => parseOptions('=1'), /option line 1/);
});
