"""A real browser runs lesson 2 in JupyterLab and moves its slider: what a learner does, end to end.

JupyterLab is started here on 127.0.0.1 (a free port, token auth) on a copy of notebooks/02_nf4_codebook.ipynb.
Debian's Chromium, driven headless by Playwright for Python (no browser download: the system's executable),
opens the notebook, runs it with Run > Run All Cells, waits until every code cell has run without an error,
drags the NF4 `offset` slider (where NF4 puts its bins) and checks that the plot under it was redrawn (the
image's bytes change). Screenshots go to .pytest_artifacts/browser/ (git-ignored).

Without chromium or playwright the test is skipped, except under CI (the CI variable set), where it fails:
CI installs both (`apt-get install chromium`, the `playwright` package of the test extra).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "notebooks" / "02_nf4_codebook.ipynb"
ARTIFACTS = ROOT / ".pytest_artifacts" / "browser"
CHROMIUM = ["/usr/lib/chromium/chromium", "chromium", "chromium-browser"]  # Debian's binary, then what PATH has
RUN_TIMEOUT_S = 240  # the lesson runs in 25-50 s on a loaded 2-core CPU
SETTINGS = {  # JupyterLab user settings for this run only
    # render every cell (JupyterLab 4 renders only those on screen by default), so that all prompts can be read
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # no "would you like news?" pop-up over the notebook, no update check over the network
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

pytestmark = pytest.mark.slow


def missing(what):
    """Skip on a developer's machine; fail under CI, which must have the browser."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {what}: CI must run the browser test")
    pytest.skip(what)


def chromium_executable():
    for candidate in CHROMIUM:
        path = shutil.which(candidate)
        if path:
            return path
    return missing("no chromium executable (Debian: apt-get install chromium)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """(base URL, token) of a JupyterLab serving a copy of lesson 2, stopped afterwards."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(LESSON, notebooks)
    for name, values in SETTINGS.items():
        path = tmp_path / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, as in `make lab`
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}",
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI runners often run as root
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield base, token
    finally:
        server.terminate()  # SIGTERM: the server shuts its kernels down and exits
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: the server and the kernels it started
            server.wait()
        log.close()


def prompts(page):
    """The input prompts of the code cells, e.g. ['[1]:', '[*]:', '[ ]:']."""
    return page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "nodes => nodes.map(n => n.textContent.trim())")


def errors(page):
    return page.eval_on_selector_all(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
        "nodes => nodes.map(n => n.textContent).filter(t => t.includes('Traceback') || /\\w+Error\\b/.test(t))",
    )


def settle(page, plot, timeout_s=60):
    """Wait until the kernel is idle and the plot has stayed the same for a second (a widget can redraw
    once more after Run All: the slider snaps its value to its step); the plot's src then."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        idle = page.locator("#jp-main-statusbar", has_text="Idle").count() > 0
        src = plot.get_attribute("src")
        if src != last or not idle:
            last, since = src, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return src
        assert time.monotonic() < deadline, f"the kernel and the plot did not settle within {timeout_s} s"
        time.sleep(0.2)


def test_lesson_2_runs_in_jupyterlab_and_its_slider_redraws_the_plot(lab):
    executable = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright; no browser download needed)")
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("02_*"):
        old.unlink()
    phases, last = {}, [time.monotonic()]

    def phase(name):  # seconds since the previous phase ended, written to 02_timings.json
        phases[name], last[0] = round(time.monotonic() - last[0], 1), time.monotonic()

    with sync_playwright() as p:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # Chromium's sandbox refuses root
        browser = p.chromium.launch(executable_path=executable, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{LESSON.name}?token={token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=60_000)
            page.wait_for_selector("#jp-main-statusbar :text('Idle')", timeout=60_000)  # the kernel has started
            phase("notebook open, kernel idle")

            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            page.get_by_text("Run All Cells", exact=True).click()
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                found = errors(page)
                assert not found, f"a cell failed in JupyterLab:\n{found[0][-2000:]}"
                seen = prompts(page)
                if seen and all(re.fullmatch(r"\[\d+\]:", text) for text in seen):
                    break
                assert time.monotonic() < deadline, f"Run All did not finish in {RUN_TIMEOUT_S} s: prompts {seen}"
                time.sleep(0.5)
            assert len(seen) == sum(cell["cell_type"] == "code" for cell in json.loads(LESSON.read_text())["cells"])
            phase("run all")

            slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="offset"))
            readout = slider.locator(".widget-readout")
            plot = page.locator(".widget-interact .widget-output img")
            slider.scroll_into_view_if_needed()
            plot.wait_for(timeout=30_000)
            before_image = settle(page, plot)
            before_value = float(readout.inner_text())
            assert abs(before_value - 0.9677083) <= 0.0005  # NF4's offset, snapped to the slider's step of 0.0005
            assert before_image.startswith("data:image/png;base64,")
            page.screenshot(path=str(ARTIFACTS / "02_after_run_all.png"))

            handle = slider.locator(".noUi-handle")
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] - 40, box["y"] + box["height"] / 2, steps=8)  # to the left: a smaller offset
            page.mouse.up()

            after_image = settle(page, plot)
            after_value = float(readout.inner_text())
            assert 0.9 <= after_value <= before_value - 0.01, f"the drag moved the offset from {before_value} to {after_value}"
            assert after_image != before_image, f"the plot was not redrawn for offset {after_value}"
            assert not errors(page)
            page.screenshot(path=str(ARTIFACTS / "02_after_slider.png"))
            phase("slider moved, plot redrawn")
            (ARTIFACTS / "02_timings.json").write_text(json.dumps(phases, indent=1))
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "02_failure.png"))
            raise
        finally:
            browser.close()


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_a_missing_browser_is_skipped_only_outside_ci(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", ["no-such-chromium-here"])
    with pytest.raises(outcome, match="no chromium executable"):
        chromium_executable()
