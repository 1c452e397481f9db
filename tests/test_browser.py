"""SmolLM_Colab.ipynb in a real browser: JupyterLab on 127.0.0.1 (token auth, temporary root), Debian's Chromium
driven headless by Playwright, Run → Run All Cells as a person would. The widgets must render, the live plot must
appear and change while training runs, and the run must finish. Screenshots go to a temporary directory whose path
is printed (run with -s to see it).

Needs: apt `chromium`; pip `jupyterlab`, `playwright` (its Python package only: Debian's Chromium is used, no
`playwright install`), `ipywidgets>=8` (brings `jupyterlab_widgets`). Skips, saying what is missing, otherwise —
except where SMOLLM_REQUIRE_BROWSER=1 (CI), where a missing tool fails the test.
"""
import os, shutil, sys, tempfile, time
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent/'browser'))
from jupyterlab_harness import missing_tools, jupyterlab, launch_chromium, open_notebook, run_all, cell_output_text

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'SmolLM_Colab.ipynb'
STEPS = 20
MISSING = missing_tools()
# CI (.ci/run) installs the tools and sets SMOLLM_REQUIRE_BROWSER=1: there a missing tool is a failure, never a skip.
REQUIRED = os.environ.get('SMOLLM_REQUIRE_BROWSER') == '1'
pytestmark = pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=f"browser test needs: {', '.join(MISSING)}")

PLOT = '.jp-OutputArea-output img'  # the live plot (LivePlot displays a PNG, updated in place)

def plot_src(page)->str|None:
    imgs = page.query_selector_all(PLOT)
    return imgs[-1].get_attribute('src') if imgs else None

def wait_for(page, cond, timeout:float, what:str, poll:float=0.25):
    "Poll `cond()` until truthy; fail naming `what` (with a screenshot of the moment) after `timeout` seconds."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()): return v
        page.wait_for_timeout(poll * 1000)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; page text:\n{cell_output_text(page)[-3000:]}")

@pytest.mark.slow
def test_run_all_in_jupyterlab_renders_widgets_and_a_live_plot():
    assert not MISSING, f"SMOLLM_REQUIRE_BROWSER=1 but the browser test lacks: {', '.join(MISSING)} (bash .ci/browser-deps)"
    from playwright.sync_api import sync_playwright
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix='smollm-browser-'))
    shots, root, state = work/'screenshots', work/'root', work/'state'
    for d in (shots, root, state): d.mkdir()
    shutil.copy(NB, root/NB.name)
    print(f"\nscreenshots: {shots}")
    env = {'SMOLLM_PRESET': 'tiny', 'SMOLLM_RUN_DIR': str(root/'run'), 'SMOLLM_MAX_STEPS': str(STEPS),
           'SMOLLM_OVERRIDES': 'checkpoint.every_steps=10 train.eval_every=10 logging.every_steps=1',
           'PYTHONPATH': os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)}
    with jupyterlab(root, state, env=env) as (base, token), sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            open_notebook(page, base, token, NB.name, timeout_ms=120_000)
            page.screenshot(path=str(shots/'0-opened.png'))
            run_all(page)

            # The control panel: real ipywidgets DOM, the preset the environment asked for, a live estimate.
            page.wait_for_selector('.jupyter-widgets.widget-dropdown select', timeout=180_000)
            assert page.locator('.jupyter-widgets').count() >= 10
            assert 'tiny' in page.locator('.widget-dropdown select').nth(1).input_value()
            assert page.get_by_text('tokens/step').count() >= 1 and page.get_by_text('→ fits').count() == 1
            page.locator('.widget-dropdown').first.scroll_into_view_if_needed()
            page.screenshot(path=str(shots/'1-controls.png'))

            # The live plot appears, then changes while training runs (the same <img>, updated in place).
            first = wait_for(page, lambda: plot_src(page), 300, 'the live plot')
            page.locator(PLOT).last.scroll_into_view_if_needed()
            page.screenshot(path=str(shots/'2-plot-early.png'))
            wait_for(page, lambda: plot_src(page) not in (None, first), 300, 'the live plot to change')
            page.screenshot(path=str(shots/'3-plot-later.png'))
            assert page.locator(PLOT).count() == 1, 'one plot updated in place, not a stack of figures'

            # Training ends; samples are printed.
            wait_for(page, lambda: f'== done: step {STEPS}/{STEPS}' in cell_output_text(page), 600, 'training to finish')
            wait_for(page, lambda: 'Checkpoints in' in cell_output_text(page), 120, 'the samples and the checkpoint list')
            page.locator('.jp-OutputArea-output').last.scroll_into_view_if_needed()
            page.screenshot(path=str(shots/'4-done.png'))
            text = cell_output_text(page)
            assert 'Traceback' not in text, text[-3000:]
            assert "--- 'def add(a, b):'" in text and (root/'run'/'checkpoints').is_dir()
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - t0:.1f}s; screenshots in {shots}")
