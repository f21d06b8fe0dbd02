"""The canvas extension (web/) in a real browser: headless Chromium on a real ComfyUI with the pack installed.

Run:  COMFYUI_DIR=/work/comfyui python -m pytest tests/test_canvas_browser.py -m comfyui -s
Needs Chromium at /usr/bin/chromium (apt-get install chromium) and the `playwright` package (pip install
playwright; its own browser download is not used). Screenshots go to $CANVAS_SCREENSHOTS or a temp folder.

The pack is installed under two folder names, each in its server's own --base-directory (so nothing else in the
checkout's custom_nodes loads, and the checkout is not touched): the extension must not depend on the name.
The page loads a trainer and a Compare Models graph, queues it through its own client id (so the engine's
messages reach it), and the test checks what the page drew.
"""
import os
import tempfile

import pytest

from comfyui_harness import ComfyServer, comfyui_dir, execution_error

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CKPT = "personalize_toy_sd15.safetensors"
STEPS = 6
ORANGE = (240, 160, 48)  # the loss line's colour in web/live.js


def _playwright_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="set COMFYUI_DIR to a ComfyUI checkout"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(not _playwright_available(), reason="the playwright package is not installed"),
]


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> str:
    import torch

    from trainers.testing.toy_models import build_sd1, save_single_file

    path = str(tmp_path_factory.mktemp("canvas_ckpt") / CKPT)
    return save_single_file(build_sd1("comfy"), path, dtype=torch.float16)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(params=["ComfyUI-Personalize", "comfyui_personalize"])
def comfy(request, toy_checkpoint, tmp_path):
    """ComfyUI with the pack as custom_nodes/<folder> of the server's own base directory, and the test's inputs."""
    from PIL import Image

    from trainers.testing.demo import make_photos
    from trainers.testing.toy_metrics import save_toy_dino

    server = ComfyServer(pack_folder=request.param)
    server.add_model("checkpoints", toy_checkpoint, CKPT)
    save_toy_dino(os.path.join(server.model_folder("metrics"), "dino-vits16"))
    make_photos(os.path.join(server.input_dir, "photos"), count=2, size=96)
    for name, color in (("compare_a.png", (200, 80, 40)), ("compare_b.png", (40, 80, 200))):
        Image.new("RGB", (64, 64), color).save(os.path.join(server.input_dir, name))
    # A returning user: no first-run template browser over the canvas.
    os.makedirs(os.path.join(server.user_dir, "default"), exist_ok=True)
    with open(os.path.join(server.user_dir, "default", "comfy.settings.json"), "w") as f:
        f.write('{"Comfy.TutorialCompleted": true}')
    with server:
        server.folder = request.param
        yield server


def prompt() -> dict:
    train = dict(ckpt_name=CKPT, dataset_folder="photos", trigger_word="sks", output_name="canvas", preset="attn",
                 rank=4, alpha=4.0, steps=STEPS, unet_lr=1e-3, batch_size=1, resolution=64, seed=1,
                 train_text_encoder=False, mixed_precision="no", save_every=0, warmup_steps=0,
                 lr_scheduler="constant", resume=False, validation_prompt="a photo of sks ball", validation_every=3)
    return {
        "1": {"class_type": "PersonalizeTrainLoRA", "inputs": train},
        "2": {"class_type": "LoadImage", "inputs": {"image": "compare_a.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "compare_b.png"}},
        "4": {"class_type": "PersonalizeCompareModels", "inputs": {
            "images_a": ["2", 0], "label_a": "base", "images_b": ["3", 0], "label_b": "tuned",
            "prompts": "a photo of sks ball", "identifier": "sks", "class_noun": "ball", "clip_model": "(none)",
            "dino_model": "dino-vits16", "lpips_model": "(none)", "name": "canvas", "subject_folder": "photos"}},
    }


# In the page: load the API prompt as a graph, record what the engine sends and the step line as it changes,
# queue it through the page's own client (so "personalize.train" messages come back to this page).
LOAD_AND_QUEUE = """async (prompt) => {
    const { app } = window.comfyAPI.app, { api } = window.comfyAPI.api;
    window.__events = []; window.__texts = []; window.__done = null;
    api.addEventListener("personalize.train", (e) => window.__events.push(e.detail));
    api.addEventListener("execution_success", () => (window.__done = "success"));
    api.addEventListener("execution_error", (e) => (window.__done = "error: " + e.detail.exception_message));
    setInterval(() => {
        const t = document.querySelector(".personalize-live-text")?.textContent;
        if (t && t !== window.__texts[window.__texts.length - 1]) window.__texts.push(t);
    }, 20);
    await app.loadApiJson(prompt, "canvas.json");
    const trainer = app.graph.getNodeById(1), compare = app.graph.getNodeById(4);
    trainer.pos = [20, 20];
    compare.pos = [trainer.size[0] + 60, 20];
    app.graph.getNodeById(2).pos = [trainer.size[0] + compare.size[0] + 100, 20];
    app.graph.getNodeById(3).pos = [trainer.size[0] + compare.size[0] + 100, 400];
    await app.queuePrompt(0, 1);
}"""

# Bring the trainer's panel into view (it sits under ~30 widgets).
SHOW_PANEL = """() => {
    const { app } = window.comfyAPI.app;
    const node = app.graph.getNodeById(1);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [0, Math.min(0, window.innerHeight - 30 - (node.pos[1] + node.size[1]))];
    app.canvas.setDirty(true, true);
}"""

# The panel forgets its points, then hears of step 5 only.
MISSED_STEPS = """(run) => {
    const { app } = window.comfyAPI.app, { api } = window.comfyAPI.api;
    const panel = app.graph.getNodeById(1).personalizeLive;
    panel.points = [];
    panel.run = null;
    api.dispatchCustomEvent("personalize.train", { node: "1", run, step: 5, total: 6, loss: 1.0 });
}"""

CHART_PIXELS = """([r, g, b]) => {
    const c = document.querySelector("canvas.personalize-live-chart");
    const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let line = 0;
    for (let i = 0; i < data.length; i += 4) {
        if (Math.abs(data[i] - r) < 40 && Math.abs(data[i + 1] - g) < 40 && Math.abs(data[i + 2] - b) < 40) line++;
    }
    return { line, width: c.width, height: c.height };
}"""


def screenshot_dir() -> str:
    folder = os.environ.get("CANVAS_SCREENSHOTS") or os.path.join(tempfile.gettempdir(), "personalize_canvas")
    os.makedirs(folder, exist_ok=True)
    return folder


def orange_pixels(png: bytes) -> int:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(1 for p in image.getdata() if all(abs(a - b) < 40 for a, b in zip(p, ORANGE)))


def test_trainer_shows_live_chart_steps_image_and_files_and_compare_shows_its_table(comfy, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, personalize_requests = [], []
    page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
    page.on("request", lambda r: "/personalize/" in r.url and personalize_requests.append(r.url))
    try:
        page.goto(comfy.url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.extensions?.some("
                               "(e) => e.name === 'Personalize.LiveTraining') && window.comfyAPI.app.app.graph",
                               timeout=120_000)
        extensions = comfy.get("/extensions")
        assert f"/extensions/{comfy.folder}/live.js" in extensions, extensions
        # The default graph has no Personalize node: the extension built nothing and asked the server nothing.
        page.wait_for_timeout(500)
        assert page.evaluate("() => document.querySelectorAll('[class^=personalize]').length") == 0
        assert personalize_requests == []

        # This frontend itself throws once while it starts (a setting's onChange, with no custom node at all):
        # only errors from here on, or from the pack's scripts, count.
        started = len(errors)

        def ours():
            return [e for i, e in enumerate(errors) if i >= started or f"/extensions/{comfy.folder}/" in e]

        page.evaluate(LOAD_AND_QUEUE, prompt())
        assert ours() == []
        page.wait_for_function("() => window.__events.some((e) => e.step >= 2) || window.__done",
                               timeout=300_000)
        page.evaluate(SHOW_PANEL)
        # (c) the validation image (step 3) loads through /view
        page.wait_for_function("() => { const i = document.querySelector('img.personalize-live-image'); return"
                               " (i && i.complete && i.naturalWidth > 0) || window.__done?.startsWith('error'); }",
                               timeout=300_000)
        folder = screenshot_dir()
        page.screenshot(path=os.path.join(folder, f"trainer_running_{comfy.folder}.png"))
        page.wait_for_function("() => window.__done", timeout=600_000)
        done = page.evaluate("() => window.__done")
        history = comfy.get("/history")
        entry = next(iter(history.values()))
        assert done == "success", (done, execution_error(entry), comfy.log_tail())

        events = page.evaluate("() => window.__events")
        steps = [e["step"] for e in events]
        assert steps[:STEPS] == list(range(1, STEPS + 1)) and all(e["node"] == "1" for e in events), steps
        assert {e["image"]["filename"] for e in events if "image" in e} == {"step_000003.png", "step_000006.png"}
        # (b) the step line changed while it trained, with the rate and time left
        texts = page.evaluate("() => window.__texts")
        shown = [t for t in texts if t.startswith("step ")]
        assert len({t.split(" ·")[0] for t in shown}) >= 2, texts
        assert any("s/step" in t and "ETA" in t for t in shown), texts
        assert texts[-1].startswith(f"finished: {STEPS}/{STEPS}"), texts
        assert page.evaluate("() => document.querySelector('img.personalize-live-image').naturalWidth") > 0

        # (a) the chart drew its line: in its pixels, and on screen
        page.evaluate(SHOW_PANEL)
        page.wait_for_timeout(300)
        pixels = page.evaluate(CHART_PIXELS, list(ORANGE))
        assert pixels["line"] > 50, pixels
        chart_png = page.locator("canvas.personalize-live-chart").screenshot(
            path=os.path.join(folder, f"chart_{comfy.folder}.png"))
        assert orange_pixels(chart_png) > 50
        page.screenshot(path=os.path.join(folder, f"trainer_{comfy.folder}.png"))

        # A page that missed the first steps (opened mid-run, reconnected) reads the curve so far from the run log
        page.evaluate(MISSED_STEPS, events[0]["run"])
        page.wait_for_function("() => window.comfyAPI.app.app.graph.getNodeById(1).personalizeLive.points.length"
                               f" === {STEPS}", timeout=30_000)

        # The run folder's files, listed by the route and served by ComfyUI's /view
        page.locator(".personalize-live-text ~ details summary").click()
        page.wait_for_function("() => document.querySelectorAll('.personalize-live-text ~ details a').length >= 3")
        links = page.evaluate("() => [...document.querySelectorAll('.personalize-live-text ~ details a')]"
                              ".map((a) => [a.textContent, a.href])")
        names = [text.split(" (")[0] for text, _ in links]
        assert {"config.json", "log.jsonl", "samples/step_000003.png"} <= set(names), names
        href = dict((text.split(" (")[0], h) for text, h in links)["log.jsonl"]
        assert page.evaluate("async (u) => (await fetch(u)).status", href) == 200

        # (d) Compare Models' table on its node
        page.wait_for_function("() => document.querySelectorAll('table.personalize-compare-table tr').length >= 3",
                               timeout=60_000)
        rows = page.evaluate("() => [...document.querySelectorAll('table.personalize-compare-table tr')]"
                             ".map((tr) => [...tr.children].map((c) => c.textContent))")
        assert rows[0][:2] == ["model", "DINO"] and [r[0] for r in rows[1:3]] == ["base", "tuned"], rows
        page.evaluate("""() => { const { app } = window.comfyAPI.app; const n = app.graph.getNodeById(4);
            app.canvas.ds.offset = [-n.pos[0] + 20, -n.pos[1] + 40]; app.canvas.setDirty(true, true); }""")
        page.wait_for_timeout(300)
        page.screenshot(path=os.path.join(folder, f"compare_{comfy.folder}.png"))
        assert ours() == []
    finally:
        page.close()
