"""What can be checked of docker/ without a Docker engine: the compose file's services, their
wiring, ports and volumes; the Dockerfile's install line against the README's, its entry point,
its user and the files it copies."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
# pip options that change only caching and output, not what gets installed.
PIP_QUIET = {"--no-cache-dir", "-q", "--quiet", "--progress-bar=off"}


def dockerfile_stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{stage name: [(INSTRUCTION, arguments), ...]}`` in file order (continuations joined)."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, f"unreadable FROM line: {line!r}"
            current = stages.setdefault(match[2] or f"stage{len(stages)}", [])
        elif current is not None:
            current.append((instruction, " ".join(args.split())))
    return stages


def pip_install_args(command: str) -> list[str]:
    """The arguments after ``pip install`` in one shell command (``python -m pip`` too)."""
    tokens = shlex.split(command)
    if tokens[:2] in (["python", "-m"], ["python3", "-m"]):
        tokens = tokens[2:]
    assert tokens[:2] == ["pip", "install"], f"not a pip install command: {command!r}"
    return [t for t in tokens[2:] if t not in PIP_QUIET]


def readme_install_command(text: str) -> str:
    """The ``pip install`` step of the README's first fenced shell block that has one."""
    for block in re.finditer(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, re.M | re.S):
        for line in re.sub(r"\\\n", " ", block[1]).splitlines():
            for part in line.split(" #")[0].split("&&"):  # set-up lines chain their steps
                part = part.strip().removeprefix("$ ")
                if re.match(r"(python3? -m )?pip install ", part):
                    return part
    raise AssertionError("README.md has no fenced bash block with a `pip install` line")


def dockerfile_install_command(run_args: str) -> str | None:
    """The ``pip install`` part of a RUN instruction (after its --mount flags), if any."""
    words = run_args.split(" ")
    while words and words[0].startswith("--"):
        words.pop(0)
    for part in " ".join(words).split("&&"):
        if re.match(r"\s*(python3? -m )?pip install ", part):
            return part.strip()
    return None


def with_defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` interpolation, with every variable unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(with_defaults(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def stages() -> dict[str, list[tuple[str, str]]]:
    return dockerfile_stages(DOCKERFILE.read_text())


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_options(service: dict[str, Any]) -> dict[str, str]:
    """``--key=value`` options (and bare ``--flag`` as "") of a list-form command."""
    options = {}
    for word in service["command"]:
        if word.startswith("--"):
            key, _, value = word.partition("=")
            options[key] = value
    return options


# --- the parsing helpers, on known input --------------------------------------------------


def test_parsers_read_known_text() -> None:
    text = ("FROM a AS one\nRUN x \\\n  && y\n# RUN hidden\nFROM b\nUSER me\n")
    assert dockerfile_stages(text) == {"one": [("RUN", "x && y")], "stage1": [("USER", "me")]}
    assert pip_install_args("python -m pip install -q 'torch==2.13.0' -e '.[dev]'") == [
        "torch==2.13.0", "-e", ".[dev]"]
    readme = ("```python\npip install no\n```\n"
              "```bash\npython -m venv v\n$ pip install \\\n a b\n```")
    assert readme_install_command(readme) == "pip install   a b"
    assert dockerfile_install_command("--mount=type=cache,target=/c pip install a") == (
        "pip install a")
    assert dockerfile_install_command("apt-get update && pip install a && rm x") == "pip install a"
    with pytest.raises(AssertionError, match="no fenced bash block"):
        readme_install_command("```\npip install a\n```")
    assert with_defaults("${A:-../x}:/y ${B:-}") == "../x:/y "


# --- compose ------------------------------------------------------------------------------


def test_compose_has_postgres_mlflow_and_trainer(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {"postgres", "mlflow", "trainer"}


def test_published_ports_bind_to_localhost_only(compose: dict[str, Any]) -> None:
    published = 0
    for name, service in services(compose).items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond this machine"
            published += 1
    assert "ports" not in services(compose)["postgres"]
    assert published >= 1


def test_named_volumes_are_declared_and_data_is_kept(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts.setdefault(name, {})[target] = source
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
    assert mounts["postgres"]["/var/lib/postgresql/data"] in declared
    artifacts = command_options(services(compose)["mlflow"])["--artifacts-destination"]
    assert mounts["mlflow"][artifacts] in declared
    assert "/app/shards" in mounts["trainer"]


def test_postgres_and_mlflow_have_healthchecks_that_gate_startup(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert "pg_isready" in " ".join(svc["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(svc["mlflow"]["healthcheck"]["test"])
    assert svc["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["trainer"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_mlflow_server_uses_postgres_and_serves_artifacts(
        compose: dict[str, Any], stages: dict[str, list[tuple[str, str]]]) -> None:
    mlflow = services(compose)["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    options = command_options(mlflow)
    store = urlparse(options["--backend-store-uri"])
    # An explicit driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2.
    assert store.scheme == "postgresql+psycopg2" and store.hostname == "postgres"
    env = services(compose)["postgres"]["environment"]
    assert (store.username, store.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    assert "--serve-artifacts" in options and options["--artifacts-destination"]
    assert mlflow["build"]["target"] == "mlflow" and "mlflow" in stages
    installs = " ".join(a for i, a in stages["mlflow"] if i == "RUN")
    assert "psycopg2-binary==" in installs


def test_mlflow_image_pins_the_mlflow_ci_tests(stages: dict[str, list[tuple[str, str]]]) -> None:
    """The tracking server runs the MLflow version the clients were tested with."""
    pins = (REPO / "constraints.txt").read_text().splitlines()
    pinned = next(line for line in pins if line.startswith("mlflow=="))
    assert pinned in " ".join(a for i, a in stages["mlflow"] if i == "RUN")


def test_trainer_reaches_mlflow_by_a_host_the_server_accepts(compose: dict[str, Any]) -> None:
    svc = services(compose)
    uri = urlparse(svc["trainer"]["environment"]["MLFLOW_TRACKING_URI"])
    options = command_options(svc["mlflow"])
    assert uri.hostname in svc and uri.port == int(options["--port"])
    assert uri.netloc in options["--allowed-hosts"].split(",")


def test_trainer_reserves_gpus(compose: dict[str, Any]) -> None:
    trainer = services(compose)["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE.parent / trainer["build"]["context"]).resolve() == REPO


# --- Dockerfile ---------------------------------------------------------------------------


def test_trainer_is_the_default_stage(stages: dict[str, list[tuple[str, str]]]) -> None:
    assert list(stages)[-1] == "trainer"


def test_install_line_is_the_readmes(stages: dict[str, list[tuple[str, str]]]) -> None:
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing"
    commands = [c for i, a in stages["trainer"] if i == "RUN"
                if (c := dockerfile_install_command(a))]
    assert len(commands) == 1, f"expected one pip install in the trainer stage, got {commands}"
    assert pip_install_args(commands[0]) == pip_install_args(
        readme_install_command(readme.read_text()))
    assert any(re.fullmatch(r"torch==[\w.]+", a) for a in pip_install_args(commands[0]))


def test_entrypoint_is_accelerate_launch_of_a_real_script_and_config(
        stages: dict[str, list[tuple[str, str]]]) -> None:
    import json

    trainer = dict(stages["trainer"])
    assert json.loads(trainer["ENTRYPOINT"]) == ["accelerate", "launch"]
    script, flag, config = json.loads(trainer["CMD"])
    assert (REPO / script).is_file() and flag == "--config"
    assert (REPO / "configs" / f"{config}.yaml").is_file()


def test_runs_as_a_non_root_user(stages: dict[str, list[tuple[str, str]]]) -> None:
    for name, instructions in stages.items():
        users = [i for i, (instr, _) in enumerate(instructions) if instr == "USER"]
        assert users, f"stage {name} never leaves root"
        assert instructions[users[-1]][1] not in ("root", "0", "0:0"), f"stage {name} runs as root"
        later = [instr for instr, _ in instructions[users[-1]:]]
        assert "RUN" not in later, f"stage {name} runs commands after its last USER"


def test_copied_sources_exist(stages: dict[str, list[tuple[str, str]]]) -> None:
    copies = [a.split()[:-1] for i, a in stages["trainer"] if i == "COPY"]
    sources = [s for words in copies for s in words if not s.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
