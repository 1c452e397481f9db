"A JupyterLab server on 127.0.0.1 and Debian's headless Chromium driven by Playwright, for tests/test_browser.py."
from __future__ import annotations
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']

def missing_tools()->list[str]:
    "What the browser test needs and this machine lacks (empty when it can run)."
    import importlib.util
    miss = [] if Path(CHROMIUM).exists() else [f'{CHROMIUM} (apt-get install chromium)']
    for mod, pkg in (('jupyterlab', 'jupyterlab'), ('playwright', 'playwright'), ('jupyterlab_widgets', 'ipywidgets>=8')):
        if importlib.util.find_spec(mod) is None: miss.append(f'python module {mod} (pip install {pkg})')
    return miss

def free_port()->int:
    "A TCP port on 127.0.0.1 that nothing listens on right now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _write_json(path:Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(obj))

@contextmanager
def jupyterlab(root:Path,            # directory the server serves (holds the notebook)
               state:Path,           # scratch directory for Jupyter's config, settings, runtime files and the log
               env:dict|None=None,   # extra environment for the server and its kernels
               timeout:float=60):
    "Run `jupyter lab` on a free 127.0.0.1 port with token auth and isolated settings; yield (base_url, token)."
    port, token = free_port(), secrets.token_hex(16)
    cfg, settings = state/'config', state/'lab-settings'
    # No "get Jupyter news?" prompt, no update checks, no kernel-picker dialog (start the notebook's kernel, as Colab
    # does), and every cell kept in the DOM (windowing off).
    _write_json(cfg/'labconfig'/'page_config.json', {'disabledExtensions': {'@jupyterlab/apputils-extension:announcements': True}})
    _write_json(settings/'@jupyterlab'/'notebook-extension'/'tracker.jupyterlab-settings', {'windowingMode': 'none', 'autoStartDefaultKernel': True})
    e = {**os.environ, **(env or {}), 'JUPYTER_CONFIG_DIR': str(cfg), 'JUPYTER_RUNTIME_DIR': str(state/'runtime'),
         'JUPYTERLAB_SETTINGS_DIR': str(settings), 'JUPYTERLAB_WORKSPACES_DIR': str(state/'workspaces')}
    log = open(state/'jupyterlab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1',
                             f'--ServerApp.port={port}', '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}',
                             f'--ServerApp.root_dir={root}', '--LabApp.news_url=None',
                             '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
                            + (['--allow-root'] if os.geteuid() == 0 else []),  # CI runs as root
                            env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None: raise RuntimeError(f"jupyter lab exited with {proc.returncode}; see {state/'jupyterlab.log'}")
            try:
                with urllib.request.urlopen(f'{base}/api/status?token={token}', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass  # not listening yet
            if time.monotonic() > deadline: raise TimeoutError(f"jupyter lab not ready after {timeout}s; see {state/'jupyterlab.log'}")
            time.sleep(0.3)
        yield base, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (same session)
            try: proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()

def launch_chromium(playwright):
    "Debian's Chromium, headless, with no background network traffic (Playwright's own browser builds are not used)."
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)

# --- page actions -------------------------------------------------------------------------------------------------

def open_notebook(page, base:str, token:str, name:str, timeout_ms:int=60_000):
    "Open `name` in JupyterLab and wait until its kernel is idle."
    page.goto(f'{base}/lab/tree/{name}?token={token}', timeout=timeout_ms)
    page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=timeout_ms)
    wait_kernel_idle(page, timeout_ms)

def wait_kernel_idle(page, timeout_ms:int=60_000):
    "Wait until a kernel is connected and idle (the status bar reads 'Python 3 (ipykernel) | Idle', not 'No Kernel')."
    page.wait_for_function("""() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
        .some(e => /[|] Idle/.test(e.innerText) && !/No Kernel/.test(e.innerText))""", timeout=timeout_ms)

def run_all(page):
    "Run → Run All Cells, through the menu bar as a person would."
    page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()

def cell_output_text(page)->str:
    "All text shown in output areas."
    return page.eval_on_selector_all('.jp-OutputArea-output', 'els => els.map(e => e.innerText).join("\\n")')
