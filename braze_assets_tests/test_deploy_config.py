"""deploy/: the production instance is valid for the Dagster it ships with, and the image and Helm
values agree with it. Docker and Helm are not needed: the configuration is checked against
Dagster's own schemas, and the image's inputs against the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

# private: Dagster 1.13 exports no validation of an instance's dagster.yaml or of a class's config
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture
def instance_config(monkeypatch) -> dict:
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("BRAZE_ASSETS_IMAGE", "registry.example.internal/braze-assets:0.1.0")
    config, _ = dagster_instance_config(str(DEPLOY))
    return config


def test_instance_validates_against_dagster_and_its_plugins(instance_config):
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    launcher = instance_config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
    storage = process_config(DagsterPostgresStorage.config_type(), instance_config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert instance_config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert instance_config["concurrency"]["pools"]["default_limit"] == 1
    assert instance_config["run_monitoring"]["enabled"] is True


def test_run_pods_share_no_volume_and_get_the_state_and_delta_locations(instance_config):
    config = instance_config["run_launcher"]["config"]
    assert not config.get("volumes") and not config.get("volume_mounts")
    assert "BRAZE_ASSETS_DELTA_URL" in config["env_vars"]
    assert "BRAZE_ASSETS_HOME" not in config["env_vars"]
    assert config["env_secrets"] == ["braze-assets"]  # BRAZE_API_KEY, BRAZE_ASSETS_STATE_URL


def test_dockerfile_copies_what_exists_and_runs_the_code_server():
    text = (DEPLOY / "Dockerfile").read_text()
    root = DEPLOY.parent
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _target = line.split()
        for source in sources:
            assert (root / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    assert "pip install --require-hashes -r requirements.lock" in text
    assert re.search(r"^USER (?!root)\S+", text, flags=re.M), "the image must not run as root"
    assert '"code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "braze_assets.definitions"' in text
    lock = (root / "requirements.lock").read_text()
    assert re.search(r"^dagster-postgres==", lock, flags=re.M)
    assert re.search(r"^dagster-k8s==", lock, flags=re.M)


def test_helm_values_render_the_same_instance():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"] == ["-m", "braze_assets.definitions"] and deployment["port"] == 4000
    assert {"name": "braze-assets"} in deployment["envSecrets"]
    assert values["postgresql"]["enabled"] is False
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert not k8s.get("volumes") and not k8s.get("volumeMounts")
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runMonitoring"]["enabled"] is True
    assert values["concurrency"]["pools"]["defaultLimit"] == 1
