"""The check of one widget value against its widget, shared by the workflow tests (against our node
schemas read statically, and against a real ComfyUI's /object_info)."""

from __future__ import annotations

SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}


def check_value(slot: dict, value) -> str | None:
    """None when `value` fits the widget, else what is wrong. slot: type (INT, FLOAT, BOOLEAN, STRING,
    COMBO, CONTROL for control_after_generate, UPLOAD for an image-upload widget), min, max, options
    (None: any string) and optionally file (a combo listing files on disk: any name is accepted)."""
    t = slot["type"]
    if t == "CONTROL":
        return None if value in SEED_CONTROLS else f"{value!r} is not a seed control ({sorted(SEED_CONTROLS)})"
    if t == "UPLOAD":
        return None if value == "image" else f"{value!r} is not the upload widget's value 'image'"
    if t == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an INT"
    if t == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{value!r} is not a FLOAT"
    if t == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if t in ("STRING", "COMBO") and not isinstance(value, str):
        return f"{value!r} is not a string"
    if t == "COMBO" and not slot.get("file") and slot["options"] is not None and value not in slot["options"]:
        return f"{value!r} is not among {slot['options'][:30]}"
    if t in ("INT", "FLOAT"):
        if slot["min"] is not None and value < slot["min"]:
            return f"{value!r} is below the minimum {slot['min']}"
        if slot["max"] is not None and value > slot["max"]:
            return f"{value!r} is above the maximum {slot['max']}"
    return None
