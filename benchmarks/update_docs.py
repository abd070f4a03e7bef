"""Re-render every benchmark table from its committed JSON and put it into docs/BENCHMARKS.md.

    python benchmarks/update_docs.py

``comparison``, ``speed``, ``assignment``: ``results/<name>.md`` is rendered again from
``results/<name>.json`` (no config loaded, no model built) and copied between the doc's
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; ``stages``, ``onnx_speed``: their
``results/<name>.md`` is copied where it exists. README.md gets only its ``results:summary``
section, if any: the four detectors' mean over seeds at 3× the schedule (comparison.json).
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS_DIR, atomic_write, display_path, log, markdown_table  # noqa

DOC = os.path.join(REPO, "docs", "BENCHMARKS.md")
README = os.path.join(REPO, "README.md")
RENDERED = ("comparison", "speed", "assignment")
COPIED = ("stages", "onnx_speed")
NOT_RUN = "_Not run yet: `benchmarks/{name}.py` writes this table (`results/{name}.md`)._\n"


def render(name: str, results_dir: str = RESULTS_DIR) -> str:
    """``<name>.md``, rendered again from ``<name>.json`` first where a renderer exists."""
    md_path = os.path.join(results_dir, f"{name}.md")
    if name in RENDERED:
        with open(os.path.join(results_dir, f"{name}.json")) as f:
            atomic_write(md_path, __import__(name).render_markdown(json.load(f)))
    if not os.path.isfile(md_path):
        return NOT_RUN.format(name=name)
    with open(md_path) as f:
        return f.read()


def summary_table(result: dict) -> str:
    """The four detectors at 3×: mean over seeds of AP and of the IoU lost in NMS, per dataset."""
    from comparison import DATASETS, MAIN_MODELS, MODELS, group_runs, metric_of, spread

    groups, cells = group_runs(result["runs"]), [(d, k) for k in ("AP", "lost") for d in DATASETS]

    def mean(d, m, k):
        return spread(metric_of(r, k) for r in groups[(d, m, 3.0)].values())["mean"]

    rows = [[MODELS[m][2]] + [f"{mean(d, m, k):.{1 if k == 'AP' else 3}f}" for d, k in cells]
            for m in MAIN_MODELS]
    seeds = ", ".join(f"`{d}` {len(groups[(d, 'dsla', 3.0)])}" for d in DATASETS)
    return (markdown_table(["detector"] + [f"`{d}` {'AP' if k == 'AP' else 'NMS IoU lost'}"
                                           for d, k in cells], rows)
            + f"\nBox AP and mean IoU lost in NMS; mean over seeds ({seeds}) at 3× the "
            "recipe's schedule.\n")


def fill(doc: str, sections: dict) -> None:
    """Replace the text between each section's markers in ``doc`` (markers absent: skipped)."""
    with open(doc) as f:
        text = old = f.read()
    rel = os.path.relpath(RESULTS_DIR, os.path.dirname(doc))
    for name, body in sections.items():
        # Result files link their plots relative to results/; the doc lives elsewhere.
        body = re.sub(r"\]\(([a-zA-Z0-9_.]+\.png)\)", rf"]({rel}/\1)", body)
        text = re.sub(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:"
                      rf"{re.escape(name)} -->)", lambda m: m.group(1) + body + m.group(2),
                      text, flags=re.DOTALL)
    if text != old:  # an unchanged file is not rewritten
        atomic_write(doc, text)
    log(f"{display_path(doc)}: {'updated' if text != old else 'unchanged'}")


def main() -> int:
    fill(DOC, {name: render(name) for name in RENDERED + COPIED})
    with open(os.path.join(RESULTS_DIR, "comparison.json")) as f:
        fill(README, {"summary": summary_table(json.load(f))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
