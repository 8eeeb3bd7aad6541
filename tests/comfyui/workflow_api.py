"""What a UI-format workflow is to a real ComfyUI: its widgets as /object_info declares them, the
API-format prompt, and which validation errors of POST /prompt are expected here.

Shared by the workflow tests against the server (test_workflows_comfyui.py, which converts the files
itself) and against the real frontend in a browser (test_frontend.py, where the frontend converts).
"""

from __future__ import annotations

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


def unexpected_validation_errors(status: int, body) -> list[str]:
    """POST /prompt's answer for a workflow whose model files are not installed: a validation failure
    (HTTP 400) whose only errors are on file inputs. Returns what else it reported (empty: as expected)."""
    if status != 400:
        return [f"expected a validation failure for the missing model files, got {status}: {body}"]
    if not isinstance(body, dict) or not body.get("node_errors"):
        return [f"a 400 without node_errors: {body}"]
    unexpected = []
    for node_id, entry in body["node_errors"].items():
        for err in entry["errors"]:
            name = (err.get("extra_info") or {}).get("input_name")
            if name not in FILE_INPUTS or err["type"] not in ("value_not_in_list", "custom_validation_failed"):
                unexpected.append(f"node {node_id} ({entry.get('class_type')}): {err['type']}: {err['message']}: "
                                  f"{err['details']}")
    return unexpected


def file_loader_ids(wf: dict, info: dict) -> set[str]:
    """Ids of the workflow's nodes with a model-file input (each must be reported as missing its file)."""
    return {str(n["id"]) for n in wf["nodes"]
            if n["type"] not in FRONTEND_ONLY and any(s.get("file") for s in widget_layout(info[n["type"]]))}
