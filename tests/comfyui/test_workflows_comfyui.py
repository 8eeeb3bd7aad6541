"""The workflows in workflows/ against a real ComfyUI (its /object_info and POST /prompt validation).

Skipped unless COMFYUI_PATH and COMFYUI_PY are set (see conftest.py). For every node of every workflow,
core nodes included: the type exists; its sockets and outputs are the server's; widgets_values fit the
server's widget inputs in the frontend's order (required then optional inputs, socket types skipped, an
extra value after a control_after_generate input and after a required image-upload combo); combo values
are among the options (model-file combos take any string: the files are not installed here); numbers
are within range. Then each workflow, converted to the API format, goes through the server's own
validation, where the only errors allowed are the missing model files.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from workflow_checks import check_value

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Combos that list files on disk: any file name is accepted (none of the real models is installed).
FILE_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name",
               "ckpt_name", "image", "pid_name"}
UPLOAD_FLAGS = ("image_upload", "animated_image_upload", "video_upload")


def widget_layout(spec: dict) -> list[dict]:
    """The widgets_values slots of a node, from its /object_info entry, in the frontend's order."""
    slots = []
    for section in ("required", "optional"):
        inputs = spec["input"].get(section, {})
        upload = False
        for name in spec.get("input_order", {}).get(section) or list(inputs):
            entry = inputs[name]
            kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            if isinstance(kind, list):
                kind, options = "COMBO", kind
            elif kind == "COMBO":
                options = opts.get("options", [])
            elif kind in WIDGET_TYPES:
                options = None
            else:
                continue  # a socket
            if opts.get("forceInput"):
                continue
            slots.append({"name": name, "type": kind, "options": options, "min": opts.get("min"),
                          "max": opts.get("max"), "file": kind == "COMBO" and name in FILE_INPUTS})
            if opts.get("control_after_generate"):
                slots.append({"name": f"{name}.control_after_generate", "type": "CONTROL", "api": False})
            upload = upload or (kind == "COMBO" and any(opts.get(f) for f in UPLOAD_FLAGS))
        if upload and section == "required":  # the frontend appends an "upload" widget to required
            slots.append({"name": "upload", "type": "UPLOAD", "api": False})
    return slots


def sockets(spec: dict) -> list[tuple[str, str]]:
    out = []
    for section in ("required", "optional"):
        inputs = spec["input"].get(section, {})
        for name in spec.get("input_order", {}).get(section) or list(inputs):
            entry = inputs[name]
            kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            if isinstance(kind, list) or kind == "COMBO" or (kind in WIDGET_TYPES and not opts.get("forceInput")):
                continue
            if opts.get("socketless"):
                continue
            out.append((name, kind))
    return out


def to_api(wf: dict, info: dict) -> dict:
    """The UI workflow as POST /prompt takes it (what the frontend's graphToPrompt does for these graphs)."""
    links = {link[0]: link for link in wf["links"]}
    graph = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) != 0:
            continue
        inputs = {}
        for slot, value in zip(widget_layout(info[n["type"]]), n["widgets_values"]):
            if slot.get("api", True):
                inputs[slot["name"]] = value
        for inp in n["inputs"]:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        graph[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return graph


@pytest.fixture(scope="module")
def info(comfyui):
    return comfyui.object_info()


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 8


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_nodes_exist_and_widgets_fit(info, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for n in wf["nodes"]:
        where = f"node {n['id']} ({n['type']})"
        if n["type"] in FRONTEND_ONLY:
            continue
        if n["type"] not in info:
            problems.append(f"{where}: no such node type on this ComfyUI")
            continue
        spec = info[n["type"]]
        # sockets and outputs as the server declares them; every required socket connected
        declared = [(i["name"], i["type"]) for i in n["inputs"] if "widget" not in i]
        if declared != sockets(spec):
            problems.append(f"{where}: inputs {declared} != server's sockets {sockets(spec)}")
        required = set(spec["input"].get("required", {}))
        for i in n["inputs"]:
            if i["name"] in required and i.get("link") is None and "widget" not in i:
                problems.append(f"{where}: required input {i['name']} is not connected")
        outputs = [(o["name"], o["type"]) for o in n["outputs"]]
        if outputs != list(zip(spec["output_name"], spec["output"])):
            problems.append(f"{where}: outputs {outputs} != server's {list(zip(spec['output_name'], spec['output']))}")
        # widgets_values
        slots = widget_layout(spec)
        values = n["widgets_values"]
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values for {len(slots)} widgets {[s['name'] for s in slots]}")
            continue
        for slot, value in zip(slots, values):
            problem = check_value(slot, value)
            if problem:
                problems.append(f"{where}: {slot['name']}: {problem}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_server_validation_only_misses_model_files(comfyui, info, path):
    """POST /prompt validates every input with ComfyUI's own rules; the model files are not installed
    here, so the only errors allowed are on file inputs (and nothing runs: every output needs a file)."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    graph = to_api(wf, info)
    status, body = comfyui.post("/prompt", {"prompt": graph, "client_id": comfyui.client_id})
    assert status == 400, f"{path.name}: expected a validation failure for the missing model files, got {status}: {body}"
    assert isinstance(body, dict) and body.get("node_errors"), f"{path.name}: {body}"
    unexpected = []
    for node_id, entry in body["node_errors"].items():
        for err in entry["errors"]:
            name = (err.get("extra_info") or {}).get("input_name")
            if name not in FILE_INPUTS or err["type"] not in ("value_not_in_list", "custom_validation_failed"):
                unexpected.append(f"node {node_id} ({entry.get('class_type')}): {err['type']}: {err['message']}: "
                                  f"{err['details']}")
    assert not unexpected, f"{path.name}:\n" + "\n".join(unexpected)
    # every loader with a file was reported, so the check above really saw each node's inputs
    loaders = {str(n["id"]) for n in wf["nodes"]
               if n["type"] not in FRONTEND_ONLY and any(s.get("file") for s in widget_layout(info[n["type"]]))}
    assert loaders <= set(body["node_errors"]), f"{path.name}: {sorted(loaders - set(body['node_errors']))}"
