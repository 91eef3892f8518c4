"""Static checks of the container deployment: compose file, Dockerfile, .dockerignore, deploy/.

No Docker engine runs here, so everything a container would do is checked against the things it
relies on: the Compose Specification's own JSON schema (shipped by the pinned `check-jsonschema`
package), our real CLI parser for every command, the files on disk, and the Makefile's installs.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
README = ROOT / "README.md"
README_SECTION = "## Deploy with Docker Compose"

ONE_SHOT_JOBS = ("train", "archive")
LONG_RUNNING = ("grpc", "torchserve", "prometheus")
TORCHSERVE_MANAGEMENT_PORT = 8081
BUILD_TOOLS = {"gcc", "g++", "cc", "make", "cmake", "build-essential", "clang", "git", "gfortran"}

# ${VAR}, ${VAR:-default}, ${VAR-default}; "$$" is a literal dollar sign (Compose interpolation).
INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)?(?P<default>[^}]*)\}"
)


# ---- loading and interpolation ------------------------------------------------------------------


@cache
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Resolve variables the way Compose does, so checks see what a container would get."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name", "op", "default")
        if name in env and (env[name] or op != ":-"):
            return env[name]
        return default if op else ""

    return INTERPOLATION.sub(substitute, value)


@cache
def compose() -> dict[str, Any]:
    """The compose file with every variable at its documented default (an empty environment)."""
    return interpolate(raw_compose(), env={})


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def our_services() -> dict[str, dict[str, Any]]:
    """Services that run our image, i.e. whose command must be an `rnnserve` subcommand."""
    return {name: spec for name, spec in services().items() if "build" in spec}


def strings_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (*strings_in(key), *strings_in(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return [value] if isinstance(value, str) else []


def variables_used() -> dict[str, re.Match[str]]:
    """Every ${VAR…} in the compose file's values (comments aside), by variable name."""
    matches = (INTERPOLATION.finditer(text) for text in strings_in(raw_compose()))
    return {m.group("name"): m for found in matches for m in found if m.group("name")}


@cache
def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# ---- the Compose Specification ------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    assert schema_errors(raw_compose()) == []
    assert schema_errors(compose()) == [], "invalid once variables take their defaults"


def test_schema_check_rejects_a_broken_compose_file() -> None:
    # Proves the validator above is live: a misspelt key and a wrong type must both be reported.
    broken = copy.deepcopy(compose())
    broken["services"]["grpc"]["comand"] = broken["services"]["grpc"].pop("command")
    broken["services"]["torchserve"]["restart"] = ["always"]
    errors = schema_errors(broken)
    assert any("comand" in e for e in errors), errors
    assert any(e.startswith("services/torchserve/restart") for e in errors), errors


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose plugin not installed (the schema test above is the check CI relies on)",
)
def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_every_setting_is_a_variable_with_a_default_documented_in_the_readme() -> None:
    section = readme_deploy_section()
    for name, match in variables_used().items():
        assert match.group("op") == ":-", f"${{{name}}} needs a default: ${{{name}:-…}}"
        assert match.group("default"), f"${{{name}}} has an empty default"
        assert f"`{name}`" in section, f"{name} is not documented in README's deploy section"


def test_no_secrets_in_the_compose_file() -> None:
    assert "secrets" not in compose()
    secret_words = re.compile(r"(password|passwd|secret|token|api_key|apikey)\s*[:=]", re.I)
    assert not secret_words.search(COMPOSE_FILE.read_text())


# ---- roles, ordering, volumes -------------------------------------------------------------------


def completed_dependencies(service: str) -> set[str]:
    depends_on = services()[service].get("depends_on", {})
    return {
        name
        for name, condition in depends_on.items()
        if condition.get("condition") == "service_completed_successfully"
    }


def test_startup_order_train_then_archive_then_servers() -> None:
    assert completed_dependencies("archive") == {"train"}
    assert completed_dependencies("grpc") == {"train"}
    assert completed_dependencies("torchserve") == {"archive"}


def test_one_shot_jobs_are_not_restarted_and_have_no_healthcheck() -> None:
    for name in ONE_SHOT_JOBS:
        spec = services()[name]
        assert spec["restart"] == "no", name
        assert spec["healthcheck"] == {"disable": True}, name
        assert "ports" not in spec, name


def volume_mounts(service: str) -> dict[str, dict[str, Any]]:
    """Mounts by target path, short syntax ("src:dst[:ro]") normalised to the long syntax."""
    mounts = {}
    for mount in services()[service].get("volumes", []):
        if isinstance(mount, str):
            source, target, *mode = mount.split(":")
            mount = {"source": source, "target": target, "read_only": mode == ["ro"]}
            mount["type"] = "bind" if source.startswith((".", "/")) else "volume"
        mounts[mount["target"]] = mount
    return mounts


def test_model_store_is_a_named_volume_written_by_jobs_and_read_only_for_servers() -> None:
    assert "model_store" in compose()["volumes"]
    for name in (*ONE_SHOT_JOBS, "grpc", "torchserve"):
        mount = volume_mounts(name)["/models"]
        assert (mount["type"], mount["source"]) == ("volume", "model_store"), name
        assert mount.get("read_only", False) is (name not in ONE_SHOT_JOBS), name


def test_long_running_services_restart_and_have_a_memory_limit() -> None:
    for name in LONG_RUNNING:
        spec = services()[name]
        assert spec["restart"] in {"always", "unless-stopped", "on-failure"}, name
        memory = spec["deploy"]["resources"]["limits"]["memory"]
        assert re.fullmatch(r"\d+(\.\d+)?[kmg]", memory), (name, memory)


def test_prometheus_is_optional_behind_the_monitoring_profile() -> None:
    assert services()["prometheus"]["profiles"] == ["monitoring"]
    for name in (*ONE_SHOT_JOBS, "grpc", "torchserve"):
        assert "profiles" not in services()[name], f"{name} must start without a profile"


# ---- ports and healthchecks ---------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str
    host_port: str
    container_port: int


def published_ports(service: str) -> list[PublishedPort]:
    ports = []
    for port in services()[service].get("ports", []):
        if isinstance(port, dict):
            ports.append(PublishedPort(port["host_ip"], str(port["published"]), port["target"]))
            continue
        parts = str(port).split(":")
        assert len(parts) == 3, f"{service}: {port!r} must name the host address"
        ports.append(PublishedPort(parts[0], parts[1], int(parts[2].split("/")[0])))
    return ports


def test_every_published_port_listens_on_host_loopback_only() -> None:
    for name in services():
        for port in published_ports(name):
            assert port.host_ip == "127.0.0.1", (name, port)


def test_default_host_ports() -> None:
    expected = {
        "grpc": {50051: "50051", 9090: "9090"},
        "torchserve": {8080: "8080", 8082: "8082"},
        "prometheus": {9090: "9091"},  # 9091 on the host: 9090 is the gRPC metrics port
    }
    for name, ports in expected.items():
        assert {p.container_port: p.host_port for p in published_ports(name)} == ports, name


def test_torchserve_management_api_is_not_published() -> None:
    for name in services():
        ports = {p.container_port for p in published_ports(name)}
        assert TORCHSERVE_MANAGEMENT_PORT not in ports, name


def healthcheck_command(service: str) -> list[str]:
    test = services()[service]["healthcheck"]["test"]
    assert test[0] == "CMD", f"{service}: exec form, so no shell is needed in the image"
    return test[1:]


def test_grpc_healthcheck_asks_grpc_health_through_our_cli_on_the_served_port() -> None:
    command = healthcheck_command("grpc")
    assert command[:2] == ["rnnserve", "health"]
    serve_port = served_address("grpc").rsplit(":", 1)[1]
    assert option_value(command, "--address") == f"127.0.0.1:{serve_port}"


def test_torchserve_healthcheck_pings_the_inference_api() -> None:
    command = " ".join(healthcheck_command("torchserve"))
    inference_port = torchserve_properties()["inference_address"].rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{inference_port}/ping" in command


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name in LONG_RUNNING:
        check = services()[name]["healthcheck"]
        assert not check.get("disable") and check["test"], name
        assert {"interval", "timeout", "retries"} <= check.keys(), name


# ---- commands against our real CLI --------------------------------------------------------------


def option_value(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return command[command.index(option) + 1]


def served_address(service: str) -> str:
    return option_value(services()[service]["command"], "--address")


def parse_with_our_cli(command: list[str]) -> Any:
    """Parse `rnnserve …` with the real argparse parser of `serving.cli`; fail on any error."""
    from serving.cli import build_parser

    assert command[0] == "rnnserve", f"not an rnnserve command: {command}"
    try:
        args = build_parser(command[1]).parse_args(command[1:])
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(command)}` does not parse with our CLI (exit {exc.code})")
    assert callable(getattr(args, "func", None)), f"{command[1]} has no handler"
    return args


def every_rnnserve_command() -> dict[str, list[str]]:
    commands = {f"compose {name}": spec["command"] for name, spec in our_services().items()}
    commands["compose grpc healthcheck"] = healthcheck_command("grpc")
    commands["Dockerfile CMD"] = exec_form(final_stage().last("CMD"))
    commands["Dockerfile HEALTHCHECK"] = dockerfile_healthcheck_command()
    return commands


def test_our_services_run_our_image() -> None:
    assert set(our_services()) == {*ONE_SHOT_JOBS, "grpc", "torchserve"}
    for spec in our_services().values():
        assert spec["build"] == {"context": ".", "dockerfile": "Dockerfile"}


def test_every_command_is_an_rnnserve_subcommand_that_parses() -> None:
    expected_subcommands = {
        "compose train": ["train"],
        "compose archive": ["archive"],
        "compose grpc": ["serve"],
        "compose torchserve": ["torchserve", "start"],
        "compose grpc healthcheck": ["health"],
        "Dockerfile CMD": ["serve"],
        "Dockerfile HEALTHCHECK": ["health"],
    }
    commands = every_rnnserve_command()
    assert commands.keys() == expected_subcommands.keys()
    for where, command in commands.items():
        subcommand = expected_subcommands[where]
        assert command[1 : 1 + len(subcommand)] == subcommand, where
        parse_with_our_cli(command)


def test_serve_command_matches_the_published_ports() -> None:
    args = parse_with_our_cli(services()["grpc"]["command"])
    container_ports = {p.container_port for p in published_ports("grpc")}
    host, port = str(args.address).rsplit(":", 1)
    # 127.0.0.1 inside a container would be unreachable through the published ports.
    assert (host, args.metrics_address) == ("0.0.0.0", "0.0.0.0")
    assert {int(port), int(args.metrics_port)} == container_ports
    assert str(args.store) == "/models"


def test_dockerfile_default_command_is_the_compose_grpc_command() -> None:
    assert exec_form(final_stage().last("CMD")) == services()["grpc"]["command"]


def parse_serve_with_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    """`rnnserve serve` parsed in exactly this RNNSERVE_* environment (the parser reads it)."""
    for name in [n for n in os.environ if n.startswith("RNNSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return parse_with_our_cli(["rnnserve", "serve"])


# What compose sets on purpose where the CLI's default differs: sessions in the shared Redis.
SHARED_SESSIONS = {"RNNSERVE_SESSION_STORE": "redis://redis:6379"}


def test_grpc_environment_defaults_are_the_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = dict(services()["grpc"]["environment"])
    assert all(name.startswith("RNNSERVE_") for name in environment)
    assert {name: environment.pop(name) for name in SHARED_SESSIONS} == SHARED_SESSIONS
    defaults = parse_serve_with_environment(monkeypatch, {})
    assert parse_serve_with_environment(monkeypatch, environment) == defaults


def test_every_grpc_environment_variable_is_read_by_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = services()["grpc"]["environment"]
    defaults = parse_serve_with_environment(monkeypatch, environment)
    for name, value in environment.items():
        changed = parse_serve_with_environment(monkeypatch, {**environment, name: value + "1"})
        assert changed != defaults, f"{name} is set in compose but `rnnserve serve` ignores it"


def test_torchserve_command_reads_the_mounted_config() -> None:
    args = parse_with_our_cli(services()["torchserve"]["command"])
    assert args.foreground
    config_target = option_value(services()["torchserve"]["command"], "--config")
    mount = volume_mounts("torchserve")[config_target]
    assert mount["type"] == "bind" and mount["read_only"]


# ---- shared sessions: Redis and the load balancer ------------------------------------------------


NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "grpc.conf.template"


def test_redis_keeps_sessions_on_a_volume_with_appendonly() -> None:
    redis = services()["redis"]
    command = redis["command"]
    assert command[0] == "redis-server" and option_value(command, "--appendonly") == "yes"
    assert option_value(command, "--appendfsync") in {"always", "everysec"}
    assert volume_mounts("redis")["/data"]["type"] == "volume"
    assert "ports" not in redis, "the session store is reached inside the compose network only"
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", redis["image"])
    assert services()["grpc"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert healthcheck_command("redis") == ["redis-cli", "ping"]


def test_grpc_replicas_use_the_redis_service_as_their_session_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = parse_serve_with_environment(monkeypatch, services()["grpc"]["environment"])
    assert args.session_store == "redis://redis:6379"  # the service name, Redis's own port


def test_load_balancer_runs_the_template_the_failover_tests_run() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from lb_support import nginx_command

    lb = services()["lb"]
    mount = volume_mounts("lb")["/etc/nginx/templates/nginx.conf.template"]
    assert (ROOT / mount["source"]).resolve() == NGINX_TEMPLATE and mount["read_only"]
    assert lb["command"] == nginx_command("nginx", "/etc/nginx/nginx.conf")
    assert lb["environment"]["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    placeholders = set(re.findall(r"\$\{(RNNSERVE_[A-Z_]+)\}", NGINX_TEMPLATE.read_text()))
    assert placeholders == {n for n in lb["environment"] if n.startswith("RNNSERVE_")}
    grpc_port = served_address("grpc").rsplit(":", 1)[1]
    assert f"server grpc:{grpc_port} " in lb["environment"]["RNNSERVE_UPSTREAMS"]
    listen_port = lb["environment"]["RNNSERVE_LISTEN"].rsplit(":", 1)[1]
    assert {p.container_port for p in published_ports("lb")} == {int(listen_port)}
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+", lb["image"])
    assert services()["lb"]["depends_on"]["grpc"] == {"condition": "service_healthy"}


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_rendered_load_balancer_config_passes_nginx_t(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from lb_support import render

    env = services()["lb"]["environment"]
    # the real nginx checks the config; "grpc" resolves only inside compose, so a loopback
    # address stands in for it
    upstreams = env["RNNSERVE_UPSTREAMS"].replace("grpc:", "127.0.0.1:")
    config = tmp_path / "nginx.conf"
    listen = env["RNNSERVE_LISTEN"]  # nginx -t checks it without binding
    config.write_text(render(listen, upstreams, tmp_path, tmp_path / "error.log"))
    check = subprocess.run(
        [shutil.which("nginx") or "nginx", "-t", "-q", "-c", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr


# ---- files the deployment refers to -------------------------------------------------------------


def test_every_referenced_file_exists() -> None:
    for name, spec in services().items():
        if "build" in spec:
            context = ROOT / spec["build"]["context"]
            assert (context / spec["build"]["dockerfile"]).is_file(), name
        for mount in volume_mounts(name).values():
            if mount["type"] == "bind":
                assert (ROOT / mount["source"]).is_file(), (name, mount["source"])


@cache
def torchserve_properties() -> dict[str, str]:
    source = volume_mounts("torchserve")["/etc/rnnserve/torchserve.properties"]["source"]
    pairs = {}
    for line in (ROOT / source).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_torchserve_container_config_binds_what_compose_publishes_and_hides_management() -> None:
    props = torchserve_properties()
    published = {p.container_port for p in published_ports("torchserve")}
    for key in ("inference_address", "metrics_address"):
        # 127.0.0.1 inside a container would be unreachable through the published port.
        assert props[key].startswith("http://0.0.0.0:"), key
        assert int(props[key].rsplit(":", 1)[1]) in published, key
    assert props["management_address"] == "unix:management.sock"  # on no TCP port at all
    assert props["disable_token_authorization"] in {"true", "false"}, "a deliberate choice"
    assert props["enable_model_api"] == "false"


def test_prometheus_scrapes_both_services_on_their_metrics_ports() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    grpc_metrics = int(option_value(services()["grpc"]["command"], "--metrics-port"))
    torchserve_metrics = int(torchserve_properties()["metrics_address"].rsplit(":", 1)[1])
    assert targets == {("grpc", grpc_metrics), ("torchserve", torchserve_metrics)}
    mount = volume_mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    assert (ROOT / mount["source"]).resolve() == PROMETHEUS_CONFIG


def test_pinned_images() -> None:
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services()["prometheus"]["image"])


# ---- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, instruction: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd.upper() == instruction.upper()]

    def last(self, instruction: str) -> dockerfile.Command:
        found = self.all(instruction)
        assert found, f"no {instruction} in stage {self.name or self.base}"
        return found[-1]


@cache
def dockerfile_stages() -> list[Stage]:
    """The Dockerfile as parsed by BuildKit's own parser, split into build stages."""
    global_args, stages = {}, []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "ARG" and not stages:
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
        elif command.cmd.upper() == "FROM":
            image, *alias = command.value
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], image)
            stages.append(Stage(base=base, name=alias[-1] if alias else None))
        else:
            stages[-1].commands.append(command)
    return stages


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def exec_form(command: dockerfile.Command) -> list[str]:
    assert command.json, f"line {command.start_line}: exec (JSON) form expected"
    return list(command.value)


def dockerfile_healthcheck_command() -> list[str]:
    check = exec_form(final_stage().last("HEALTHCHECK"))
    assert check[0] == "CMD"
    return check[1:]


def pip_installs(shell_lines: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in these shell lines, flags without values dropped."""
    installs = []
    for line in shell_lines:
        for command in re.split(r"&&|;", line):
            words = shlex.split(command)
            for i, word in enumerate(words[:-1]):
                if Path(word).name == "pip" and words[i + 1] == "install":
                    arguments = words[i + 2 :]
                    quiet = {"--quiet", "-q", "-e", "--no-build-isolation", "--no-deps"}
                    installs.append([w for w in arguments if w not in quiet])
    return installs


def run_lines(stage: Stage) -> list[str]:
    return [" ".join(command.value) for command in stage.all("RUN")]


def test_dockerfile_is_multi_stage_with_pinned_slim_python_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", stage.base), stage.base


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    user = final_stage().last("USER").value[0]
    assert user.split(":")[0] not in {"root", "0"}
    assert dockerfile_healthcheck_command()[:2] == ["rnnserve", "health"]


def test_dockerfile_installs_like_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text().splitlines()
    makefile_installs = pip_installs([line for line in makefile if "pip install" in line])
    makefile_installs = [i for i in makefile_installs if i != ["--upgrade", "pip"]]
    torch_pin = next(i[0] for i in makefile_installs if i[0].startswith("torch=="))
    assert f'"{torch_pin}"' in (ROOT / "pyproject.toml").read_text()
    project = next(i[0] for i in makefile_installs if i[0].startswith("."))
    assert project == ".[dev]"

    # Same order and pins; the image takes torch's CPU wheel and leaves out the dev extras.
    assert pip_installs(run_lines(dockerfile_stages()[0])) == [
        [torch_pin, "--index-url", "https://download.pytorch.org/whl/cpu"],
        ["."],
    ]


def test_final_stage_has_java_17_and_no_build_tools_or_pip_builds() -> None:
    runs = run_lines(final_stage())
    apt_packages = {
        word
        for line in runs
        for word in shlex.split(line.partition("apt-get install")[2].partition("&&")[0])
        if not word.startswith("-")
    }
    # Java for TorchServe; the native core's shared libraries (its build stage has the -dev ones)
    runtime_libraries = {"libgrpc++1.51", "libprotobuf32", "libhiredis0.14"}
    assert apt_packages == {"openjdk-17-jre-headless", *runtime_libraries}
    assert not apt_packages & BUILD_TOOLS
    assert pip_installs(runs) == [], "the final stage copies the venv, it builds nothing"
    copies = [(c.flags, c.value) for c in final_stage().all("COPY")]
    assert (("--from=build",), ("/opt/venv", "/opt/venv")) in copies


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- .dockerignore -------------------------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match semantics plus `**`: `*` and `?` stay within one path segment."""
    regex = ""
    for part in pattern.split("/"):
        if part == "**":
            regex += "(?:[^/]+/)*"
            continue
        wildcards = {"*": "[^/]*", "?": "[^/]"}
        regex += "".join(wildcards.get(char, re.escape(char)) for char in part) + "/"
    return re.compile(regex.removesuffix("/"))


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    copied = [
        source
        for command in dockerfile_stages()[0].all("COPY")
        if not any(flag.startswith("--from") for flag in command.flags)
        for source in command.value[:-1]
    ]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source.rstrip("/")), source
    assert not dockerignore_excludes("serving/cli.py")
    for junk in (".venv/bin/python", "model_store/sine/1/model.onnx", ".git/HEAD", "tests/unit"):
        assert dockerignore_excludes(junk), junk
    assert dockerignore_excludes("serving/__pycache__/cli.cpython-311.pyc")


# ---- README -------------------------------------------------------------------------------------


def readme_deploy_section() -> str:
    text = README.read_text()
    assert README_SECTION in text, f"README.md needs a '{README_SECTION}' section"
    section = text.split(README_SECTION, 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]


def readme_rnnserve_commands() -> list[list[str]]:
    """Every `rnnserve …` command in the deploy section's shell blocks (prefixes cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", readme_deploy_section(), flags=re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        starts = [i for i, w in enumerate(words) if w == "rnnserve" and i + 1 < len(words)]
        commands += [words[i:] for i in starts[:1]]
    return commands


def test_readme_deploy_commands_parse_with_our_cli() -> None:
    commands = readme_rnnserve_commands()
    assert {c[1] for c in commands} >= {"health", "client", "train"}
    for command in commands:
        parse_with_our_cli(command)


def test_readme_explains_commands_ports_calls_retraining_and_scaling() -> None:
    section = readme_deploy_section()
    for needed in (
        "docker compose up",
        "--profile monitoring",
        "docker compose run --rm train",
        "--scale grpc=",
        "rnnserve client",
        "rnnserve health",
        "curl",
        "/predictions/",
    ):
        assert needed in section, needed
    for port in ("50051", "9090", "8080", "8082", "9091"):
        assert port in section, port
