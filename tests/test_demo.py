"""demo.py and nano_emu/demo.py: the page's actions as plain Python (draws under one lock, bad prompts as messages,
the run's facts), the script's one-line refusals, and the page itself in a real headless Chromium (skipped, with
the reason, where no browser or Gradio can be had)."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import browser   # tests/browser.py: the headless Chromium
from nano_emu import shapes
from nano_emu.demo import EMPTY_ANSWER, Demo, headline_rows, run_facts
from nano_emu.image import save_image
from nano_emu.tiny import load_tiny
from tiny_run import write_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("demo_run"))


def finished(stream) -> tuple[Image.Image, str]:
    for image, status in stream:
        pass
    return image, status


def test_a_draw_streams_rows_then_the_whole_image(random_run):
    demo = Demo(load_tiny(random_run))
    shown = list(demo.draw("a red circle in the top left", seed=3))
    statuses = [status for _, status in shown]
    assert [s.split(":")[0] for s in statuses[:-1]] == [f"row {k} of 8" for k in range(1, 8)]
    assert statuses[-1].startswith("done: ") and "tokens/s" in statuses[-1] and "forwards" in statuses[-1]
    assert all(image.size == (64, 64) for image, _ in shown)
    whole = np.asarray(shown[-1][0])
    assert np.array_equal(whole, np.asarray(demo.pipe.draw(["a red circle in the top left"], seed=3)[0]))
    for k, (image, _) in enumerate(shown[:-1], start=1):   # the finished rows, grey below them
        assert (np.asarray(image)[8 * k:] == 128).all() and (np.asarray(image)[:8 * k] != 128).any()
    sjd = finished(demo.draw("a red circle in the top left", seed=3, sjd=True))
    assert "SJD, window 16" in sjd[1]


def test_two_draws_at_once_get_the_images_each_gets_alone(random_run):
    """Two clients (threads) drawing at once share one model and one KV cache: each waits for the other's draw, so
    both get what they would alone. Without Demo.lock their rows interleave in the cache and the images differ."""
    demo = Demo(load_tiny(random_run))
    asks = [("a red circle in the top left", 1), ("a blue square in the bottom right", 2)]
    alone = [np.asarray(finished(demo.draw(prompt, seed=seed))[0]) for prompt, seed in asks]
    together, start = [None, None], threading.Barrier(2)

    def client(k: int) -> None:
        prompt, seed = asks[k]
        start.wait()
        for image, status in demo.draw(prompt, seed=seed):
            time.sleep(0.01)   # a browser reading each row: gives the other thread every chance to step in
        together[k] = np.asarray(image)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert not np.array_equal(*alone)


def test_a_prompt_the_model_cannot_take_is_a_message(random_run):
    demo = Demo(load_tiny(random_run))
    (image, status), = demo.draw("a purple circle")
    assert image is None and "'purple' is not in this model's vocabulary" in status
    (image, status), = demo.draw(" ".join(["red"] * 600))
    assert image is None and "exceeds the model's context of 512 tokens" in status
    (image, status), = demo.draw("a red circle", temperature=-1)
    assert image is None and "temperature" in status
    (image, status), = demo.draw("a red circle", seed=-1)
    assert image is None and "the seed must be in [0, 2**64)" in status
    assert finished(demo.draw("a red circle", seed=None))[0].size == (64, 64)   # the lock was given back each time


def test_ask_answers_as_the_pipeline(random_run, tmp_path):
    demo = Demo(load_tiny(random_run))
    picture = tmp_path / "shape.png"
    save_image(Image.fromarray(np.full((64, 64, 3), 200, np.uint8)), picture)
    assert demo.ask(str(picture), "") == demo.pipe.answer(str(picture), "", max_new_tokens=256)
    assert demo.ask(None, "") == "Upload an image first."
    (tmp_path / "notes.txt").write_text("not an image")
    assert demo.ask(str(tmp_path / "notes.txt"), "").startswith("Cannot answer: cannot read image file")
    demo.pipe.answer = lambda *args, **kwargs: ""   # what a --quick model says: EOS at once
    assert demo.ask(str(picture), "") == EMPTY_ANSWER


def test_a_video_run_answers_about_a_clip(tmp_path):
    demo = Demo(load_tiny(write_run(tmp_path / "video", video=True)))
    frames = [Image.fromarray(shapes.render("red", "circle", "center", dx=4 * k - 14)) for k in range(8)]
    clip = tmp_path / "clip.gif"
    save_image(frames[0], clip, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert demo.clips and demo.ask(None, "", clip=str(clip)) == demo.pipe.answer_clip(str(clip), "", 256)
    assert demo.ask(None, "") == "Upload an image first (or a clip)."
    frames[0].save(tmp_path / "still.gif")   # a GIF of one frame is an image
    assert demo.ask(None, "", clip=str(tmp_path / "still.gif")) == demo.pipe.answer(frames[0], "", 256)


def test_run_facts_name_the_world_and_the_headline_numbers(random_run, tmp_path):
    facts = run_facts(random_run)
    assert "trained on the world" in facts and "No metrics.json" in facts
    run = write_run(tmp_path / "run", gpt_meta={"world": "scenes", "settings": {"preset": "scenes", "seed": 1}})
    (run / "metrics.json").write_text(json.dumps({
        "vq_psnr_db": 28.18, "adherence_seen_cfg2": 0.969, "adherence_heldout_cfg2": 0.896,
        "adherence_seen_cfg1": 0.5, "caption_accuracy_seen": 0.988, "caption_accuracy_heldout": 0.703,
        "qa_accuracy_seen": 0.85, "total_s": 503.2}))
    facts = run_facts(run)
    assert "trained on the world **scenes** (preset scenes, seed 1)" in facts
    assert "| drawings right (the world's checker), CFG 2 | 96.9% | 89.6% |" in facts
    assert "| captions right | 98.8% | 70.3% |" in facts and "| questions answered right | 85.0% |  |" in facts
    assert "28.18 dB" in facts and "50.0%" not in facts and "503 s" in facts   # CFG 1's row is not a headline
    assert headline_rows({"clip_adherence_seen_cfg2": 0.5}, 2.0) == [
        ("clips: drawings right (the world's checker), CFG 2", "50.0%", "")]


def run_demo(*args: str, hide_gradio: bool = False) -> subprocess.CompletedProcess:
    code = ("import runpy, sys; " + ("sys.modules['gradio'] = None; " if hide_gradio else "") +
            f"sys.argv = ['demo.py', *{list(args)!r}]; runpy.run_path('demo.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_script_refuses_in_one_line(random_run):
    result = run_demo("--ckpt", str(random_run), hide_gradio=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert 'pip install -e ".[demo]"' in result.stderr
    result = run_demo("--ckpt", str(random_run), "--weights", str(random_run))
    assert result.returncode == 2 and "give one of --ckpt" in result.stderr and result.stderr.count("\n") == 1
    result = run_demo("--ckpt", str(random_run), "--port", "70000")
    assert result.returncode == 2 and "--port" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# the page in a real browser

@pytest.fixture(scope="module")
def page(random_run):
    """demo.py serving a random run (what is checked needs no trained model: a trained --quick one answers every
    picture with an empty caption), a headless Chromium, and the run's Pipeline in this process."""
    reason = browser.missing()
    if reason:
        pytest.skip(f"no browser test: {reason}")
    run = random_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread, as this process while it computes the expected
    # --pace: every row stays 0.2 s, so the test sees rows arrive
    process, url = browser.serve(["--ckpt", str(run), "--device", "cpu", "--pace", "0.2"], env=env)
    driver = None
    try:
        driver = browser.chromium()
        driver.get(url)
        yield driver, load_tiny(run)
    finally:
        if driver is not None:
            driver.quit()
        browser.stop(process)


def one_thread(work):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return work()
    finally:
        torch.set_num_threads(threads)


def test_the_page_draws_asks_and_refuses_in_a_browser(page, tmp_path):
    from selenium.webdriver.common.by import By
    driver, pipe = page
    find = driver.find_element

    def status() -> str:
        return find(By.ID, "draw-status").text

    prompt = "a red circle in the top left"
    box = browser.wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea"), what="the page")[0]
    box.send_keys(prompt)
    find(By.ID, "draw").click()
    # mid-draw: the status and the image of one moment (one script runs between two page updates)
    moment = "const img = document.querySelector('#drawn img'); " \
             "return [document.getElementById('draw-status').innerText, img ? img.src : null];"
    text, src = browser.wait_for(lambda: (lambda m: m if re.match(r"row [1-7] of 8", m[0]) and m[1] else None)(
        driver.execute_script(moment)), what="a row of the drawing")
    with urllib.request.urlopen(src) as response:
        partial = np.asarray(Image.open(response).convert("RGB"))
    rows = int(text.split()[1])
    assert partial.shape == (64, 64, 3) and (partial[8 * rows:] == 128).all() and (partial[:8 * rows] != 128).any()
    browser.wait_for(lambda: status().startswith("done:"), what="the drawing to finish")
    image = find(By.CSS_SELECTOR, "#drawn img")
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [64, 64]
    with urllib.request.urlopen(image.get_attribute("src")) as response:   # the PNG the page shows, lossless
        shown = np.asarray(Image.open(response).convert("RGB"))
    expected = one_thread(lambda: pipe.draw([prompt], seed=0)[0])
    assert np.array_equal(shown, np.asarray(expected))

    box.clear()
    box.send_keys("a purple dragon")
    find(By.ID, "draw").click()
    browser.wait_for(lambda: "is not in this model's vocabulary" in status(), what="the unknown word's message")
    assert status().startswith("Cannot draw this: 'purple' is not")

    picture = tmp_path / "scene.png"
    save_image(Image.fromarray(shapes.render("blue", "square", "bottom right")), picture)
    expected = one_thread(lambda: Demo(pipe).ask(str(picture), ""))
    find(By.XPATH, "//button[@role='tab' and contains(., 'Ask')]").click()
    upload = browser.wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#ask-image input[type=file]"),
                              what="the Ask tab")[0]
    upload.send_keys(str(picture))
    browser.wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#ask-image img"), what="the uploaded picture")
    find(By.ID, "ask").click()
    answer = browser.wait_for(lambda: find(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"),
                              what="the caption")
    assert answer == expected and expected
