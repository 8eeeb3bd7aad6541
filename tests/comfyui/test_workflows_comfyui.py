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

from .workflow_api import FRONTEND_ONLY, file_loader_ids, sockets, to_api, unexpected_validation_errors, widget_layout

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


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
    status, body = comfyui.post("/prompt", {"prompt": to_api(wf, info), "client_id": comfyui.client_id})
    unexpected = unexpected_validation_errors(status, body)
    assert not unexpected, f"{path.name}:\n" + "\n".join(unexpected)
    # every loader with a file was reported, so the check above really saw each node's inputs
    loaders = file_loader_ids(wf, info)
    assert loaders <= set(body["node_errors"]), f"{path.name}: {sorted(loaders - set(body['node_errors']))}"
