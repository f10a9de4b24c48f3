/**
 * What the Engines panel shows, as pure functions of the server's snapshot (no DOM, no
 * JupyterLab): unit-tested with `node --test` on the compiled module (test/format.test.mjs).
 */

/** One engine row of GET ipy_multiengine/api/clusters. */
export interface IEngine {
  id: number;
  state: string;
  running: string;
  busy_since: number | null;
  pid: number | null;
  host: string;
  rss: number | null;
  cpu: number | null;
  dead: string | null;
  local: boolean;
}

/** One cluster of GET ipy_multiengine/api/clusters. */
export interface ICluster {
  id: string;
  file: string;
  profile: string;
  shared: boolean;
  state: string;
  owner: string;
  remote: boolean;
  can: string[];
  engines: IEngine[];
}

/** A size in bytes, in binary units: `512 B`, `1.5 kB`, `230 MB`; '' for none. */
export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

/** An elapsed time: `42 s`, `3 min 5 s`, `1.5 h`. */
export function secs(s: number): string {
  if (s < 60) {
    return `${s.toFixed(0)} s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  }
  return `${(s / 3600).toFixed(1)} h`;
}

/** The text of an engine's row at server time `now` (s): the first line of what a busy
 * engine runs and for how long, else its state; its memory; its host when not this one. */
export function engineText(e: IEngine, now: number): string {
  const first = (e.running || '').split('\n')[0];
  const elapsed = e.busy_since ? secs(Math.max(0, now - e.busy_since)) : '';
  return [
    e.state === 'busy' ? `${first}${elapsed ? ` (${elapsed})` : ''}` : e.state,
    bytes(e.rss),
    e.local ? '' : e.host
  ]
    .filter(Boolean)
    .join(' · ');
}

/** The CSS class giving a row its dot's colour (green idle, amber busy, red dead/stale). */
export function stateClass(state: string): string {
  const known = ['idle', 'busy', 'dead', 'stale'];
  return `ipme-state-${known.includes(state) ? state : 'unknown'}`;
}

/** The code that connects a notebook to this cluster. */
export function clientCode(c: ICluster): string {
  const how = c.shared ? `profile=${JSON.stringify(c.profile)}` : JSON.stringify(c.file);
  return `from ipy_multiengine import client\nmec = client.MultiEngineClient(${how})\nmec.activate()`;
}

/** Launcher options typed one per line as `key=value` (the value JSON when it parses, else a
 * string, as `ipmulti start -o`): an object, or an Error naming the line that is not. */
export function parseOptions(text: string): Record<string, unknown> {
  const options: Record<string, unknown> = {};
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (!line) {
      continue;
    }
    const eq = line.indexOf('=');
    if (eq <= 0) {
      throw new Error(`option line ${i + 1} (${JSON.stringify(line)}): expected key=value`);
    }
    const value = line.slice(eq + 1).trim();
    let parsed: unknown = value;
    try {
      parsed = JSON.parse(value);
    } catch {
      // not JSON: a string, as on the command line
    }
    options[line.slice(0, eq).trim()] = parsed;
  }
  return options;
}
