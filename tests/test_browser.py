"""SmolLM_Colab.ipynb in a real browser: JupyterLab on 127.0.0.1 (token auth, temporary root), Debian's Chromium
driven headless by Playwright, as a person would use it: run the cells above the training cell, CHANGE WIDGETS in the
control panel (the pretraining budget and micro-batch), press Start, and check the run used the change (its
config.yaml) and showed its live plot in the panel. Screenshots go to a temporary directory whose path is printed
(run with -s to see it).

Needs: apt `chromium`; pip `jupyterlab`, `playwright` (its Python package only: Debian's Chromium is used, no
`playwright install`), `ipywidgets>=8` (brings `jupyterlab_widgets`). Skips, saying what is missing, otherwise —
except where SMOLLM_REQUIRE_BROWSER=1 (CI), where a missing tool fails the test.
"""
import os, re, shutil, sys, tempfile, time
from pathlib import Path
import pytest, yaml

sys.path.insert(0, str(Path(__file__).parent/'browser'))
from jupyterlab_harness import missing_tools, jupyterlab, launch_chromium, open_notebook, wait_kernel_idle, cell_output_text

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'SmolLM_Colab.ipynb'
STEPS, NEW_STEPS, NEW_MICRO = 20, 12, 4
MISSING = missing_tools()
# CI (.ci/run) installs the tools and sets SMOLLM_REQUIRE_BROWSER=1: there a missing tool is a failure, never a skip.
REQUIRED = os.environ.get('SMOLLM_REQUIRE_BROWSER') == '1'
pytestmark = pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=f"browser test needs: {', '.join(MISSING)}")

@pytest.fixture(autouse=True)
def tools_present():
    "Reached only when the tools are there or required (CI): then a missing one is a failure that names it."
    assert not MISSING, f"SMOLLM_REQUIRE_BROWSER=1 but the browser test lacks: {', '.join(MISSING)} (bash .ci/browser-deps)"

PLOT = 'img.widget-image'  # the live plot: from the Start button it is an ipywidgets Image inside the panel

def wait_for(page, cond, timeout:float, what:str, poll:float=0.25):
    "Poll `cond()` until truthy; fail naming `what` (with the page's output text) after `timeout` seconds."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()): return v
        page.wait_for_timeout(poll * 1000)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; page text:\n{cell_output_text(page)[-3000:]}")

def widget_input(page, label:str):
    "The visible input of the ipywidget labelled `label` (in the selected tab)."
    row = page.locator('.widget-inline-hbox', has=page.locator('label.widget-label', has_text=label)).filter(visible=True)
    return row.locator('input').first

@pytest.mark.slow
def test_change_widgets_press_start_and_the_run_uses_them():
    from playwright.sync_api import sync_playwright
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix='smollm-browser-'))
    shots, root, state = work/'screenshots', work/'root', work/'state'
    for d in (shots, root, state): d.mkdir()
    shutil.copy(NB, root/NB.name)
    print(f"\nscreenshots: {shots}")
    run = root/'run'
    env = {'SMOLLM_PRESET': 'tiny', 'SMOLLM_RUN_DIR': str(run), 'SMOLLM_MAX_STEPS': str(STEPS), 'SMOLLM_STAGES': 'pretrain',
           'SMOLLM_OVERRIDES': 'checkpoint.every_steps=10 train.eval_every=0 logging.every_steps=1',
           'PYTHONPATH': os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)}
    with jupyterlab(root, state, env=env) as (base, token), sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1100})
            open_notebook(page, base, token, NB.name, timeout_ms=120_000)
            # Select the training cell, then Run → Run All Above Selected Cell: install, environment, the panel.
            page.locator('.jp-CodeCell', has_text='panel.start()').locator('.jp-InputPrompt').click()
            page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
            page.locator('.lm-Menu-item[data-command="notebook:run-all-above"]').click()
            page.wait_for_selector('.widget-tab', timeout=180_000)
            wait_kernel_idle(page, 180_000)
            assert not run.joinpath('pretrain', 'config.yaml').exists(), 'nothing may train before Start'
            assert page.locator('.jupyter-widgets').count() >= 20
            assert 'tiny' in page.locator('.widget-dropdown select').first.input_value()
            budget, micro = widget_input(page, 'Budget'), widget_input(page, 'Micro-batch')
            assert budget.input_value() == f'{STEPS} steps' and micro.input_value() == '8'
            page.screenshot(path=str(shots/'1-controls.png'))

            # Change two widgets as a person would (type, Enter), and see the panel follow.
            budget.fill(f'{NEW_STEPS} steps'); budget.press('Enter')
            micro.fill(str(NEW_MICRO)); micro.press('Enter')
            wait_for(page, lambda: f'= {NEW_MICRO} × 2 × 128 = 1,024 tokens/step' in cell_output_text(page), 60, 'the tokens/step to follow')
            wait_for(page, lambda: f'= {NEW_STEPS} optimizer steps' in cell_output_text(page), 60, 'the steps to follow')
            page.screenshot(path=str(shots/'2-changed.png'))

            page.locator('button.jupyter-button', has_text=re.compile(r'^\s*Start\s*$')).click()
            wait_for(page, lambda: page.locator(PLOT).count() > 0, 300, 'the live plot in the panel')
            page.locator(PLOT).last.scroll_into_view_if_needed()
            page.screenshot(path=str(shots/'3-training.png'))
            wait_for(page, lambda: 'Done: pretrain done' in cell_output_text(page), 600, 'training to finish')
            page.screenshot(path=str(shots/'4-done.png'))
            text = cell_output_text(page)
            assert 'Traceback' not in text, text[-3000:]
            assert f'pretrain: step {NEW_STEPS} / {NEW_STEPS} (100%)' in text and page.locator(PLOT).count() == 1
            used = yaml.safe_load((run/'pretrain'/'config.yaml').read_text())['train']
            assert (used['max_steps'], used['micro_batch_size']) == (NEW_STEPS, NEW_MICRO), used
            # finished: the stage's settings are now locked (greyed out), and the panel says the run is done
            assert widget_input(page, 'Micro-batch').is_disabled()

            # "Edit, then run from here": a new run name (a new run: the settings unlock) and another micro-batch, then
            # the training cell itself (Shift+Enter) trains with what the widgets show when it runs.
            name = widget_input(page, 'Run name')
            name.fill('second'); name.press('Enter')
            wait_for(page, lambda: not widget_input(page, 'Micro-batch').is_disabled(), 60, 'the new run to unlock the settings')
            micro = widget_input(page, 'Micro-batch')
            micro.fill('2'); micro.press('Enter')
            wait_for(page, lambda: '= 2 × 2 × 128 = 512 tokens/step' in cell_output_text(page), 60, 'the tokens/step to follow')
            page.locator('.jp-CodeCell', has_text='panel.start()').locator('.jp-InputPrompt').click()
            page.keyboard.press('Shift+Enter')
            second = root/'second'/'pretrain'/'config.yaml'
            wait_for(page, lambda: second.is_file() and (root/'second'/'pretrain'/'stage_done.json').is_file(), 600, 'the second run to finish')
            used = yaml.safe_load(second.read_text())['train']
            assert (used['max_steps'], used['micro_batch_size']) == (NEW_STEPS, 2), used
            cell = page.locator('.jp-CodeCell', has_text='panel.start()')
            wait_for(page, lambda: f'pretrain: step {NEW_STEPS} / {NEW_STEPS} (100%)' in cell.locator('.jp-OutputArea').inner_text(),
                     60, "the training cell's live plot to show the last step")
            assert cell.locator('.jp-OutputArea-output img').count() == 1, "the training cell's live plot: one image, updated in place"
            page.screenshot(path=str(shots/'5-second-run.png'))
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - t0:.1f}s; screenshots in {shots}")
