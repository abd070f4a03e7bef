"""Copy the benchmark tables (``benchmarks/results/<name>.md``) into docs/BENCHMARKS.md and the
README (which carries the comparison only).

A doc marks each table's place with ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``;
the text between the markers is replaced by the current ``<name>.md`` (a benchmark that has not
been run keeps a "not run yet" note). ``run_all.py`` calls this at the end.

    python benchmarks/update_docs.py
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS_DIR, display_path, log  # noqa: E402

DOC = os.path.join(REPO, "docs", "BENCHMARKS.md")
README = os.path.join(REPO, "README.md")
SECTIONS = ("comparison", "investigation_shapes_x1", "investigation_shapes_x1.5",
            "investigation_shapes_x3", "investigation_shapes_x4.5",
            "investigation_crowded_x1", "investigation_crowded_x1.5", "investigation_crowded_x3",
            "speed", "assignment")
NOT_RUN = "_Not run yet: run the command above; its table lands here._\n"


def section_text(name: str, results_dir: str = RESULTS_DIR, doc: str = DOC) -> str:
    """The Markdown table of one benchmark, with image links made relative to ``doc``."""
    path = os.path.join(results_dir, f"{name}.md")
    if not os.path.isfile(path):
        return NOT_RUN
    with open(path) as f:
        text = f.read()
    # comparison.md links its plots relative to results/; the doc lives elsewhere.
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(doc)))
    return re.sub(r"\]\(([a-zA-Z0-9_.]+\.png)\)", rf"]({rel}/\1)", text)


def update_docs(results_dir: str = RESULTS_DIR, doc: str = DOC) -> None:
    """Replace every marked section of ``doc`` with the current results."""
    with open(doc) as f:
        text = f.read()
    for name in SECTIONS:
        pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?"
                             rf"(<!-- /results:{re.escape(name)} -->)",
                             re.DOTALL)
        body = section_text(name, results_dir, doc)
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    with open(doc, "w") as f:
        f.write(text)
    log(f"updated {display_path(doc)}")


if __name__ == "__main__":
    update_docs()
    update_docs(doc=README)  # only the sections the README marks
