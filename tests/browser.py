"""A real browser for the demo page's tests: Debian's headless Chromium driven by selenium, with no downloads (the
distribution's chromium and chromium-driver, never Selenium Manager's). `chromium()` says why there is none where
it cannot start one, so tests/test_demo.py skips with that reason on a bare machine.

Run as a script it takes the README's screenshot of the page mid-draw:

    python tests/browser.py --ckpt out/tiny --out docs/img/demo.png
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a headless browser that asks nothing of the network (this machine's is closed) and keeps no state between runs
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1150"]


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    for module, install in (("gradio", 'pip install -e ".[demo]"'), ("selenium", 'pip install -e ".[test]"')):
        try:
            __import__(module)
        except ImportError:
            return f"no {module} ({install})"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"no {program} (apt-get install chromium chromium-driver)"
    return None


def chromium():
    """A fresh headless Chromium under selenium (a new profile in a temporary folder)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='nano_emu_chromium_')}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], env: dict | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `python demo.py ARGS --port <free>` and wait until its page answers: (the process, the page's URL).
    The caller stops the process (stop())."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), *args, "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"demo.py exited with {process.returncode} before serving:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"demo.py served nothing at {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(condition, timeout: float = 60.0, what: str = "the page"):
    """Poll condition() until it returns something true; that value, or an AssertionError naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def screenshot(ckpt: str, prompt: str, out: Path, rows: int, pace: float) -> None:
    """The page of `ckpt` drawing `prompt`, caught when `rows` rows are on screen."""
    from selenium.webdriver.common.by import By

    process, url = serve(["--ckpt", ckpt, "--pace", str(pace)])
    browser = None
    try:
        browser = chromium()
        browser.get(url)
        box = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt textarea"), what="the prompt box")[0]
        box.send_keys(prompt)
        browser.find_element(By.ID, "draw").click()
        wait_for(lambda: f"row {rows} of" in browser.find_element(By.ID, "draw-status").text, what=f"row {rows}")
        time.sleep(0.2)   # the row's image arrives with its status line; let the browser paint it
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        if browser is not None:
            browser.quit()
        stop(process)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the README's screenshot of demo.py mid-draw")
    parser.add_argument("--ckpt", required=True, help="a train_tiny.py run folder")
    parser.add_argument("--prompt", default="a red circle in the top left")
    parser.add_argument("--rows", type=int, default=5, help="rows drawn when the screenshot is taken")
    parser.add_argument("--pace", type=float, default=0.5, help="demo.py --pace: seconds each row stays")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/img/demo.png")
    arguments = parser.parse_args()
    if missing():
        parser.error(missing())
    screenshot(arguments.ckpt, arguments.prompt, arguments.out, arguments.rows, arguments.pace)
