"""The UI-format workflows in workflows/: structure, links, node types, our nodes' widget values, model links,
and the layout a user opens: the saved view frames the whole graph (tests/workflow_layout.py), groups are
numbered steps, every group with a file loader holds a note naming its files.

Runs without ComfyUI. The widget lists of this pack's nodes are read from the node code itself (the
`io.Schema(...)` in nodes/*.py, parsed with `ast`, never imported: the node modules import ComfyUI), so a
new, removed or reordered input breaks these tests until the workflows are updated. Core nodes are
checked against a real ComfyUI's /object_info in tests/comfyui/test_workflows_comfyui.py.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import sys
from urllib.parse import urlparse

import pytest

import workflow_layout as layout
from pid_core.latent_formats import COMFY_FORMATS
from pid_core.precision import DTYPES
from workflow_checks import check_value

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
NODE_FILES = ("early_stop.py", "loader.py", "decode.py", "encode_degrade.py", "text_encode.py")
sys.path.insert(0, str(ROOT / "nodes"))
import comfy_models  # noqa: E402  (plain tables, no ComfyUI import)

# ComfyUI core node types the workflows may use (all present in ComfyUI v0.33.0; checked against a real
# server by the integration test). Widen deliberately: a workflow must load on a plain ComfyUI + this pack.
CORE_TYPES = {
    "CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader",
    "CLIPTextEncode", "ConditioningZeroOut", "FluxGuidance", "ModelSamplingFlux", "ModelSamplingAuraFlow",
    "ModelSamplingSD3", "EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage", "KSampler",
    "VAEDecode", "VAEEncode", "SaveImage", "PreviewImage", "LoadImage", "ImageScaleToTotalPixels",
}
# Nodes that exist only in the frontend (never sent to the server).
FRONTEND_ONLY = {"Note", "MarkdownNote"}
MODEL_DIRECTORIES = {"diffusion_models", "text_encoders", "vae", "checkpoints", "pid"}
PID_REPO = "https://huggingface.co/Comfy-Org/PixelDiT/resolve/main/"
OFFICIAL_REPO = "https://huggingface.co/nvidia/PiD/resolve/main/"

# io.<X>.Input / .Output -> socket or widget type
IO_TYPES = {
    "Int": "INT", "Float": "FLOAT", "Boolean": "BOOLEAN", "String": "STRING", "Combo": "COMBO",
    "Model": "MODEL", "Latent": "LATENT", "Conditioning": "CONDITIONING", "Image": "IMAGE", "Vae": "VAE",
    "Clip": "CLIP", "Mask": "MASK", "Sigmas": "SIGMAS", "Sampler": "SAMPLER", "Noise": "NOISE", "Guider": "GUIDER",
}
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}


# --- our nodes' schemas, from the node code ----------------------------------------------------------

class Unknown(Exception):
    """An expression the schema reader cannot evaluate without ComfyUI (e.g. the sampler list)."""


def _evaluate(node, env):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, env)
    if isinstance(node, (ast.List, ast.Tuple)):
        out = []
        for elt in node.elts:
            if isinstance(elt, ast.Starred):
                out.extend(_evaluate(elt.value, env))
            else:
                out.append(_evaluate(elt, env))
        return out
    if isinstance(node, ast.Dict):  # only the keys matter here; {**other} merges other's keys
        out = {}
        for key, value in zip(node.keys, node.values):
            out.update(dict.fromkeys(_evaluate(value, env)) if key is None else {_evaluate(key, env): None})
        return out
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        raise Unknown(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("list", "tuple") \
            and len(node.args) == 1:
        return list(_evaluate(node.args[0], env))
    raise Unknown(ast.dump(node)[:80])


def _socket_type(func, customs):
    """io.Int -> INT, PidModel (an io.Custom(...)) -> its type name."""
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "io":
        return IO_TYPES[func.attr]
    if isinstance(func, ast.Name) and func.id in customs:
        return customs[func.id]
    raise AssertionError(f"unknown input/output kind {ast.dump(func)[:80]}")


def _module_names(path: pathlib.Path, env: dict, customs: dict) -> None:
    """Module-level constants and io.Custom(...) socket types of a node file, into env and customs."""
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name, value = stmt.targets[0].id, stmt.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "Custom":
                customs[name] = _evaluate(value.args[0], env)
                continue
            try:
                env[name] = _evaluate(value, env)
            except Unknown:
                pass


# What the node files import: the shared constants (nodes/common.py), the ComfyUI tables, the dtype names.
COMMON, COMMON_CUSTOMS = {}, {}
_module_names(ROOT / "nodes" / "common.py", COMMON, COMMON_CUSTOMS)
COMMON.update({k: v for k, v in vars(comfy_models).items() if k.isupper()}, DTYPES=DTYPES,
              LATENT_FORMAT_NAMES=tuple(COMFY_FORMATS.values()))  # common.py derives it from the format table


OUR_IDS = {
    COMMON["NODE_ID_EARLY_STOP"], COMMON["NODE_ID_LOADER"], COMMON["NODE_ID_DECODE"], COMMON["NODE_ID_ENCODE_DEGRADE"],
    COMMON["NODE_ID_TEXT_ENCODE"],
}


def read_node_schema(path: pathlib.Path) -> dict:
    """{node_id, inputs: [{name, type, optional, default, min, max, options, control}], outputs: [(name, type)]}."""
    tree = ast.parse(path.read_text())
    env, customs = dict(COMMON), dict(COMMON_CUSTOMS)
    _module_names(path, env, customs)
    schemas = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "Schema"]
    assert len(schemas) == 1, f"{path.name}: expected one io.Schema(...)"
    kw = {k.arg: k.value for k in schemas[0].keywords}
    schema = {"node_id": _evaluate(kw["node_id"], env), "inputs": [], "outputs": []}
    for call in kw["inputs"].elts:
        assert isinstance(call, ast.Call) and call.func.attr == "Input", ast.dump(call)[:80]
        args = {k.arg: k.value for k in call.keywords}
        spec = {"name": _evaluate(call.args[0], env), "type": _socket_type(call.func.value, customs),
                "optional": False, "default": None, "min": None, "max": None, "options": None, "control": False}
        for key in ("optional", "default", "min", "max", "options"):
            if key in args:
                try:
                    spec[key] = _evaluate(args[key], env)
                except Unknown:
                    spec[key] = None  # e.g. comfy.samplers.KSampler.SAMPLERS, list_pid_files(): any string
        if "control_after_generate" in args:
            spec["control"] = bool(_evaluate(args["control_after_generate"], env))
        schema["inputs"].append(spec)
    for call in kw["outputs"].elts:
        assert isinstance(call, ast.Call) and call.func.attr == "Output", ast.dump(call)[:80]
        args = {k.arg: k.value for k in call.keywords}
        name = _evaluate(args["display_name"], env) if "display_name" in args else _evaluate(call.args[0], env)
        schema["outputs"].append((name, _socket_type(call.func.value, customs)))
    # ComfyUI lists required inputs first, then optional ones; widgets follow that order
    schema["inputs"].sort(key=lambda s: s["optional"])
    return schema


OUR_SCHEMAS = {s["node_id"]: s for s in (read_node_schema(ROOT / "nodes" / f) for f in NODE_FILES)}


def widget_slots(schema) -> list[dict]:
    """The widgets_values layout of a node: one slot per widget input, plus the seed control after it."""
    slots = []
    for spec in schema["inputs"]:
        if spec["type"] not in WIDGET_TYPES:
            continue
        slots.append(spec)
        if spec["control"]:
            slots.append({"name": spec["name"] + ".control_after_generate", "type": "CONTROL"})
    return slots


# --- helpers ---------------------------------------------------------------------------------------

def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def nodes_by_id(wf):
    return {n["id"]: n for n in wf["nodes"]}


def ids(paths):
    return [p.name for p in paths]


# --- the schema reader itself ----------------------------------------------------------------------

def test_schema_reader_finds_all_our_nodes():
    assert set(OUR_SCHEMAS) == OUR_IDS
    decode = OUR_SCHEMAS[COMMON["NODE_ID_DECODE"]]
    assert [s["name"] for s in decode["inputs"]][:3] == ["pid_model", "latent", "conditioning"]
    assert decode["inputs"][0]["type"] == COMMON["PID_MODEL_TYPE"]
    assert OUR_SCHEMAS[COMMON["NODE_ID_LOADER"]]["outputs"] == [("pid_model", COMMON["PID_MODEL_TYPE"])]
    fmt = next(s for s in decode["inputs"] if s["name"] == "latent_format")
    assert fmt["options"] == ["auto", "flux", "sd3", "sdxl", "flux2", "qwenimage"]
    seed = next(s for s in decode["inputs"] if s["name"] == "seed")
    assert seed["control"] and seed["min"] == 0
    for schema in OUR_SCHEMAS.values():
        assert widget_slots(schema), schema["node_id"]


def test_there_are_workflows():
    names = {p.name for p in WORKFLOWS}
    assert "pid_flux1_text_to_2k_early_stop.json" in names
    assert len(WORKFLOWS) >= 8


# --- per workflow ----------------------------------------------------------------------------------

@pytest.fixture(params=WORKFLOWS, ids=ids(WORKFLOWS))
def workflow(request):
    return request.param, load(request.param)


def test_top_level_format(workflow):
    path, wf = workflow
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, f"{path.name}: no {key!r}"
    assert wf["version"] == 0.4
    node_ids = [n["id"] for n in wf["nodes"]]
    link_ids = [link[0] for link in wf["links"]]
    assert len(node_ids) == len(set(node_ids)), "duplicate node ids"
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    assert wf["last_node_id"] >= max(node_ids)
    assert wf["last_link_id"] >= max(link_ids, default=0)
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in n, f"{path.name}: node {n.get('id')} has no {key!r}"
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        assert n["mode"] == 0, f"node {n['id']} ({n['type']}) is muted or bypassed"
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(wf["nodes"])))
    for g in wf["groups"]:
        assert g["title"] and len(g["bounding"]) == 4


def test_links_are_consistent(workflow):
    path, wf = workflow
    nodes = nodes_by_id(wf)
    links = {}
    for link in wf["links"]:
        assert len(link) == 6, link
        lid, src, src_slot, dst, dst_slot, ltype = link
        links[lid] = link
        assert src in nodes and dst in nodes, f"link {lid}: endpoint missing"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == ltype == inp["type"], f"link {lid}: {out['type']} -> {ltype} -> {inp['type']}"
        assert lid in (out["links"] or []), f"link {lid} missing from node {src} output {src_slot}"
        assert inp["link"] == lid, f"link {lid} is not node {dst} input {dst_slot}'s link"
    for n in wf["nodes"]:
        for slot, inp in enumerate(n["inputs"]):
            if inp.get("link") is not None:
                lid = inp["link"]
                assert lid in links, f"node {n['id']} input {inp['name']}: link {lid} not in links"
                assert links[lid][3:5] == [n["id"], slot], f"node {n['id']} input {inp['name']}: link {lid} points elsewhere"
        for slot, out in enumerate(n["outputs"]):
            if out.get("slot_index") is not None:
                assert out["slot_index"] == slot
            expected = sorted(lid for lid, link in links.items() if link[1] == n["id"] and link[2] == slot)
            assert sorted(out["links"] or []) == expected, f"node {n['id']} output {out['name']}"
    # execution order follows the links
    for lid, src, _, dst, _, _ in wf["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"], f"link {lid}: order"


def test_node_types_are_allowed(workflow):
    path, wf = workflow
    for n in wf["nodes"]:
        assert n["type"] in CORE_TYPES | OUR_IDS | FRONTEND_ONLY, f"{path.name}: node type {n['type']!r}"
        if n["type"] in FRONTEND_ONLY:
            assert not n["inputs"] and not n["outputs"]
            assert len(n["widgets_values"]) == 1 and isinstance(n["widgets_values"][0], str)
        else:
            assert n["properties"].get("Node name for S&R") == n["type"]
    assert any(n["type"] in OUR_IDS for n in wf["nodes"])


def test_our_nodes_fit_their_schema(workflow):
    path, wf = workflow
    for n in wf["nodes"]:
        schema = OUR_SCHEMAS.get(n["type"])
        if schema is None:
            continue
        where = f"{path.name} node {n['id']} ({n['type']})"
        # sockets: names and types in the schema's order, every required one linked
        sockets = [s for s in schema["inputs"] if s["type"] not in WIDGET_TYPES]
        assert [(i["name"], i["type"]) for i in n["inputs"]] == [(s["name"], s["type"]) for s in sockets], where
        for inp, spec in zip(n["inputs"], sockets):
            assert spec["optional"] or inp["link"] is not None, f"{where}: required input {inp['name']} not connected"
        assert [(o["name"], o["type"]) for o in n["outputs"]] == schema["outputs"], where
        # widgets_values: count, types, combos, ranges
        slots = widget_slots(schema)
        values = n["widgets_values"]
        assert len(values) == len(slots), (
            f"{where}: {len(values)} widget values for {len(slots)} widgets {[s['name'] for s in slots]}")
        for slot, value in zip(slots, values):
            problem = check_value(slot, value)
            assert problem is None, f"{where}: {slot['name']}: {problem}"
        assert n["properties"].get("cnr_id") == "comfyui-pid-decoder", where


def test_model_links(workflow):
    path, wf = workflow
    for n in wf["nodes"]:
        models = n["properties"].get("models")
        if models is None:
            continue
        where = f"{path.name} node {n['id']} ({n['type']})"
        assert isinstance(models, list) and models, where
        for entry in models:
            assert set(entry) >= {"name", "url", "directory"}, where
            url = urlparse(entry["url"])
            assert url.scheme == "https" and url.netloc, f"{where}: {entry['url']}"
            # the name may keep the official folder (<experiment>/model_ema_bf16.pth): the URL ends with it
            assert url.path.endswith("/" + entry["name"]), f"{where}: the URL does not end in {entry['name']}"
            assert entry["directory"] in MODEL_DIRECTORIES, where
            assert entry["name"] in n["widgets_values"], f"{where}: {entry['name']} is not the file the node loads"
    # every loader of a model file says where to get it
    for n in wf["nodes"]:
        if n["type"] in ("UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "CheckpointLoaderSimple",
                         COMMON["NODE_ID_LOADER"]):
            assert n["properties"].get("models"), f"{path.name} node {n['id']} ({n['type']}) has no properties.models"


UNDISTILLED = r"PiD_v1pt5_res2kto4k_sr4x_official_(flux|flux2|qwenimage)_undistilled/model_ema_bf16\.pth"


def test_pid_files_and_text_encoder(workflow):
    """PiD checkpoints come from Comfy-Org/PixelDiT (students) or nvidia/PiD (undistilled, official files only);
    PiD's conditioning is Gemma-2 via CLIPLoader(pixeldit) and PiD Text Encode, positive and negative."""
    path, wf = workflow
    nodes = nodes_by_id(wf)
    for n in wf["nodes"]:
        if n["type"] == COMMON["NODE_ID_LOADER"]:
            name = n["widgets_values"][0]
            if re.fullmatch(UNDISTILLED, name):
                assert n["properties"]["models"] == [
                    {"name": name, "url": OFFICIAL_REPO + "checkpoints/" + name, "directory": "pid"}]
                continue
            assert re.fullmatch(r"pid_(flux1|flux2|sd3|sdxl|qwenimage)_(512_to_2048|1024_to_4096)_4step_bf16\.safetensors",
                                name), name
            assert n["properties"]["models"] == [
                {"name": name, "url": PID_REPO + "diffusion_models/" + name, "directory": "diffusion_models"}]
        if n["type"] == COMMON["NODE_ID_DECODE"]:
            link = wf_link(wf, n, "conditioning")
            text = nodes[link[1]]
            assert text["type"] == COMMON["NODE_ID_TEXT_ENCODE"] and link[2] == 0, path.name  # its positive
            negative = wf_link(wf, n, "negative")
            assert negative[1] == text["id"] and negative[2] == 1, path.name  # the same node's negative
            clip = nodes[wf_link(wf, text, "clip")[1]]
            assert clip["type"] == "CLIPLoader" and clip["widgets_values"][1] == "pixeldit", path.name
            assert clip["properties"]["models"][0]["url"] == PID_REPO + "text_encoders/" + clip["widgets_values"][0]
    assert not any(n["type"] == "CLIPTextEncode" and n.get("title", "").startswith("PiD") for n in wf["nodes"])


def test_the_undistilled_workflow_runs_the_guided_sampler():
    wf = load(ROOT / "workflows" / "pid_flux1_undistilled_4k.json")
    schema = OUR_SCHEMAS[COMMON["NODE_ID_DECODE"]]
    decode = next(n for n in wf["nodes"] if n["type"] == COMMON["NODE_ID_DECODE"])
    values = {slot["name"]: value for slot, value in zip(widget_slots(schema), decode["widgets_values"])}
    assert (values["steps"], values["cfg"], values["sampler"]) == (25, 5.0, "teacher")
    loader = next(n for n in wf["nodes"] if n["type"] == COMMON["NODE_ID_LOADER"])
    assert "undistilled" in loader["widgets_values"][0]


def wf_link(wf, node, input_name):
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    return next(link for link in wf["links"] if link[0] == inp["link"])


def test_has_a_note_with_the_licence(workflow):
    path, wf = workflow
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in FRONTEND_ONLY]
    assert notes, f"{path.name}: no Note"
    text = "\n".join(notes)
    assert "non-commercial" in text and "models/" in text, path.name


# --- what a user sees on opening a file (tests/workflow_layout.py) ----------------------------------

REFRAME = "python tests/workflow_layout.py workflows/*.json fits the groups and saves the framing view"
# Nodes where the user picks a file: each of their groups holds a note that names the files.
FILE_LOADERS = {"UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader",
                "CheckpointLoaderSimple", "LoadImage", COMMON["NODE_ID_LOADER"]}


def _toy_workflow():
    """Two nodes and a group around them, at 1:1."""
    return {"nodes": [{"id": 1, "type": "VAELoader", "pos": [0, 0], "size": [300, 60]},
                      {"id": 2, "type": COMMON["NODE_ID_DECODE"], "pos": [400, 0], "size": [300, 330]}],
            "groups": [{"title": "1. Decode", "bounding": [-10, -70, 720, 420]}], "extra": {}}


def test_the_layout_helper_counts_title_bars_and_frames_the_bounds():
    wf = _toy_workflow()
    assert layout.node_bounds(wf["nodes"][0]) == (0, -layout.NODE_TITLE_HEIGHT, 300, 60 + layout.NODE_TITLE_HEIGHT)
    assert layout.workflow_bounds(wf) == (-10, -70, 720, 420)
    assert layout.view_problems(wf) == ["no saved view (extra.ds)"]
    wf["extra"]["ds"] = layout.framing_view(wf)
    assert layout.view_problems(wf) == [] and layout.layout_problems(wf) == []
    assert wf["extra"]["ds"]["scale"] == layout.MAX_SCALE  # small enough for 1:1
    # the group's top-left lands at the view's top-left corner, inside its margin
    x, y = layout.to_screen(wf["extra"]["ds"], -10, -70)
    assert y == pytest.approx(layout.VIEW[1] + layout.VIEW_MARGIN, abs=0.5)
    assert x > layout.VIEW[0]


def test_the_layout_helper_finds_what_is_off_screen_too_small_or_low():
    wf = _toy_workflow()
    wf["extra"]["ds"] = layout.framing_view(wf)
    wf["nodes"][1]["pos"] = [400, -200]  # its title bar leaves the group and the view
    problems = layout.view_problems(wf) + layout.layout_problems(wf)
    assert any("node 2" in p and "outside the view" in p for p in problems), problems
    assert any("sticks out of group" in p for p in problems), problems
    wf = _toy_workflow()
    wf["nodes"][1]["pos"] = [0, 3000]  # far below: framing it needs a scale too small for text
    layout.reframe(wf)
    problems = layout.view_problems(wf)
    assert any("below 0.571" in p for p in problems), problems
    wf = _toy_workflow()
    wf["nodes"].append({"id": 3, "type": "SaveImage", "pos": [0, 80], "size": [300, 1000]})
    wf["nodes"][1]["pos"] = [400, 900]  # PiD Decode at the bottom of a tall graph
    layout.reframe(wf)
    problems = layout.view_problems(wf)
    assert any("node 2" in p and "below the upper part" in p for p in problems), problems
    assert any("nodes 1 (VAELoader) and 3 (SaveImage) overlap" in p for p in problems + layout.layout_problems(wf))


def test_the_saved_view_frames_the_workflow(workflow):
    """extra.ds shows every node (title bar included) and group inside the 1600 x 900 px view at a
    scale where the frontend draws node text, with this pack's nodes starting in its upper half."""
    path, wf = workflow
    problems = layout.view_problems(wf)
    assert not problems, f"{path.name} ({REFRAME}):\n" + "\n".join(problems)


def test_nodes_and_groups_do_not_overlap(workflow):
    path, wf = workflow
    problems = layout.layout_problems(wf)
    assert not problems, f"{path.name} ({REFRAME}):\n" + "\n".join(problems)


def test_groups_are_numbered_steps(workflow):
    path, wf = workflow
    titles = sorted(g["title"] for g in wf["groups"])
    assert titles, f"{path.name}: no groups"
    for number, title in enumerate(titles, start=1):
        assert re.fullmatch(rf"{number}\. \S.*", title), f"{path.name}: groups {titles} are not steps 1, 2, ..."
    assert any(re.match(r"\d+\. PiD decode", t) for t in titles), f"{path.name}: no 'N. PiD decode' step"
    grouped = {n["id"] for g in wf["groups"] for n in layout.group_members(wf, g)}
    loose = [f"{n['id']} ({n['type']})" for n in wf["nodes"] if n["id"] not in grouped and n["type"] not in FRONTEND_ONLY]
    assert not loose, f"{path.name}: nodes in no group: {loose}"


def test_every_file_loader_has_a_note_naming_its_files(workflow):
    path, wf = workflow
    for g in wf["groups"]:
        members = layout.group_members(wf, g)
        loaders = [n for n in members if n["type"] in FILE_LOADERS]
        if not loaders:
            continue
        notes = "\n".join(n["widgets_values"][0] for n in members if n["type"] in FRONTEND_ONLY)
        assert notes, f"{path.name}: group {g['title']!r} has file loaders and no note"
        for n in loaders:
            names = [m["name"] for m in n["properties"].get("models", [])] or ["image"]  # LoadImage: the user's
            for name in names:
                assert name in notes, f"{path.name}: the note of group {g['title']!r} does not name {name}"
