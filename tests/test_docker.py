"""docker/: no Docker engine runs here, so the files are checked for consistency, not run."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (DOCKER / "Dockerfile").read_text()


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return dict(pairs)


def test_the_stack_has_its_services():
    assert {"postgres", "mlflow", "tuner", "serve", "minio", "minio-init"} <= set(SERVICES)
    assert SERVICES["serve"]["profiles"] == ["serve"]
    assert SERVICES["minio"]["profiles"] == ["s3"]


def test_every_variable_is_in_env_example_or_has_a_default():
    text = (DOCKER / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)\}", text))  # ${VAR} without a :-default
    shell_side = set(re.findall(r"\$\$\{(\w+)\}", text))  # $${VAR}: read in the container
    assert used | shell_side <= set(env_example()), (used | shell_side) - set(env_example())


def test_dependencies_and_volumes_reference_what_exists():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in COMPOSE["volumes"], (name, source)
    assert (DOCKER / "postgres-init.sh").is_file()
    assert SERVICES["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in SERVICES["postgres"] and "healthcheck" in SERVICES["mlflow"]


def test_clients_reach_mlflow_and_postgres_by_service_name_and_port():
    mlflow_command = " ".join(SERVICES["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow_command
    assert "@postgres:5432/${POSTGRES_MLFLOW_DB}" in mlflow_command
    assert "--port 5000" in mlflow_command and "mlflow:5000" in mlflow_command
    assert SERVICES["mlflow"]["ports"] == ["${MLFLOW_PORT}:5000"]
    for client in ("tuner", "serve"):
        assert SERVICES[client]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    tuner = SERVICES["tuner"]["command"][0]
    assert "@postgres:5432/$${POSTGRES_OPTUNA_DB}" in tuner
    assert "--study-name $${STUDY_NAME}" in tuner and "--n-trials $${N_TRIALS}" in tuner
    serve = SERVICES["serve"]["command"]
    assert "models:/skin-lesion-classifier@champion" in serve and "5001" in serve
    assert SERVICES["serve"]["ports"] == ["${SERVE_PORT}:5001"]


def test_mlserver_profile_serves_the_champion_with_the_mlserver_extra():
    service = SERVICES["serve-mlserver"]
    assert service["profiles"] == ["mlserver"]
    assert service["command"][:3] == ["serve", "models:/skin-lesion-classifier@champion",
                                      "--mlserver"]
    assert service["ports"] == ["${SERVE_PORT}:5001"]
    assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert {"SKINML_SERVE_MAX_BATCH", "SKINML_SERVE_MAX_WAIT_MS"} <= set(service["environment"])
    assert 'pip install ".[mlserver]"' in DOCKERFILE


def test_tuners_reserve_a_gpu_and_read_data_read_only():
    devices = SERVICES["tuner"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "${HAM10000_DIR}:/data:ro" in SERVICES["tuner"]["volumes"]


def test_image_is_non_root_with_skinml_entrypoint_and_no_secrets():
    assert re.search(r"^USER skinml$", DOCKERFILE, re.M)
    assert 'ENTRYPOINT ["skinml"]' in DOCKERFILE
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)", DOCKERFILE.replace("# ", ""))
    assert ".env" in (ROOT / ".gitignore").read_text()


def test_image_installs_the_projects_own_dependencies():
    # `pip install .` of the copied pyproject.toml: the image gets exactly its dependencies.
    assert "COPY --chown=skinml:skinml pyproject.toml" in DOCKERFILE
    assert re.search(r'^RUN pip install "\.\[mlserver\]" ', DOCKERFILE, re.M)
    base = re.search(r"ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda", DOCKERFILE)
    torch_range = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
                       ["project"]["dependencies"] if d.startswith("torch>="))
    # the base image's CUDA torch already satisfies the range, so pip keeps it
    assert base.group(1) in SpecifierSet(torch_range.removeprefix("torch"))


def test_env_example_holds_placeholders_only():
    values = env_example()
    assert values["POSTGRES_PASSWORD"].startswith("change-me")
    assert values["MINIO_ROOT_PASSWORD"].startswith("change-me")
