"""The repository's shape: the product never imports the toy world, the planner drives train.py
(not the reverse), and nothing points outside the repository."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = sorted(glob.glob(os.path.join(ROOT, "*.py")))


def imported(path):
    """Top-level module names a file imports, at any depth of the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_product_module_imports_the_toy_world():
    assert len(PRODUCT) >= 10  # unet, vae, sample, comat, captioner, segment, train, ...
    for path in PRODUCT:
        bad = imported(path) & {"toy", "toyworld", "toybuild"}
        assert not bad, f"{os.path.basename(path)} imports {bad}"


def test_plan_imports_train_and_not_the_reverse():
    assert "train" in imported(os.path.join(ROOT, "plan.py"))
    assert "plan" not in imported(os.path.join(ROOT, "train.py"))
    loop = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()
    assert not re.search(r"\bplan\b|probe|fake", loop.split("def train(")[1].split("\ndef ")[0])


def test_nothing_refers_outside_the_repository():
    # the notes this project was designed from, which a clone does not have (split so that this
    # file does not match itself)
    names = ["shared/" "spec", "spec" "/", "comat-" "official", "style" r"\.md"]
    pattern = re.compile("|".join(names))
    files = [p for ext in ("py", "md", "txt", "json", "ini") for p in
             glob.glob(os.path.join(ROOT, "**", f"*.{ext}"), recursive=True)
             if "/.venv/" not in p and "/.git/" not in p]
    hits = [f"{os.path.relpath(p, ROOT)}:{n}" for p in files
            for n, line in enumerate(open(p, encoding="utf-8", errors="replace"), 1)
            if pattern.search(line)]
    assert not hits, hits[:10]
