/**
 * The Engines panel: every cluster of this user and its engines, live, with interrupt,
 * restart, stop, "insert client code" and "open console" actions, and a form that starts a
 * shared cluster. Everything goes through
 * the server extension's REST API (ipy_multiengine/api/), never through a notebook kernel, so
 * it works while the notebook runs a long %%px cell.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { clientCode, engineText, ICluster, IEngine, parseOptions, stateClass } from './format';

export { clientCode } from './format';

const POLL_MS = 1000;

const ICON = new LabIcon({
  name: 'ipy_multiengine:engines',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<rect x="2" y="3" width="9" height="8" rx="1"/><rect x="13" y="3" width="9" height="8" rx="1"/>' +
    '<rect x="2" y="13" width="9" height="8" rx="1"/><rect x="13" y="13" width="9" height="8" rx="1"/></g></svg>'
});

interface ISnapshot {
  clusters: ICluster[];
  launchers?: string[];
  now: number;
}

/** A request to the server extension; throws an Error with the server's message. */
async function api(path: string, body?: unknown): Promise<any> {
  const settings = ServerConnection.makeSettings();
  const url = `${settings.baseUrl}ipy_multiengine/api/${path}`;
  const init: RequestInit =
    body === undefined ? { method: 'GET' } : { method: 'POST', body: JSON.stringify(body) };
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  let data: any = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text };
  }
  if (!response.ok) {
    throw new Error(data.message || data.reason || `${response.status} ${response.statusText}`);
  }
  return data;
}

function el(tag: string, attrs: Record<string, string> = {}, text = ''): HTMLElement {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, v);
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

class EnginesPanel extends Widget {
  constructor(
    private app: JupyterFrontEnd,
    private notebooks: INotebookTracker | null
  ) {
    super();
    this.id = 'ipy_multiengine-engines';
    this.addClass('ipme-panel');
    this.title.icon = ICON;
    this.title.caption = 'Engines (ipy_multiengine)';
    this.node.appendChild(el('h2', {}, 'Engines'));
    this.status = el('div', { class: 'ipme-note', 'data-ipme': 'status' });
    this.list = el('div', { 'data-ipme': 'clusters' });
    this.form = this.startForm();
    this.node.append(this.status, this.list, this.form);
    void this.poll();
  }

  /** "Start a cluster": engines, profile, kernelspec, launcher and its options. */
  private startForm(): HTMLElement {
    const box = el('details', { class: 'ipme-start', 'data-ipme': 'start-form' });
    box.appendChild(el('summary', {}, 'Start a cluster'));
    const form = el('form', {}) as HTMLFormElement;
    const field = (label: string, input: HTMLElement): void => {
      const l = el('label', {}, label);
      l.appendChild(input);
      form.appendChild(l);
    };
    field('Engines', el('input', { name: 'n', type: 'number', min: '1', max: '256', value: '4' }));
    field('Profile', el('input', { name: 'profile', type: 'text', value: 'default' }));
    this.kernels = el('select', { name: 'kernel' }) as HTMLSelectElement;
    field('Kernel', this.kernels);
    this.launchers = el('select', { name: 'launcher' }) as HTMLSelectElement;
    this.launchers.appendChild(el('option', { value: 'local' }, 'local'));
    field('Launcher', this.launchers);
    field(
      'Options',
      el('textarea', { name: 'options', rows: '2', placeholder: 'key=value, one a line' })
    );
    const submit = el('button', { type: 'submit', 'data-action': 'start' }, 'Start');
    form.appendChild(submit);
    form.addEventListener('submit', event => {
      event.preventDefault();
      void this.start(form, submit as HTMLButtonElement);
    });
    box.appendChild(form);
    const specs = this.app.serviceManager.kernelspecs;
    const fill = (): void => {
      const names = Object.keys(specs.specs?.kernelspecs ?? {}).sort();
      const chosen = this.kernels.value || specs.specs?.default || 'python3';
      this.kernels.replaceChildren(...names.map(k => el('option', { value: k }, k)));
      this.kernels.value = names.includes(chosen) ? chosen : names[0] ?? '';
    };
    void specs.ready.then(fill);
    specs.specsChanged.connect(fill);
    return box;
  }

  private async start(form: HTMLFormElement, submit: HTMLButtonElement): Promise<void> {
    const value = (name: string): string =>
      (form.elements.namedItem(name) as HTMLInputElement).value.trim();
    let options: Record<string, unknown>;
    try {
      options = parseOptions(value('options'));
    } catch (err) {
      this.status.textContent = `Start a cluster: ${(err as Error).message}`;
      this.status.classList.add('ipme-error');
      return;
    }
    const n = Number(value('n'));
    const profile = value('profile') || 'default';
    const body = { n, profile, kernel: value('kernel'), launcher: value('launcher'), options };
    submit.disabled = true;
    try {
      await this.act(`Start cluster ${profile} (${n} engines)`, 'clusters', body);
    } finally {
      submit.disabled = false;
    }
  }

  private showLaunchers(names: string[] | undefined): void {
    if (!names || JSON.stringify(names) === this.launcherNames) {
      return;
    }
    this.launcherNames = JSON.stringify(names);
    const chosen = this.launchers.value || 'local';
    this.launchers.replaceChildren(...names.map(k => el('option', { value: k }, k)));
    this.launchers.value = names.includes(chosen) ? chosen : names[0];
  }

  dispose(): void {
    if (this.timer !== undefined) {
      window.clearTimeout(this.timer);
    }
    super.dispose();
  }

  private async poll(): Promise<void> {
    if (this.isDisposed) {
      return;
    }
    try {
      const snap: ISnapshot = await api('clusters');
      this.render(snap);
      this.showLaunchers(snap.launchers);
      if (!this.message) {
        // an action's outcome stays shown; only the panel's own notes come and go
        if (!snap.clusters.length) {
          this.note('No cluster: start one with `ipmulti start -n 4 --daemon`.');
        } else if (this.noted) {
          this.note('');
        }
      }
    } catch (err) {
      this.note(`Cannot reach the ipy_multiengine server extension: ${err}`);
    }
    this.timer = window.setTimeout(() => void this.poll(), POLL_MS);
  }

  private note(text: string): void {
    this.status.textContent = text;
    this.noted = text !== '';
  }

  private async act(what: string, path: string, body: unknown = {}): Promise<any> {
    this.noted = false;
    this.message = `${what}…`;
    this.status.textContent = this.message;
    this.status.classList.remove('ipme-error');
    try {
      const result = await api(path, body);
      this.status.textContent = `${what}: done`;
      return result;
    } catch (err) {
      this.status.textContent = `${what} failed: ${(err as Error).message}`;
      this.status.classList.add('ipme-error');
      return undefined;
    } finally {
      this.message = '';
    }
  }

  private button(label: string, action: string, onClick: () => void): HTMLElement {
    const b = el('button', { 'data-action': action, title: label }, label);
    b.addEventListener('click', onClick);
    return b;
  }

  private render(snap: ISnapshot): void {
    const skew = Date.now() / 1000 - snap.now; // the browser's clock against the server's
    // rebuild the DOM only when what can be clicked changed (a click must not land on a
    // node replaced under the pointer); otherwise update the texts in place
    const shape = JSON.stringify(
      snap.clusters.map(c => [c.id, c.state, c.can, c.engines.map(e => [e.id, e.state])])
    );
    if (shape === this.shape) {
      for (const c of snap.clusters) {
        for (const e of c.engines) {
          const span = this.list.querySelector(
            `[data-cluster="${c.id}"] [data-engine="${e.id}"] [data-ipme="running"]`
          );
          if (span) {
            span.textContent = this.engineText(e, skew);
            span.setAttribute('title', e.running || '');
          }
        }
      }
      return;
    }
    this.shape = shape;
    this.list.replaceChildren();
    for (const c of snap.clusters) {
      const box = el('div', { class: 'ipme-cluster', 'data-cluster': c.id });
      const head = el('div', { class: 'ipme-cluster-head' });
      head.appendChild(
        el('span', { class: 'ipme-cluster-name' }, `${c.shared ? c.profile : 'embedded'} (${c.state})`)
      );
      const base = `clusters/${encodeURIComponent(c.id)}`;
      if (c.can.includes('interrupt')) {
        head.appendChild(
          this.button('Interrupt all', 'interrupt', () => void this.act(`Interrupt ${c.id}`, `${base}/interrupt`))
        );
      }
      if (c.can.includes('restart')) {
        head.appendChild(
          this.button('Restart all', 'restart', () => void this.act(`Restart ${c.id}`, `${base}/restart`))
        );
      }
      if (c.can.includes('stop')) {
        head.appendChild(this.button('Stop', 'stop', () => void this.act(`Stop ${c.id}`, `${base}/stop`)));
      }
      head.appendChild(this.button('Insert client code', 'insert', () => this.insert(c)));
      box.appendChild(head);
      const note = c.remote
        ? `owner on another host (${c.owner}): ${c.can.join(', ') || 'nothing'} from here`
        : `owner ${c.owner}`;
      box.appendChild(el('div', { class: 'ipme-note' }, note));
      for (const e of c.engines) {
        const row = el('div', { class: `ipme-engine ${stateClass(e.state)}`, 'data-engine': String(e.id), 'data-state': e.state });
        row.appendChild(el('span', { class: 'ipme-dot', title: e.dead ? `dead: ${e.dead}` : e.state }));
        row.appendChild(el('span', {}, `[${e.id}]`));
        row.appendChild(
          el('span', { class: 'ipme-running', 'data-ipme': 'running', title: e.running || '' }, this.engineText(e, skew))
        );
        const actions = el('span', {});
        const eb = `${base}`;
        if (c.can.includes('interrupt') && e.state !== 'dead') {
          actions.appendChild(
            this.button('■', 'interrupt', () => void this.act(`Interrupt engine ${e.id}`, `${eb}/interrupt`, { ids: [e.id] }))
          );
        }
        if (c.can.includes('restart')) {
          actions.appendChild(
            this.button('↻', 'restart', () => void this.act(`Restart engine ${e.id}`, `${eb}/restart`, { ids: [e.id] }))
          );
        }
        if (c.can.includes('console') && e.state !== 'dead') {
          actions.appendChild(this.button('>_', 'console', () => void this.console(c, e)));
        }
        row.appendChild(actions);
        box.appendChild(row);
      }
      this.list.appendChild(box);
    }
  }

  private engineText(e: IEngine, skew: number): string {
    return engineText(e, Date.now() / 1000 - skew);
  }

  private insert(c: ICluster): void {
    const panel = this.notebooks?.currentWidget;
    if (!panel) {
      this.status.textContent = 'Insert client code: open a notebook first';
      return;
    }
    NotebookActions.insertAbove(panel.content);
    const cell = panel.content.activeCell;
    if (cell) {
      cell.model.sharedModel.setSource(clientCode(c));
    }
  }

  private async console(c: ICluster, e: IEngine): Promise<void> {
    const result = await this.act(
      `Open console on engine ${e.id}`,
      `clusters/${encodeURIComponent(c.id)}/engines/${e.id}/console`
    );
    if (result && result.kernel_id) {
      await this.app.commands.execute('console:create', {
        kernelPreference: { id: result.kernel_id, shutdownOnDispose: false },
        name: `Engine ${e.id} (${c.shared ? c.profile : 'embedded'})`,
        activate: true
      });
    }
  }

  private status: HTMLElement;
  private list: HTMLElement;
  private form: HTMLElement;
  private kernels!: HTMLSelectElement;
  private launchers!: HTMLSelectElement;
  private launcherNames = '';
  private message = '';
  private shape = '';
  private noted = false;
  private timer: number | undefined;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'ipy_multiengine:engines',
  description: 'Clusters and engines of ipy_multiengine, live, with actions',
  autoStart: true,
  optional: [INotebookTracker, ILabShell],
  activate: (app: JupyterFrontEnd, notebooks: INotebookTracker | null) => {
    const panel = new EnginesPanel(app, notebooks);
    app.shell.add(panel, 'left', { rank: 900 });
    app.commands.addCommand('ipy_multiengine:show-engines', {
      label: 'Show the Engines panel',
      execute: () => app.shell.activateById(panel.id)
    });
  }
};

export default plugin;
