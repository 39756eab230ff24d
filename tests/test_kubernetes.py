"""deploy/kubernetes: every manifest valid for Kubernetes 1.30 against the API's own schemas, offline
and strict (an unknown or misspelt field fails), and the properties that matter checked against
the gateway itself: its settings pass its own validation, the files they name are the ones the
Secrets' mounts deliver, the probes ask for paths on the port the gateway really serves them on,
and the pod runs as the image's user on a read-only root. No cluster here: nothing is applied."""

from __future__ import annotations

import copy
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway import config
from tests.conftest import Registry, free_port, htpasswd_add, http_request, start_gateway, stop

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are for (still in support by the big providers in 2025);
# kubernetes-validate ships the schemas of every release, so the check needs no network.
KUBERNETES_VERSION = "1.30"
EXAMPLE_SUFFIX = ".example.yaml"
# /readyz waits this long for the registry (gateway/metrics.py, readyz's ClientTimeout): a
# readiness probe that gives up sooner would fail pods whose registry is merely slow.
READYZ_UPSTREAM_TIMEOUT = 3
# Settings being added for replicas (issue 27): checked like every other key once
# gateway/config.py knows them, left out of the checks until then.
REDIS_KEYS = ("redis_url", "redis_password_file", "redis_ca_file")
GATEWAY_LABELS = {"app.kubernetes.io/name": "registry-gateway", "app.kubernetes.io/component": "gateway"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    return data


def _generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomization.yaml's configMapGenerator makes, as kustomize makes them
    (less the hash it appends to the name)."""
    made = []
    for generator in _kustomization().get("configMapGenerator", []):
        data = {Path(name).name: (DEPLOY / name).read_text(encoding="utf-8") for name in generator["files"]}
        metadata: dict[str, Any] = {"name": generator["name"]}
        labels = generator.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = labels
        made.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return made


def _applied() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k deploy/kubernetes` sends, examples left out."""
    objects = [doc for name in _kustomization()["resources"] for doc in _documents(DEPLOY / name)]
    return objects + _generated_configmaps()


def _one(kind: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [doc for doc in (objects if objects is not None else _applied()) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    (container,) = _pod_spec()["containers"]
    return dict(container)


def _environment() -> dict[str, str]:
    env = _container().get("env", [])
    assert all("value" in item for item in env), "every GATEWAY_* variable is a plain value"
    return {item["name"]: item["value"] for item in env}


def _config_map_file(path: str) -> str:
    """The text of the file at `path` in the pod, which a ConfigMap's mount must deliver."""
    mounts = {mount["mountPath"]: mount["name"] for mount in _container()["volumeMounts"]}
    directory, name = path.rsplit("/", 1)
    volume = next(volume for volume in _pod_spec()["volumes"] if volume["name"] == mounts[directory])
    config_map = next(
        cm for cm in _generated_configmaps() if cm["metadata"]["name"] == volume["configMap"]["name"]
    )
    text: str = config_map["data"][name]
    return text


def _settings_file(tmp_path: Path, text: str, remap: Path | None = None, *, redis: bool = True) -> Path:
    """The pod's gateway.yml (without its redis keys unless `redis`), with every absolute path
    moved under `remap` when given."""
    values: dict[str, Any] = yaml.safe_load(text)
    for key in REDIS_KEYS if not redis else ():
        values.pop(key, None)
    if remap is not None:
        values = {
            key: str(remap / value.lstrip("/")) if isinstance(value, str) and value.startswith("/") else value
            for key, value in values.items()
        }
    path = tmp_path / "gateway.yml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _pod_settings(tmp_path: Path) -> config.Settings:
    """The settings the pod starts with: its environment and the file GATEWAY_CONFIG names,
    through the gateway's own loader (files not looked at: they exist only in the pod)."""
    environment = _environment()
    file = _settings_file(tmp_path, _config_map_file(environment["GATEWAY_CONFIG"]))
    return config.load(file, environment, check_files=False)


def _named_port(name: str) -> int:
    port: int = next(port["containerPort"] for port in _container()["ports"] if port["name"] == name)
    return port


# The manifests themselves


def test_kustomization_applies_every_manifest_but_the_examples() -> None:
    kustomization = _kustomization()
    resources = kustomization["resources"]
    generated = [
        name for generator in kustomization.get("configMapGenerator", []) for name in generator["files"]
    ]
    examples = sorted(path.name for path in DEPLOY.glob("*" + EXAMPLE_SUFFIX))
    assert examples, "secrets.example.yaml and networkpolicy.example.yaml are the examples"
    assert not set(examples) & set(resources), "examples are not applied"
    assert len(resources) == len(set(resources))
    everything = {path.name for path in DEPLOY.iterdir()}
    assert everything == {"kustomization.yaml", *resources, *generated, *examples}, (
        "every file in deploy/kubernetes is applied (resources), generated into a ConfigMap, "
        "or an example (*.example.yaml)"
    )


def _every_manifest() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in _documents(path):
                yield f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc
    for config_map in _generated_configmaps():
        yield f"configMapGenerator:{config_map['metadata']['name']}", config_map


@pytest.mark.parametrize(
    ("where", "manifest"), [pytest.param(where, doc, id=where) for where, doc in _every_manifest()]
)
def test_every_manifest_is_valid_for_kubernetes(where: str, manifest: dict[str, Any]) -> None:
    assert manifest.get("metadata", {}).get("namespace") is None, f"{where}: the namespace is kubectl's -n"
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    """The check above is worth something only if it fails: a field the API does not have (as a
    typo would make) and a value of the wrong type are refused."""
    deployment = copy.deepcopy(_one("Deployment"))
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 9090}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


# The settings, against the gateway's own validation


def test_the_settings_pass_the_gateways_own_validation(tmp_path: Path) -> None:
    environment = _environment()
    assert set(environment) <= {config.env_name(key) for key in config.DEFAULTS} | {"GATEWAY_CONFIG"}
    settings = _pod_settings(tmp_path)  # raises ConfigError naming every problem
    assert settings.origins["htpasswd"] == "file", "the settings come from the ConfigMap's file"
    # Replicas: every pod must sign tokens with the same key (an ephemeral one is per process),
    # and a pod is one worker: Kubernetes scales with replicas, each probed on its own.
    assert _one("Deployment")["spec"]["replicas"] > 1
    assert settings.challenge != "bearer" or settings.token_key is not None
    assert settings.workers == 1


def test_replicas_share_their_lockout_in_redis(tmp_path: Path) -> None:
    """With more than one pod, the failed logins must be counted in Redis (each pod would count
    alone otherwise), with the password from a file, never in the URL."""
    settings = _pod_settings(tmp_path)
    assert settings.redis_url is not None and settings.redis_url.password is None
    assert settings.redis_password_file is not None


def test_an_unknown_setting_in_the_deployment_is_refused(tmp_path: Path) -> None:
    """What the check above relies on: the loader refuses a GATEWAY_* variable that names no
    setting, as `serve` would at start (a typo in the Deployment stops every pod)."""
    environment = _environment() | {"GATEWAY_METRICS_LISTENER": "0.0.0.0:9090"}
    file = _settings_file(tmp_path, _config_map_file(environment["GATEWAY_CONFIG"]))
    with pytest.raises(config.ConfigError, match="GATEWAY_METRICS_LISTENER: unknown environment variable"):
        config.load(file, environment, check_files=False)


def _real_secret(secret: str, key: str, directory: Path) -> None:
    """Writes what the operator's `kubectl create secret` puts in Secret `secret` under `key`
    (docs/kubernetes.md), made the way that page says."""
    path = directory / key
    if (secret, key) == ("registry-gateway-htpasswd", "htpasswd"):
        htpasswd_add(path, "admin", "admin-secret-pw")
    elif (secret, key) == ("registry-gateway-token-key", "token.pem"):
        subprocess.run(
            [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(path)],
            check=True,
            capture_output=True,
        )
        (directory / "token.crt").unlink()  # not in the Secret: only the key is
    elif (secret, key) == ("registry-gateway-metrics-token", "token"):
        path.write_text(secrets.token_hex(32) + "\n")
    elif (secret, key) == ("registry-gateway-redis", "password"):
        path.write_text(secrets.token_urlsafe(24) + "\n")
    else:
        raise AssertionError(f"Secret {secret} key {key}: this test does not know how to make it")
    path.chmod(0o440)


def _pod_filesystem(root: Path) -> dict[str, Path]:
    """The pod's mounts recreated under `root` from the Deployment's volumes: the ConfigMap's
    files, and real secrets under each key secrets.example.yaml gives its Secret. Nothing else
    exists there, so a setting naming a file no mount delivers fails the gateway's file checks.
    Returns each mount path and the directory standing for it."""
    example_keys = {
        doc["metadata"]["name"]: sorted(doc["stringData"])
        for doc in _documents(DEPLOY / "secrets.example.yaml")
    }
    volumes = {volume["name"]: volume for volume in _pod_spec()["volumes"]}
    made = {}
    for mount in _container()["volumeMounts"]:
        directory = root / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            config_map = next(cm for cm in _generated_configmaps() if cm["metadata"]["name"] == name)
            for file_name, text in config_map["data"].items():
                (directory / file_name).write_text(text, encoding="utf-8")
        else:
            secret = volume["secret"]["secretName"]
            assert secret in example_keys, f"{secret}: missing from secrets.example.yaml and docs"
            for key in example_keys[secret]:
                _real_secret(secret, key, directory)
        made[mount["mountPath"]] = directory
    return made


def test_the_secrets_mounts_deliver_every_file_the_settings_name(tmp_path: Path) -> None:
    """The gateway's full check, files included (htpasswd parses, the token key loads, the
    metrics token and Redis password read), on the pod's filesystem rebuilt from the mounts."""
    root = tmp_path / "pod"
    _pod_filesystem(root)
    environment = {
        name: str(root / value.lstrip("/")) if value.startswith("/") else value
        for name, value in _environment().items()
    }
    pod_file = Path(environment["GATEWAY_CONFIG"])
    settings = config.load(_settings_file(tmp_path, pod_file.read_text(), remap=root), environment)
    assert settings.htpasswd.is_relative_to(root) and settings.token_key is not None
    # Each Secret names its files by key; a mount of the wrong Secret, or a key renamed on one
    # side only, would leave a setting pointing at nothing:
    for key in ("htpasswd", "token_key", "metrics_token_file", "redis_password_file", "redis_ca_file"):
        value = getattr(settings, key, None)
        if value is not None:
            assert Path(value).is_file(), f"{key}: {value} is delivered by no mount"


def test_mounts_are_directories_that_kubelet_updates() -> None:
    """subPath mounts never see kubelet's updates (it swaps a symlink in the directory), so a
    rotated key or a new htpasswd would never reach the gateway; the Secrets' files are the
    gateway's group's alone."""
    pod = _pod_spec()
    for mount in _container()["volumeMounts"]:
        assert "subPath" not in mount and "subPathExpr" not in mount, mount["name"]
        assert mount.get("readOnly") is True, mount["name"]
    for volume in pod["volumes"]:
        if "secret" in volume:
            mode = volume["secret"]["defaultMode"]
            assert mode & 0o040 and not mode & 0o007, f"{volume['name']}: mode {mode:o}"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


# The pod


def test_the_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None
    pod = _pod_spec()
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    assert pod["securityContext"]["runAsGroup"] == int(user.group(2))
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Service links would add <SERVICE>_... variables: a Service named `gateway` would give
    # GATEWAY_PORT, which the gateway refuses as an unknown setting.
    assert pod["enableServiceLinks"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["requests"] and container["resources"]["limits"]


def test_probes_ask_for_what_the_gateway_serves_where_it_serves_it(tmp_path: Path) -> None:
    settings = _pod_settings(tmp_path)
    assert settings.metrics_listen is not None, "the probes' paths are served on metrics_listen"
    host, port = settings.metrics_listen
    assert host in ("0.0.0.0", "::", ""), "the kubelet probes over the pod's IP, not loopback"
    container = _container()
    probes = {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        target = probe["httpGet"]
        named = target["port"]
        assert (_named_port(named) if isinstance(named, str) else named) == port, kind
        assert target.get("scheme", "HTTP") == "HTTP", "metrics_listen is plain HTTP"
    # Liveness must not depend on the registry (a restart would not bring it back): /healthz;
    # readiness takes a pod whose registry does not answer out of the Service: /readyz.
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["readinessProbe"]["timeoutSeconds"] > READYZ_UPSTREAM_TIMEOUT
    assert _named_port("http") == settings.listen_port


def test_shutdown_fits_in_the_grace_period(tmp_path: Path) -> None:
    """The kubelet's countdown covers preStop and then SIGTERM: both must fit before SIGKILL."""
    settings = _pod_settings(tmp_path)
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + settings.shutdown_grace


def test_every_selector_picks_the_gateways_pods() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels == GATEWAY_LABELS

    def picks(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(key) == value for key, value in selector.items())

    assert picks(deployment["spec"]["selector"]["matchLabels"])
    assert picks(_one("Service")["spec"]["selector"])
    pdb = _one("PodDisruptionBudget")
    assert picks(pdb["spec"]["selector"]["matchLabels"])
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    pod = deployment["spec"]["template"]["spec"]
    for term in pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]:
        assert picks(term["podAffinityTerm"]["labelSelector"]["matchLabels"])
    for constraint in pod.get("topologySpreadConstraints", []):
        assert picks(constraint["labelSelector"]["matchLabels"])
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout == {"maxUnavailable": 0, "maxSurge": 1}
    # The Service's ports name the container's.
    for port in _one("Service")["spec"]["ports"]:
        assert port["targetPort"] in {p["name"] for p in _container()["ports"]}
    policy = _one("NetworkPolicy", _documents(DEPLOY / "networkpolicy.example.yaml"))
    assert picks(policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"])


def test_the_pods_settings_serve_probes_and_registry(tmp_path: Path, registry: Registry) -> None:
    """The gateway started on the pod's own settings and Secrets (the filesystem rebuilt from the
    mounts), on loopback ports and in front of a real registry: the probes' paths answer 200 on
    metrics_listen, /metrics asks for the Secret's token, and the Service's port challenges for
    a token. Redis is not started here: its keys are left out."""
    root = tmp_path / "pod"
    _pod_filesystem(root)
    pod_config = root / _environment()["GATEWAY_CONFIG"].lstrip("/")
    file = _settings_file(tmp_path, pod_config.read_text(), remap=root, redis=False)
    values: dict[str, Any] = yaml.safe_load(file.read_text())
    metrics_port = free_port()
    gateway = start_gateway(
        tmp_path,
        registry.url,
        Path(values["htpasswd"]),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        env={"GATEWAY_CONFIG": str(file)},
    )
    try:
        probes = {
            probe["httpGet"]["path"]
            for kind, probe in _container().items()
            if kind.endswith("Probe") and isinstance(probe, dict)
        }
        metrics_host = f"127.0.0.1:{metrics_port}"
        for path in sorted(probes):
            status, _, body = http_request(metrics_host, "GET", path)
            assert status == 200, f"{path}: {status} {body!r}"
        status, _, _ = http_request(metrics_host, "GET", "/metrics")
        assert status == 401
        token = Path(values["metrics_token_file"]).read_text().strip()
        status, _, _ = http_request(
            metrics_host, "GET", "/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 200
        status, headers, _ = http_request(gateway.host, "GET", "/v2/")
        assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer realm="https://')
    finally:
        stop(gateway.process)
