"""The GPU kit's report: one Markdown file from a run's results (tests/gpu/run.sh writes it).

    python report.py RESULTS_DIR OUT.md

RESULTS_DIR holds what run.sh gathers, any of it possibly missing (a phase that failed or ran out of
time: the report says so instead of failing):

    env.json          the machine and versions (GPU, driver, torch, CUDA, ComfyUI, pack commit, mode)
    phases.json       each phase of run.sh: seconds and exit status
    checkpoints.json  make_checkpoints.py's manifest (sizes of the random checkpoints)
    pytest.xml        pytest -m gpu's JUnit XML; each test's figures are its recorded properties
    tests.jsonl       the same, a line per test as it finished (read when pytest.xml is missing)
    bench.json        bench_core.py: PiD Decode against core ComfyUI's PiD
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import xml.etree.ElementTree as ET

ENGINE_TEST = "pid_decode_is_pid_core_decode"
ENGINE_TOLERANCE = 1.05  # PiD Decode within 5% of pid_core.decode's time


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cell(value) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|")


def _number(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "identical"
        return f"{value:.{digits}f}"
    return str(value)


def read_junit(path: pathlib.Path) -> list[dict] | None:
    """[{name, outcome, seconds, figures, message}] of every test case, or None without a readable file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message") or (node.text or "").strip()
                break
        figures = {p.get("name"): p.get("value") for p in case.iter("property")}
        name = case.get("name", "?")
        cases.append({"name": name[5:] if name.startswith("test_") else name, "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "figures": figures,
                      "message": message.splitlines()[0] if message else ""})
    return cases


def read_jsonl(path: pathlib.Path) -> list[dict] | None:
    """The same from tests.jsonl (one line per finished test phase, written as tests finish), or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    cases: dict[str, dict] = {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name = entry["nodeid"].split("::")[-1]
        outcome = entry["outcome"]
        if outcome == "failed" and entry["when"] != "call":
            outcome = "error"
        case = cases.setdefault(name, {"name": name[5:] if name.startswith("test_") else name, "outcome": "passed",
                                       "seconds": 0.0, "figures": {}, "message": ""})
        case["seconds"] += float(entry.get("seconds") or 0.0)
        case["figures"].update({k: str(v) for k, v in (entry.get("figures") or {}).items()})
        if outcome != "passed":
            case["outcome"], case["message"] = outcome, entry.get("message", "")
    return list(cases.values())


OUTCOME_MARK = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "skipped": "skipped"}


def tests_section(cases: list[dict] | None, partial: bool = False) -> list[str]:
    lines = ["## Checks in ComfyUI (pytest -m gpu)", ""]
    if cases is None:
        return lines + ["No test results (pytest.xml missing: pytest did not finish; see run.log).", ""]
    if partial:
        lines += ["pytest did not finish (stopped at its time cap, or it crashed: see run.log); these are the tests "
                  "that finished before.", ""]
    counts = {k: sum(c["outcome"] == k for c in cases) for k in OUTCOME_MARK}
    lines.append(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" of {len(cases)}.")
    lines += ["", "| check | result | s | figures | note |", "|---|---|---|---|---|"]
    for c in cases:
        figures = ", ".join(f"{k} {v}" for k, v in c["figures"].items())
        lines.append(f"| {_cell(c['name'])} | {OUTCOME_MARK[c['outcome']]} | {c['seconds']:.1f} | {_cell(figures)} | "
                     f"{_cell(c['message'][:300])} |")
    return lines + [""]


def engine_section(cases: list[dict] | None) -> list[str]:
    case = next((c for c in cases or [] if c["name"] == ENGINE_TEST), None)
    if case is None or "pid_core_seconds" not in case["figures"]:
        return []
    f = case["figures"]
    ratio = float(f["time_ratio"])
    verdict = "yes" if ratio <= ENGINE_TOLERANCE else "**no**"
    return ["## PiD Decode against pid_core.decode (same file, inputs, seed and plan)", "",
            "Medians of 3 warm decodes each: PiD Decode in ComfyUI, pid_core.decode in a process without ComfyUI.", "",
            "| PiD Decode s | pid_core.decode s | ratio | within 5% | image PSNR dB | max difference |",
            "|---|---|---|---|---|---|",
            f"| {f['pid_decode_seconds']} | {f['pid_core_seconds']} | {ratio:.3f} | {verdict} | {f.get('psnr_db', '-')} "
            f"| {f.get('max_abs_difference', '-')} |", ""]


def bench_section(bench: dict | None) -> list[str]:
    lines = ["## PiD Decode against core ComfyUI's PiD (same GPU, weights, latent and text; 4 steps)", ""]
    if bench is None:
        return lines + ["No benchmark results (bench.json missing: see run.log).", ""]
    core_s, pack_s = (", ".join(f"{s:g}" for s in bench["schedules"][k]) for k in ("core", "pack"))
    lines += [
        f"Core samples its own schedule (shift 1.5, scheduler simple: [{core_s}]); PiD Decode the released one "
        f"([{pack_s}]). The images are alike, not equal, by design: the PSNR shows how alike. Times: median of "
        f"{bench['runs']} runs after a warm-up that loads the model (cold: that first run); peak: torch's "
        "allocator during the decode (weights under dynamic VRAM are outside it: see the weights column).",
        "", "| size | graph | s (median) | cold s | peak VRAM GiB | weights on GPU GiB | PSNR vs core dB | against core |",
        "|---|---|---|---|---|---|---|---|"]
    rows = bench.get("rows", [])
    for row in rows:
        label = row.get("label", row["graph"])
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['size']} | {_cell(label)} | {_cell(row.get('skipped') or 'error: ' + row['error'])} "
                         "| | | | | |")
            continue
        verdict = ""
        core = next((r for r in rows if r["size"] == row["size"] and r["graph"] == "core" and "median_seconds" in r),
                    None)
        if row["graph"] != "core" and core is not None:
            faster = row["median_seconds"] <= core["median_seconds"]
            parts = [f"time {row['median_seconds'] / core['median_seconds']:.2f}x: {'faster' if faster else '**slower**'}"]
            if row.get("peak_allocated_GiB") is not None and core.get("peak_allocated_GiB") is not None:
                less = row["peak_allocated_GiB"] < core["peak_allocated_GiB"]
                parts.append(f"peak {'less' if less else '**not less**'}")
            verdict = "; ".join(parts)
        lines.append(f"| {row['size']} | {_cell(label)} | {_number(row['median_seconds'], 3)} | "
                     f"{_number(row.get('cold_seconds'), 2)} | {_number(row.get('peak_allocated_GiB'))} | "
                     f"{_number(row.get('weights_on_device_GiB'))} | {_number(row.get('psnr_vs_core_db'))} | {verdict} |")
    return lines + [""]


def header(env: dict | None, phases: list | None, checkpoints: dict | None) -> list[str]:
    env = env or {}
    rehearsal = env.get("mode") == "rehearsal"
    lines = ["# PiD node pack in ComfyUI on a GPU: kit report", ""]
    if rehearsal:
        lines += ["**CPU rehearsal (run.sh --dry-run): checks the kit's plumbing with narrow models; no figure here is "
                  "a GPU figure.**", ""]
    facts = [("date", env.get("date")), ("device", env.get("device")), ("driver", env.get("driver")),
             ("torch", env.get("torch")), ("CUDA", env.get("cuda")), ("Python", env.get("python")),
             ("ComfyUI", env.get("comfyui")), ("pack commit", env.get("commit"))]
    lines.append(" · ".join(f"{k}: {v}" for k, v in facts if v))
    if checkpoints:
        size = checkpoints.get("size")
        count = checkpoints.get("parameters") or 0
        count = f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.1f} M"
        lines.append(f"Checkpoints: random {size} FLUX.1 2K-to-4K v1.5 layout, {count} parameters (bf16 file, its "
                     "mxfp8 and int8 convrot siblings), made on the machine.")
    if phases:
        lines.append("Phases: " + ", ".join(
            f"{p['name']} {p['seconds']:.0f} s" + ("" if p.get("status", 0) == 0 else f" (exit {p['status']})")
            for p in phases) + f"; total {sum(p['seconds'] for p in phases):.0f} s.")
    return lines + [""]


def render(results: pathlib.Path) -> str:
    cases, partial = read_junit(results / "pytest.xml"), False
    if cases is None:
        cases = read_jsonl(results / "tests.jsonl")
        partial = cases is not None
    lines = header(_read_json(results / "env.json"), _read_json(results / "phases.json"),
                   _read_json(results / "checkpoints.json"))
    lines += tests_section(cases, partial) + engine_section(cases) + bench_section(_read_json(results / "bench.json"))
    return "\n".join(lines).rstrip() + "\n"


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    out = pathlib.Path(argv[1])
    out.write_text(render(pathlib.Path(argv[0])))
    print(f"[report] {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
