"""Where a workflow's nodes and groups lie, and the saved view (`extra.ds`) that frames them.

ComfyUI's frontend draws a canvas point (x, y) at ((x + offset[0]) * scale, (y + offset[1]) * scale)
pixels from the canvas element's top-left corner (DragAndScale.convertOffsetToCanvas); loading a file
sets offset and scale from `extra.ds`. A node's `pos` is the top-left of its body: its title bar
(NODE_TITLE_HEIGHT) lies above it. A group's `bounding` includes its title.

The view a new user must see everything in (VIEW) is 1600 x 900 px of the canvas, right of ComfyUI's
side bar (59 px wide in frontend 1.49.6) and below its workflow tabs and graph toolbar (which end 38 and
90 px down). The browser test (tests/comfyui/test_frontend.py) checks that in an 1800 x 1100 window.

As a command, fits every group to the nodes inside it and saves the view that frames the workflow:

    python tests/workflow_layout.py workflows/*.json          # rewrite the files
    python tests/workflow_layout.py --check workflows/*.json  # only report what is wrong
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

NODE_TITLE_HEIGHT = 30          # LiteGraph.NODE_TITLE_HEIGHT
GROUP_PADDING = 10              # the frontend's "fit group to nodes" padding (LGraphGroup.resizeTo)
VIEW = (64, 96, 1600, 900)      # left, top, width, height in canvas-element pixels
VIEW_MARGIN = 16                # pixels kept free inside VIEW around the graph
# Below this scale the frontend draws nodes without text (LOD: MinFontSizeForLOD 8 px / NODE_TEXT_SIZE
# 14 px at a device pixel ratio of 1): a 1080p user would see empty boxes. Stricter than the 0.4.
MIN_SCALE = 8 / 14
MAX_SCALE = 1.0
UPPER_PART = 0.5                # the title bar of each node of this pack starts in the top half of VIEW
PACK_PREFIX = "PixelDiffusionDecoder"
NOTE_TYPES = {"Note", "MarkdownNote"}


# --- bounds ----------------------------------------------------------------------------------------

def node_bounds(node: dict) -> tuple[float, float, float, float]:
    """(x, y, width, height) of a node as drawn, its title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - NODE_TITLE_HEIGHT, w, h + NODE_TITLE_HEIGHT


def group_bounds(group: dict) -> tuple[float, float, float, float]:
    return tuple(group["bounding"])


def union(rects) -> tuple[float, float, float, float]:
    rects = list(rects)
    x0 = min(r[0] for r in rects)
    y0 = min(r[1] for r in rects)
    x1 = max(r[0] + r[2] for r in rects)
    y1 = max(r[1] + r[3] for r in rects)
    return x0, y0, x1 - x0, y1 - y0


def workflow_bounds(wf: dict) -> tuple[float, float, float, float]:
    """Everything the frontend draws for the workflow: its nodes (title bars included) and groups."""
    return union([node_bounds(n) for n in wf["nodes"]] + [group_bounds(g) for g in wf["groups"]])


def contains(outer, inner) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def group_members(wf: dict, group: dict) -> list[dict]:
    """The nodes the frontend counts as inside a group: those whose centre lies in it
    (LGraphGroup.recomputeInsideNodes)."""
    gx, gy, gw, gh = group_bounds(group)
    members = []
    for n in wf["nodes"]:
        x, y, w, h = node_bounds(n)
        cx, cy = x + w / 2, y + h / 2
        if gx <= cx < gx + gw and gy <= cy < gy + gh:
            members.append(n)
    return members


# --- the saved view --------------------------------------------------------------------------------

def to_screen(ds: dict, x: float, y: float) -> tuple[float, float]:
    """A canvas point in canvas-element pixels under the view `ds` (DragAndScale.convertOffsetToCanvas)."""
    return (x + ds["offset"][0]) * ds["scale"], (y + ds["offset"][1]) * ds["scale"]


def screen_rect(ds: dict, rect) -> tuple[float, float, float, float]:
    x, y = to_screen(ds, rect[0], rect[1])
    return x, y, rect[2] * ds["scale"], rect[3] * ds["scale"]


def framing_view(wf: dict) -> dict:
    """The `extra.ds` that shows the whole workflow in VIEW, as large as fits (at most MAX_SCALE):
    centred across, at the top (the eye starts there)."""
    bx, by, bw, bh = workflow_bounds(wf)
    left, top, width, height = VIEW
    room_w, room_h = width - 2 * VIEW_MARGIN, height - 2 * VIEW_MARGIN
    scale = math.floor(min(room_w / bw, room_h / bh, MAX_SCALE) * 1000) / 1000
    screen_x = left + VIEW_MARGIN + (room_w - bw * scale) / 2
    screen_y = top + VIEW_MARGIN
    return {"scale": scale, "offset": [round(screen_x / scale - bx, 1), round(screen_y / scale - by, 1)]}


def view_problems(wf: dict) -> list[str]:
    """What is wrong with a workflow's saved view: nothing outside VIEW, scale at least MIN_SCALE,
    every node of this pack starting in the upper part of VIEW."""
    ds = wf.get("extra", {}).get("ds")
    if not ds:
        return ["no saved view (extra.ds)"]
    problems = []
    if ds["scale"] < MIN_SCALE:
        problems.append(f"scale {ds['scale']} is below {MIN_SCALE:.3f} (the frontend drops node text)")
    view = VIEW
    items = [(f"node {n['id']} ({n['type']})", node_bounds(n)) for n in wf["nodes"]]
    items += [(f"group {g['title']!r}", group_bounds(g)) for g in wf["groups"]]
    for name, rect in items:
        on_screen = screen_rect(ds, rect)
        if not contains(view, on_screen):
            problems.append(f"{name} is drawn at {fmt_rect(on_screen)}, outside the view {fmt_rect(view)}")
    upper_limit = view[1] + UPPER_PART * view[3]
    for n in wf["nodes"]:
        if n["type"].startswith(PACK_PREFIX):
            top = screen_rect(ds, node_bounds(n))[1]
            if top > upper_limit:
                problems.append(f"node {n['id']} ({n['type']}) starts at y {top:.0f} px, below the upper part "
                                f"(y <= {upper_limit:.0f})")
    return problems


def layout_problems(wf: dict) -> list[str]:
    """Overlaps and half-grouped nodes: no two nodes overlap, nor two groups; a node a group counts as
    its own lies wholly inside it."""
    problems = []
    nodes = wf["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlaps(node_bounds(a), node_bounds(b)):
                problems.append(f"nodes {a['id']} ({a['type']}) and {b['id']} ({b['type']}) overlap")
    groups = wf["groups"]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if overlaps(group_bounds(a), group_bounds(b)):
                problems.append(f"groups {a['title']!r} and {b['title']!r} overlap")
    for g in groups:
        for n in group_members(wf, g):
            if not contains(group_bounds(g), node_bounds(n)):
                problems.append(f"node {n['id']} ({n['type']}) sticks out of group {g['title']!r}")
    return problems


def fmt_rect(rect) -> str:
    """(x, y, w x h), rounded: for messages."""
    return "({:.0f}, {:.0f}, {:.0f} x {:.0f})".format(*rect)


# --- rewriting a file ------------------------------------------------------------------------------

def fit_groups(wf: dict) -> None:
    """Each group resized to the nodes inside it, as the frontend's "fit group to nodes" does: the
    nodes' bounds plus GROUP_PADDING, and the group's title bar above them."""
    for g in wf["groups"]:
        members = group_members(wf, g)
        if not members:
            continue
        x, y, w, h = union(node_bounds(n) for n in members)
        g["bounding"] = [x - GROUP_PADDING, y - GROUP_PADDING - NODE_TITLE_HEIGHT,
                         w + 2 * GROUP_PADDING, h + 2 * GROUP_PADDING + NODE_TITLE_HEIGHT]


def reframe(wf: dict) -> dict:
    """fit_groups, then the framing view saved in extra.ds; returns the workflow."""
    fit_groups(wf)
    wf.setdefault("extra", {})["ds"] = framing_view(wf)
    return wf


def dump(wf: dict) -> str:
    """The files' own format (two-space indent, UTF-8 as is, a final newline)."""
    return json.dumps(wf, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [pathlib.Path(a) for a in argv if a != "--check"]
    if not paths:
        print(__doc__)
        return 2
    failed = False
    for path in paths:
        wf = json.loads(path.read_text(encoding="utf-8"))
        if not check:
            path.write_text(dump(reframe(wf)), encoding="utf-8")
        problems = view_problems(wf) + layout_problems(wf)
        failed |= bool(problems)
        print(f"{path.name}: scale {wf['extra']['ds']['scale']}, bounds {fmt_rect(workflow_bounds(wf))}"
              + "".join(f"\n  {p}" for p in problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
