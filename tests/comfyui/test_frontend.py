"""The workflows in the real ComfyUI frontend, served by the test server, in headless Chromium.

Needs what the other ComfyUI tests need, plus playwright (tests/requirements.txt) and a Chromium
binary: /usr/bin/chromium (Debian's `chromium` package) or the path in PID_CHROMIUM. Playwright drives
that binary (`executable_path`); it never downloads a browser. Skipped without them, failed under
PID_REQUIRE_COMFYUI=1.

For every file in workflows/: the frontend loads it with app.loadGraphData; every node type is
registered in the frontend (no missing nodes); the widgets the frontend built are the ones /object_info
declares, in the order of the file's widgets_values, holding those values, each one the node accepts;
the frontend's own conversion (app.graphToPrompt) gives the same API prompt as our converter
(workflow_api.to_api) and ComfyUI's validation of it reports nothing but the absent model files. Then one
workflow runs end to end through the frontend's queue (see test_upscale_workflow_runs_from_the_frontend).

Each workflow is also looked at as a new user opens it: in an 1800 x 1100 window (a 1080p screen's
browser), right after loading, the frontend shows the file's saved view (extra.ds); the canvas that its
side bar and workflow tabs leave visible holds the 1600 x 900 px view that tests/workflow_layout.py
frames the files for, below the graph toolbar; every node is drawn at its place and size in the file (so
the static bounds of tests/test_workflows.py are the drawn ones); node text is drawn (no low-quality
zoom); every node of this pack lies inside the visible canvas, measured with the frontend's own canvas
coordinates.

A screenshot of each workflow right after loading (<file name>.png) and of each other state goes to
pytest's temporary folder (frontend-screenshots*/), with the browser's console log, for review.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

import workflow_layout as layout
from workflow_checks import check_value

from .comfy_harness import VAE_FILE, PID_FILE, unavailable
from .workflow_api import FRONTEND_ONLY, file_loader_ids, to_api, unexpected_validation_errors, widget_layout

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

CHROMIUM = os.environ.get("PID_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google's services, which a
# closed network turns into long stalls.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_TIMEOUT_MS = 120_000
WINDOW = {"width": 1800, "height": 1100}  # a new user's browser on a 1080p-ish screen
TEST_IMAGE = "pid_test_input.png"
TEST_IMAGE_PX = 64

GRAPH_STATE_JS = """() => {
  const g = window.app.graph;
  return (g.nodes ?? g._nodes).map(n => ({
    id: String(n.id), type: n.type, registered: n.type in LiteGraph.registered_node_types,
    widgets: (n.widgets ?? []).map(w => ({name: w.name, value: w.value})),
  }));
}"""


# What the user sees right after loading, in the frontend's own terms: the canvas view (ds), each node's
# bounding box (title bar included) in canvas units and on screen (LGraphCanvas.convertOffsetToCanvas,
# plus the canvas element's place in the window), and the frontend's chrome over the canvas: the side bar
# and the workflow tabs (solid), the graph toolbar (the breadcrumb and the action bar, floating).
VIEW_STATE_JS = """() => {
  const c = window.app.canvas;
  const rect = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const find = (selector) => { const el = document.querySelector(selector); return el ? rect(el) : null; };
  const el = c.canvas.getBoundingClientRect();
  const screen = (b) => {
    const [x0, y0] = c.convertOffsetToCanvas([b[0], b[1]]);
    const [x1, y1] = c.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]]);
    return [x0 + el.left, y0 + el.top, x1 - x0, y1 - y0];
  };
  const g = window.app.graph;
  return {
    ds: {scale: c.ds.scale, offset: [...c.ds.offset]},
    canvas: rect(c.canvas),
    side_bar: find('.side-tool-bar-container'),
    tabs: find('.workflow-tabs-container'),
    toolbar: {breadcrumb: find('.subgraph-breadcrumb'), actionbar: find('.actionbar')},
    low_quality: c.low_quality,
    nodes: (g.nodes ?? g._nodes).map(n => ({
      id: String(n.id), type: n.type, bounding: [...n.getBounding()], screen: screen(n.getBounding())})),
  };
}"""
AFTER_TWO_FRAMES_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


class Frontend:
    """One browser page on the ComfyUI frontend, with its console log and screenshots."""

    def __init__(self, page, folder: pathlib.Path):
        self.page = page
        self.folder = folder
        self.console: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def load(self, workflow: dict):
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)

    def view_state(self) -> dict:
        return self.page.evaluate(VIEW_STATE_JS)

    def wait_for_drawing(self):
        self.page.evaluate(AFTER_TWO_FRAMES_JS)

    def graph_state(self) -> list[dict]:
        return self.page.evaluate(GRAPH_STATE_JS)

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def screenshot(self, name: str):
        self.page.screenshot(path=str(self.folder / f"{name}.png"))
        (self.folder / "console.log").write_text("\n".join(self.console + self.page_errors))


@pytest.fixture(scope="module")
def frontend(comfyui, tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -r tests/requirements.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PID_CHROMIUM to its binary)")
    # a returning user: no template browser on start-up
    status, body = comfyui.post("/settings", {"Comfy.TutorialCompleted": True})
    assert status == 200, body
    # the input image of the end-to-end run, there before the page lists the input folder
    write_test_image(comfyui.base_dir / "input" / TEST_IMAGE)
    folder = tmp_path_factory.mktemp("frontend-screenshots")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=WINDOW)
            fe = Frontend(page, folder)
            page.goto(comfyui.base_url)
            try:
                page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=LOAD_TIMEOUT_MS)
            except Exception:
                fe.screenshot("startup-failed")
                raise
            fe.screenshot("startup")
            yield fe
        finally:
            browser.close()


@pytest.fixture(scope="module")
def info(comfyui):
    return comfyui.object_info()


def write_test_image(path: pathlib.Path):
    import numpy as np

    from pid_core.images import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = (np.random.default_rng(0).random((TEST_IMAGE_PX, TEST_IMAGE_PX, 3)) * 255).astype(np.uint8)
    path.write_bytes(encode_png(rgb))


def widget_problems(node: dict, file_node: dict, spec: dict) -> list[str]:
    """The frontend's widgets of one node against /object_info and the file's widgets_values."""
    slots = widget_layout(spec)
    names = [w["name"] for w in node["widgets"]]
    values = [w["value"] for w in node["widgets"]]
    expected = [s["name"].rsplit(".", 1)[-1] for s in slots]  # "seed.control_after_generate" -> its widget
    if names != expected:
        return [f"widgets {names} != {expected} (from /object_info)"]
    problems = []
    if values != file_node["widgets_values"]:
        problems.append(f"frontend values {values} != the file's widgets_values {file_node['widgets_values']}")
    for slot, value in zip(slots, values):
        problem = check_value(slot, value)
        if problem:
            problems.append(f"{slot['name']}: {problem}")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_in_frontend(frontend, comfyui, info, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    errors_before = len(frontend.page_errors)
    frontend.load(wf)
    frontend.wait_for_drawing()
    frontend.screenshot(path.stem)
    state = frontend.graph_state()
    assert frontend.page_errors[errors_before:] == [], f"{path.name}: uncaught errors in the page while loading"

    # what a new user sees: the saved view, every node of this pack on screen, text drawn
    problems = view_problems(frontend.view_state(), wf)
    assert not problems, f"{path.name} (screenshot: {frontend.folder / path.name.replace('.json', '.png')}):\n" \
        + "\n".join(problems)

    # every node is there, with a type the frontend knows (a missing type would be a placeholder node)
    assert sorted(n["id"] for n in state) == sorted(str(n["id"]) for n in wf["nodes"]), path.name
    missing = sorted({n["type"] for n in state if not n["registered"]})
    assert not missing, f"{path.name}: node types missing in the frontend: {missing}"

    # the widgets the frontend built: /object_info's, holding the file's values, each accepted by the node
    file_nodes = {str(n["id"]): n for n in wf["nodes"]}
    problems = []
    for node in state:
        if node["type"] in FRONTEND_ONLY:
            continue
        for problem in widget_problems(node, file_nodes[node["id"]], info[node["type"]]):
            problems.append(f"node {node['id']} ({node['type']}): {problem}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)

    # the frontend's API prompt: what our converter makes of the file, and valid but for the model files
    output = frontend.graph_to_prompt()
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in output.items()}
    assert got == to_api(wf, info), f"{path.name}: graphToPrompt differs from workflow_api.to_api"
    status, body = comfyui.post("/prompt", {"prompt": output, "client_id": comfyui.client_id})
    unexpected = unexpected_validation_errors(status, body)
    assert not unexpected, f"{path.name}:\n" + "\n".join(unexpected)
    loaders = file_loader_ids(wf, info)
    assert loaders <= set(body["node_errors"]), f"{path.name}: {sorted(loaders - set(body['node_errors']))}"


def visible_canvas(view: dict) -> tuple:
    """The part of the canvas element that the side bar and the workflow tabs leave visible (window px)."""
    cx, cy, cw, ch = view["canvas"]
    left = max(cx, view["side_bar"][0] + view["side_bar"][2])
    top = max(cy, view["tabs"][1] + view["tabs"][3])
    return left, top, cx + cw - left, cy + ch - top


def view_problems(view: dict, wf: dict) -> list[str]:
    """What a new user would not see as the file means it to be seen (see the module's docstring)."""
    missing = [name for name in ("side_bar", "tabs") if view[name] is None]
    missing += [name for name, r in view["toolbar"].items() if r is None]
    if missing:
        return [f"the frontend has no {missing}: the visible canvas is unknown (a new frontend?)"]
    problems = []
    saved = wf["extra"]["ds"]
    if abs(view["ds"]["scale"] - saved["scale"]) > 1e-6 or any(
            abs(a - b) > 1e-6 for a, b in zip(view["ds"]["offset"], saved["offset"])):
        problems.append(f"the view after loading {view['ds']} is not the saved one {saved}")
    if view["low_quality"]:
        problems.append(f"drawn in low quality (no node text) at scale {view['ds']['scale']}")
    visible = visible_canvas(view)
    vx, vy, vw, vh = layout.VIEW
    frame = (view["canvas"][0] + vx, view["canvas"][1] + vy, vw, vh)
    if not layout.contains(visible, frame):
        problems.append(f"the visible canvas {layout.fmt_rect(visible)} does not hold the view the files are "
                        f"framed for {layout.fmt_rect(frame)} (tests/workflow_layout.py VIEW)")
    for name, (x, y, w, h) in view["toolbar"].items():
        if y + h > frame[1]:
            problems.append(f"the graph toolbar's {name} reaches y {y + h:.0f}, into the view the files are framed "
                            f"for (from y {frame[1]:.0f})")
    file_nodes = {str(n["id"]): n for n in wf["nodes"]}
    for node in view["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        expected = layout.node_bounds(file_nodes[node["id"]])
        if any(abs(a - b) > 0.5 for a, b in zip(node["bounding"], expected)):
            problems.append(f"{where} is drawn at {node['bounding']}, not at its place and size in the file "
                            f"{list(expected)}: put the drawn size in the file, then run tests/workflow_layout.py")
        if node["type"].startswith(layout.PACK_PREFIX) and not layout.contains(visible, node["screen"]):
            problems.append(f"{where} is at {layout.fmt_rect(node['screen'])} px, not inside the visible canvas "
                            f"{layout.fmt_rect(visible)}")
    return problems


REPLACE_TEXT_ENCODER_JS = """([clipLoader, textEncode, decode]) => {
  const g = window.app.graph;
  const cond = LiteGraph.createNode("PiDTestConditioning");
  cond.pos = [...g.getNodeById(clipLoader).pos];
  g.add(cond);
  cond.connect(0, g.getNodeById(decode), "conditioning");
  g.remove(g.getNodeById(textEncode));
  g.remove(g.getNodeById(clipLoader));
  return cond.widgets.map(w => [w.name, w.value]);
}"""


def test_upscale_workflow_runs_from_the_frontend(frontend, comfyui):
    """workflows/pid_upscale_image_encode_degrade.json, run through the frontend's own queue
    (app.queuePrompt), produces an image 4x its input.

    Substituted, because the real files cannot be here (GBs of licensed weights; nothing may be
    downloaded): in the loaded file, LoadImage's `example.png` by a 64 x 64 random PNG in the server's
    input folder, VAELoader's FLUX.1 `ae.safetensors` by the tiny random FLUX.1-style VAE, and PiD
    Loader's checkpoint by the narrow random PiD checkpoint (the combos' values, as a user would pick
    them). Then, in the frontend, CLIPLoader (Gemma-2-2b-it, type pixeldit) + PiD Text Encode are
    replaced by the test-only PiDTestConditioning node (a seeded random [1, 300, 2304] conditioning, the
    shape of Gemma-2's), connected to PiD Decode's conditioning input (its negative input, for undistilled
    checkpoints, stays unconnected: the 4-step student ignores it): CLIPLoader builds Gemma-2 at its
    fixed full size (2.6 B parameters), far too large here. Everything else runs as in the file:
    Encode-Degrade (sigma 0.2, flux), PiD Loader (weight_dtype auto), PiD Decode (all auto), SaveImage.
    """
    wf = json.loads((ROOT / "workflows" / "pid_upscale_image_encode_degrade.json").read_text(encoding="utf-8"))
    by_type = {n["type"]: n for n in wf["nodes"]}
    by_type["LoadImage"]["widgets_values"][0] = TEST_IMAGE
    by_type["VAELoader"]["widgets_values"][0] = VAE_FILE
    by_type["PixelDiffusionDecoderLoader"]["widgets_values"][0] = PID_FILE
    ids = [by_type[t]["id"] for t in ("CLIPLoader", "PixelDiffusionDecoderTextEncode", "PixelDiffusionDecoderDecode")]
    save_id = str(by_type["SaveImage"]["id"])

    frontend.load(wf)
    frontend.page.evaluate(REPLACE_TEXT_ENCODER_JS, ids)
    frontend.screenshot("e2e-before-queue")
    status, before = comfyui.get("/history")
    assert status == 200
    assert frontend.page.evaluate("async () => await window.app.queuePrompt(0, 1)") is not False

    entry = comfyui.wait(new_prompt_id(comfyui, set(before), timeout=300))  # raises on an error, with its message
    frontend.page.wait_for_function(f"() => !!(window.app.nodeOutputs ?? {{}})[{json.dumps(save_id)}]",
                                    timeout=60_000)
    frontend.screenshot("e2e-done")
    images = entry["outputs"][save_id]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    written = comfyui.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert written.is_file(), written
    from images_helper import read_png

    rgb = read_png(str(written))
    assert rgb.shape == (TEST_IMAGE_PX * 4, TEST_IMAGE_PX * 4, 3)
    assert rgb.std() > 0


def new_prompt_id(comfyui, known: set, timeout: float) -> str:
    """The id of the first prompt not in `known` to reach /history (a prompt enters it when it ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, history = comfyui.get("/history")
        assert status == 200
        new = [k for k in history if k not in known]
        if new:
            return new[0]
        time.sleep(0.5)
    raise TimeoutError(f"the queued prompt did not finish in {timeout}s\n{comfyui.log_tail()}")
