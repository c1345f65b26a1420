"""Configs cite the paper, not files outside the repository (#11 §5): no spec files, no working notes, and every
source file a comment names exists here."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_FILES = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
              if "/." not in p]


def _comments():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if "#" in line:
                    yield f"{os.path.relpath(path, ROOT)}:{n}", line.split("#", 1)[1]


def test_config_comments_cite_papers_not_outside_files():
    bad = []
    for where, text in _comments():
        if re.search(r"\b[\w-]+\.md\b|\bspec\b|\bPart \d+ item|/tmp/", text):
            bad.append(f"{where}: {text.strip()}")
        for name in re.findall(r"[\w./-]+\.py\b", text):
            if not any(f == name or f.endswith("/" + name) for f in REPO_FILES):
                bad.append(f"{where}: {name} is not a file of this repository")
    assert not bad, "\n".join(bad)
