"""Imports flow one way: losses -> parallel -> megatron / rollout -> trainer.

Parsed from the source (every import statement, including those inside functions), so a lazy import
cannot slip past. Standard-library imports are always allowed.
"""

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_rl"

# subpackage -> the megatron_rl subpackages it may import (besides itself)
INTERNAL = {
    "model_config": set(),
    "utils": set(),
    "losses": set(),
    "rewards": {"utils"},
    "parallel": {"losses", "utils"},
    "convert": {"model_config", "utils"},
    "patches": set(),
    "megatron": {"losses", "parallel", "convert", "model_config", "utils", "patches"},
    "rollout": {"convert", "model_config", "utils", "rewards"},
    "trainer": {"losses", "parallel", "convert", "model_config", "utils", "rewards", "megatron", "rollout",
                "patches"},
}
# third-party roots a subpackage may import; None = any except the guarded ones below
THIRD_PARTY = {"losses": {"torch"}, "parallel": {"torch"}, "model_config": set()}
# the single importer of each heavyweight upstream library
GUARDED = {"megatron": {"megatron", "patches"}, "vllm": {"rollout"}}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                yield node.lineno, ".".join(base + ((node.module,) if node.module else ()))
            else:
                yield node.lineno, node.module


def _subpackage(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else ""


def test_import_layering():
    stdlib = set(sys.stdlib_module_names)
    problems = []
    files = sorted(PKG.rglob("*.py"))
    assert files, "no package sources found"
    for path in files:
        sub = _subpackage(path)
        for lineno, name in _imports(path):
            root = name.split(".")[0]
            where = f"{path.relative_to(PKG.parent)}:{lineno} imports {name}"
            if root in stdlib or root == "__future__":
                continue
            if root == "megatron_rl":
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else ""
                if target == "trainer" and sub != "trainer":
                    problems.append(f"{where}: nothing may import the trainer")
                elif sub and target and target != sub and target not in INTERNAL.get(sub, set()):
                    problems.append(f"{where}: {sub} may import only {sorted(INTERNAL.get(sub, set()))}")
                continue
            if root in GUARDED and sub not in GUARDED[root]:
                problems.append(f"{where}: only megatron_rl.{'/'.join(sorted(GUARDED[root]))} may import {root}")
            allowed = THIRD_PARTY.get(sub)
            if allowed is not None and root not in allowed:
                problems.append(f"{where}: {sub} may import only {sorted(allowed) or 'the standard library'}")
    assert not problems, "import layering violated:\n" + "\n".join(problems)


def test_every_subpackage_has_a_rule():
    subs = {_subpackage(p) for p in PKG.rglob("*.py")} - {""}
    assert subs <= set(INTERNAL), f"add a layering rule for {sorted(subs - set(INTERNAL))}"


LOOP = PKG / "trainer" / "loop.py"


def test_the_loop_reaches_megatron_only_through_the_learner():
    """trainer/loop.py imports nothing of megatron_rl.megatron (nor megatron itself), at any level:
    everything Megatron goes through trainer/learner.py's Learner."""
    def megatron(name: str) -> bool:
        return name.split(".")[0] == "megatron" or name.split(".")[:2] == ["megatron_rl", "megatron"]

    found = [f"trainer/loop.py:{lineno} imports {name}" for lineno, name in _imports(LOOP) if megatron(name)]
    # `from megatron_rl import megatron` names the subpackage in the imported names, not the module
    found += [f"trainer/loop.py:{node.lineno} imports megatron_rl.megatron" for node in ast.walk(ast.parse(
              LOOP.read_text())) if isinstance(node, ast.ImportFrom) and node.module == "megatron_rl"
              and any(a.name == "megatron" for a in node.names)]
    assert not found, "\n".join(found)


def test_the_train_loop_fits_a_screen():
    tree = ast.parse(LOOP.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    lines = fn.end_lineno - fn.lineno + 1
    assert lines <= 60, f"trainer/loop.py::train is {lines} lines; it should read as one screen of verbs"
