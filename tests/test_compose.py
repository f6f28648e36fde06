"""docker-compose.yml, the Dockerfile and deploy/ checked without Docker.

The commands that compose runs in our image are parsed by the real `ponder` CLI (typer/click),
the pipeline they name is imported, and the topics created by `topic-init` are compared with the
pipeline's own topic names and the worker's partition count. Structural checks cover what
`docker compose config` would reject (unknown depends_on targets, undeclared volumes, missing bind
sources) and what would only fail at run time (colliding host ports, a service_healthy
dependency without a healthcheck, a profiled dependency of an unprofiled service).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest
import typer
import typer.main
import yaml

import ponder.cli
from ponder.pipelines.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "datasources.yml"
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards.yml"

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

# -- compose loading ------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?err}. A variable with neither a value nor a default is an error here (compose would
    only warn and substitute an empty string)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("plain")
        name, op, default = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]?)(.*)", expr).groups()
        val = env.get(name)
        if op in (":-", "-"):
            return default if (val is None or (op == ":-" and val == "")) else val
        if op in (":?", "?"):
            if val is None or (op == ":?" and val == ""):
                raise ValueError(f"${{{expr}}} requires {name}")
            return val
        if op == "" and default == "":
            if val is None:
                raise ValueError(f"${name} has no value and no default")
            return val
        raise ValueError(f"unsupported interpolation ${{{expr}}}")

    return _VAR.sub(sub, value)


def _interpolate_tree(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(path: Path = COMPOSE) -> dict:
    # an empty environment: the file must work on defaults alone
    return _interpolate_tree(yaml.safe_load(path.read_text()), {})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def depends_on(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def volume_mounts(svc: dict) -> list[tuple[str, str | None, str]]:
    """(type, source, target) for each mount: type is 'bind', 'volume' or 'anonymous'."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            src, tgt = v.get("source"), v["target"]
            kind = v.get("type", "volume")
            out.append(("anonymous" if kind == "volume" and not src else kind, src, tgt))
            continue
        parts = v.split(":")
        if len(parts) == 1:
            out.append(("anonymous", None, parts[0]))
            continue
        src, tgt = parts[0], parts[1]
        kind = "bind" if src.startswith((".", "/", "~")) else "volume"
        out.append((kind, src, tgt))
    return out


def published_ports(svc: dict) -> list[tuple[str, int, int]]:
    """(host_ip, host_port, container_port) for each port published on the host."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            if p.get("published") is not None:
                out.append((p.get("host_ip", "0.0.0.0"), int(p["published"]), int(p["target"])))
            continue
        spec = str(p).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 1:  # container port only: a random host port
            continue
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        host, container = parts[-2], parts[-1]
        if "-" in host or "-" in container:
            pytest.fail(f"port ranges are not supported by this test: {p!r}")
        out.append((ip, int(host), int(container)))
    return out


def container_ports(svc: dict) -> set[int]:
    ports = {c for _, _, c in published_ports(svc)}
    ports |= {int(str(p).split("/")[0]) for p in svc.get("expose") or []}
    return ports


def duration_s(text: str | int | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def is_ponder_service(svc: dict) -> bool:
    return "build" in svc or str(svc.get("image", "")).split(":")[0].endswith("ponder")


def build_dir(svc: dict) -> Path:
    b = svc["build"]
    return ROOT / (b if isinstance(b, str) else b.get("context", "."))


# -- the CLI checker ------------------------------------------------------------------------------

# Typer >= 0.2x parses with its own vendored copy of click (typer._click); older Typer uses click.
# Either way these are the classes the real `ponder` parser raises.
try:
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import UsageError


def parse_ponder_command(args: list[str]):
    """Parse `ponder ARGS...` with the real CLI, without running it: the subcommand's context
    (its parsed `params`), or UsageError (or a subclass: NoSuchOption, MissingParameter,
    BadParameter) where `ponder` would refuse the command line."""
    root = typer.main.get_command(ponder.cli.app)
    assert hasattr(root, "get_command"), "ponder is a command group"
    if not args:
        raise UsageError("no subcommand")
    root_ctx = root.context_class(root, info_name="ponder", resilient_parsing=False)
    sub = root.get_command(root_ctx, args[0])
    if sub is None:
        raise UsageError(f"no such command {args[0]!r}", ctx=root_ctx)
    return sub.make_context(args[0], list(args[1:]), parent=root_ctx, resilient_parsing=False)


def ponder_commands(services) -> dict[str, list[str]]:
    out = {}
    for name, svc in services.items():
        if is_ponder_service(svc):
            cmd = svc.get("command")
            assert isinstance(cmd, list) and cmd, f"{name}: give `command` in exec (list) form"
            assert all(isinstance(a, str) for a in cmd), f"{name}: quote every argument"
            out[name] = cmd
    return out


@pytest.fixture(scope="module")
def worker_ctx(services):
    ctx = parse_ponder_command(services["worker"]["command"])
    assert ctx.command.name == "worker"
    return ctx


def service_env(svc: dict) -> dict[str, str]:
    """A service's `environment` (map or list form), already interpolated."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def load_service_pipeline(svc: dict, ref: str):
    """Load a pipeline as the service's container would: with its environment and nothing of
    ours (a PONDER_* variable set here must not stand in for one the file forgot)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PONDER_")}
    os.environ.update(service_env(svc))
    try:
        return load_pipeline(ref)
    finally:
        for k in service_env(svc):
            os.environ.pop(k, None)
        os.environ.update(saved)


@pytest.fixture(scope="module")
def worker_pipeline(services, worker_ctx):
    return load_service_pipeline(services["worker"], worker_ctx.params["pipeline"])


# -- services, dependencies, volumes, ports -------------------------------------------------------


def test_compose_file_parses_and_has_the_services(services):
    for name in ("kafka", "topic-init", "worker", "simulator", "publisher", "vllm", "prometheus", "grafana"):
        assert name in services, name
    assert "version" not in load_compose(), "the top-level `version` key is obsolete"


def test_every_service_has_an_image_or_a_build(services):
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        if "build" in svc:
            b = svc["build"]
            dockerfile = "Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile")
            assert (build_dir(svc) / dockerfile).is_file(), f"{name}: no {dockerfile} in build context"


def test_depends_on_targets_exist_with_valid_conditions(services):
    for name, svc in services.items():
        for dep, cond in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name
            assert cond in CONDITIONS, f"{name} -> {dep}: bad condition {cond!r}"
            target = services[dep]
            if cond == "service_healthy":
                assert target.get("healthcheck", {}).get("test"), f"{dep} has no healthcheck"
            if cond == "service_completed_successfully":
                assert target.get("restart", "no") in ("no", "on-failure"), \
                    f"{dep} must be a one-shot job to complete"
            # a service outside any profile must not need a service that only runs in a profile
            if not svc.get("profiles"):
                assert not target.get("profiles"), f"{name} depends on profiled service {dep}"


def test_depends_on_has_no_cycle(services):
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            pytest.fail(f"dependency cycle: {' -> '.join([*path, n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in depends_on(services[n]):
            visit(d, [*path, n])
        state[n] = 2

    for n in services:
        visit(n, [])


def test_volumes_are_declared_or_bind_existing_repo_files(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for kind, src, tgt in volume_mounts(svc):
            assert tgt.startswith("/"), f"{name}: volume target {tgt!r} must be absolute"
            if kind == "volume":
                assert src in declared, f"{name}: named volume {src!r} is not declared"
                used.add(src)
            elif kind == "bind":
                p = (ROOT / src).resolve()
                assert p.is_relative_to(ROOT), f"{name}: bind {src!r} leaves the repository"
                assert p.exists(), f"{name}: bind source {src!r} does not exist"
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def test_host_ports_are_unique_and_replicas_publish_none(services):
    seen: dict[int, str] = {}
    for name, svc in services.items():
        for _ip, host, _container in published_ports(svc):
            assert host not in seen, f"host port {host} used by {seen.get(host)} and {name}"
            seen[host] = name
        replicas = (svc.get("deploy") or {}).get("replicas", 1)
        if replicas > 1:
            assert not published_ports(svc), f"{name}: {replicas} replicas cannot share a host port"
            assert "container_name" not in svc, f"{name}: replicas cannot share a container_name"


def test_profiles(services):
    assert services["vllm"].get("profiles") == ["gpu"]
    assert services["publisher"].get("profiles") == ["demo"]
    assert services["simulator"].get("profiles") == ["demo"]
    for core in ("kafka", "topic-init", "worker", "prometheus", "grafana"):
        assert not services[core].get("profiles"), core


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile():
    assert DOCKERFILE.is_file()
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    froms = [a for op, a in ins if op == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim"
    entry = [a for op, a in ins if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["ponder"], "ENTRYPOINT must be the exec form of ponder"
    cmd = [a for op, a in ins if op == "CMD"]
    assert cmd, "a default CMD"
    try:  # the default CMD is accepted by the CLI (--help exits 0)
        root = typer.main.get_command(ponder.cli.app)
        root.make_context("ponder", json.loads(cmd[-1]), resilient_parsing=False)
    except typer.Exit as e:
        assert e.exit_code == 0
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), \
        "USER comes after the last RUN"
    workdirs = [a for op, a in ins if op == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"
    volumes = [a for op, a in ins if op == "VOLUME"]
    assert any("/var/lib/ponder" in v for v in volumes)
    installs = [a for op, a in ins if op == "RUN" and "pip install" in a]
    assert installs, "pip install the package"
    # the workers' tiered pipeline runs its edge model in process: the jax extra
    assert re.search(r"pip install[^&;]*\[[^\]]*\bjax\b", " ".join(installs)), "install the jax extra"
    assert not re.search(r"\[[^\]]*\b(test|dev)\b", " ".join(installs)), "no test/dev extras"


def test_dockerfile_copies_what_the_build_needs_and_dockerignore_keeps_it():
    ignored = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]

    def excluded(rel: str) -> bool:
        return any(fnmatch(rel, pat.strip("/")) or fnmatch(rel.split("/")[0], pat.strip("/"))
                   for pat in ignored if not pat.startswith("!"))

    copied = []
    for op, args in dockerfile_instructions():
        if op in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            copied += parts[:-1]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY source {src!r} does not exist"
        assert not excluded(src), f"COPY source {src!r} is excluded by .dockerignore"
    # pip builds the package from pyproject.toml, which names its readme
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {PurePosixPath(s).as_posix() for s in copied}
    assert "pyproject.toml" in names and "ponder" in names
    if isinstance(meta.get("readme"), str):
        assert meta["readme"] in names
    for heavy in (".git", ".venv", "runs", "state"):
        assert excluded(heavy), f".dockerignore should exclude {heavy}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def test_image_installs_every_distribution_the_commands_import():
    """`pip install .` in the image must bring everything `ponder worker|publish|subscribe`
    import: the third-party modules they load must come from distributions that pyproject's
    dependencies (plus any extras the Dockerfile installs) pull in."""
    from importlib import metadata

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set()
    for _, args in (x for x in dockerfile_instructions() if x[0] == "RUN"):
        for m in re.finditer(r"pip install[^&;]*?\[([^\]]+)\]", args):
            extras |= {e.strip() for e in m.group(1).split(",")}
    wanted = [*meta.get("dependencies", [])]
    for e in extras:
        wanted += meta.get("optional-dependencies", {}).get(e, [])
    closure, todo = set(), [_req_name(r) for r in wanted]
    while todo:
        n = todo.pop()
        if n in closure:
            continue
        closure.add(n)
        try:
            todo += [_req_name(r) for r in metadata.requires(n) or []]
        except metadata.PackageNotFoundError:
            pass

    modules = ["ponder.cli", "ponder.pipelines.kafka", "ponder.pipelines.iot_monitor",
               "ponder.pipelines.iot_tiered", "ponder.inference.jax.engine", "ponder.inference.openai",
               "ponder.connectors.kafka.publish", "ponder.state.rocks", "ponder.runtime.metrics"]
    probe = ("import importlib, importlib.util, sys; base = set(sys.modules)\n"
             f"for m in {modules!r}:\n"
             "    if importlib.util.find_spec(m): importlib.import_module(m)\n"
             "print('\\n'.join(sorted({m.split('.')[0] for m in set(sys.modules) - base})))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.split()
    dists = metadata.packages_distributions()
    missing = {}
    for mod in out:
        if mod in sys.stdlib_module_names or mod == "ponder" or mod.startswith("_"):
            continue
        provided_by = {_norm(d) for d in dists.get(mod, [])}
        if provided_by and not provided_by & closure:
            missing[mod] = sorted(provided_by)
    assert not missing, (f"imported but not installed by `pip install .` (add to pyproject "
                         f"dependencies): {missing}")


# -- ponder commands ------------------------------------------------------------------------------


def test_every_ponder_command_is_accepted_by_the_cli(services):
    cmds = ponder_commands(services)
    assert {"worker", "simulator", "publisher"} <= set(cmds)
    for name, cmd in cmds.items():
        assert "entrypoint" not in services[name], f"{name}: keep the image's ENTRYPOINT (ponder)"
        try:
            ctx = parse_ponder_command(cmd)
        except UsageError as e:
            pytest.fail(f"{name}: `ponder {shlex.join(cmd)}` is refused: {e.format_message()}")
        if "pipeline" in ctx.params:  # raises if it does not import or its environment is short
            load_service_pipeline(services[name], ctx.params["pipeline"])


@pytest.mark.parametrize("args", [
    ["worker", "ponder.pipelines.iot_monitor:pipeline", "--brokers", "kafka:9092", "--no-such-option", "1"],
    ["worker", "ponder.pipelines.iot_monitor:pipeline"],  # --brokers is required
    ["worker", "ponder.pipelines.iot_monitor:pipeline", "--brokers", "kafka:9092", "--partitions", "many"],
    ["worker", "--brokers", "kafka:9092"],  # no pipeline
    ["publish", "--brokers", "kafka:9092", "--topic", "t", "--simulated"],
    ["no-such-command", "--brokers", "kafka:9092"],
])
def test_the_checker_rejects_bad_commands(args):
    with pytest.raises(UsageError):
        parse_ponder_command(args)


def test_a_bad_pipeline_reference_is_caught():
    ctx = parse_ponder_command(["worker", "ponder.pipelines.no_such_module:pipeline", "--brokers", "k:9092"])
    with pytest.raises(ValueError, match="cannot import"):
        load_pipeline(ctx.params["pipeline"])


def test_worker(services, worker_ctx):
    svc = services["worker"]
    p = worker_ctx.params
    assert p["brokers"] == "kafka:9092"
    assert (svc.get("deploy") or {}).get("replicas", 1) >= 2
    assert svc.get("restart") == "unless-stopped"
    assert depends_on(svc).get("topic-init") == "service_completed_successfully"
    # the state directory is the mounted named volume, and the image declares it
    mounts = {tgt: (kind, src) for kind, src, tgt in volume_mounts(svc)}
    assert mounts.get(str(p["state_dir"]), ("", ""))[0] == "volume", "state dir must be a named volume"
    # long enough to drain, checkpoint and leave the group before SIGKILL
    grace = duration_s(svc.get("stop_grace_period", "10s"))
    assert grace >= max(30, p["session_timeout_ms"] / 1000 + p["checkpoint_interval"])
    assert svc.get("stop_signal", "SIGTERM") in ("SIGTERM", "TERM", "15")


def test_brokers_named_in_commands_are_kafka_advertised_listeners(services):
    env = services["kafka"]["environment"]
    advertised = {a.split("://", 1)[1] for a in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name, cmd in ponder_commands(services).items():
        ctx = parse_ponder_command(cmd)
        if "brokers" not in ctx.params:
            continue  # `simulate` writes files only
        for b in ctx.params["brokers"].split(","):
            assert b in advertised, f"{name}: {b} is not an advertised listener {advertised}"
            assert b.split(":")[0] in services
        assert depends_on(services[name]), f"{name} must wait for kafka (via topic-init)"


def test_kafka_kraft_single_node(services):
    k = services["kafka"]
    env = {key: str(v) for key, v in k["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    names = dict(x.split("://", 1) for x in env["KAFKA_LISTENERS"].split(","))  # name -> host:port
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in names
    ctrl_port = names[env["KAFKA_CONTROLLER_LISTENER_NAMES"]].rsplit(":", 1)[1]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:{ctrl_port}"
    protocol_map = dict(x.split(":") for x in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(names) <= set(protocol_map)
    advertised = dict(x.split("://", 1) for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    for lname, addr in advertised.items():
        assert lname in names, f"advertised listener {lname} is not a listener"
        assert names[lname].rsplit(":", 1)[1] == addr.rsplit(":", 1)[1]
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    # a listener advertised as localhost:P is reachable from the host only if P is published as P
    for lname, addr in advertised.items():
        host, port = addr.rsplit(":", 1)
        if host == "localhost":
            assert (int(port), int(port)) in {(h, c) for _, h, c in published_ports(k)}, lname
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert k["healthcheck"]["test"]
    assert any(kind == "volume" and tgt == env["KAFKA_LOG_DIRS"] for kind, _, tgt in volume_mounts(k))


def topic_init_creates(svc: dict) -> dict[str, dict]:
    """The kafka-topics.sh --create calls of the topic-init job: topic -> options."""
    cmd = svc["command"]
    script = "\n".join(cmd) if isinstance(cmd, list) else cmd
    script = re.sub(r"\\\n", " ", script)
    out = {}
    for line in re.split(r"\n|&&|;", script):
        words = shlex.split(line)
        if not words or not words[0].endswith("kafka-topics.sh") or "--create" not in words:
            continue
        opts: dict = {"configs": {}, "flags": set()}
        it = iter(words[1:])
        for w in it:
            if w in ("--create", "--if-not-exists"):
                opts["flags"].add(w)
            elif w == "--config":
                k, _, v = next(it).partition("=")
                opts["configs"][k] = v
            elif w.startswith("--"):
                opts[w[2:]] = next(it)
        out[opts["topic"]] = opts
    return out


def test_topic_init_matches_the_pipeline_and_the_worker(services, worker_ctx, worker_pipeline):
    svc = services["topic-init"]
    assert svc["image"] == services["kafka"]["image"]
    assert depends_on(svc) == {"kafka": "service_healthy"}
    assert svc.get("restart", "no") == "no"
    p = worker_ctx.params
    pipe = worker_pipeline
    t_in, t_out, t_dead = pipe.topics
    t_in, t_out, t_dead = p["input_topic"] or t_in, p["output_topic"] or t_out, p["dead_letter_topic"] or t_dead
    group = p["group"] or f"ponder-{pipe.name}"
    changelog = f"{group}.{pipe.name}.changelog"
    created = topic_init_creates(svc)
    assert set(created) == {t_in, t_out, t_dead, changelog}
    for topic, opts in created.items():
        assert int(opts["partitions"]) == p["partitions"], topic
        assert opts["bootstrap-server"] == p["brokers"], topic
        assert opts["replication-factor"] == "1", topic
        assert "--if-not-exists" in opts["flags"], topic
        compact = opts["configs"].get("cleanup.policy") == "compact"
        assert compact == (topic == changelog), topic


def test_publisher_feeds_the_worker_a_simulated_two_tenant_fleet(services, worker_ctx, worker_pipeline):
    ctx = parse_ponder_command(services["publisher"]["command"])
    assert ctx.command.name == "publish"
    pipe = worker_pipeline
    assert ctx.params["topic"] == (worker_ctx.params["input_topic"] or pipe.topics[0])
    assert ctx.params["partitions"] == worker_ctx.params["partitions"]
    assert not ctx.params["simulate_fleet"] and not ctx.params["progress"]
    assert ctx.params["key_field"] == pipe.key
    deps = depends_on(services["publisher"])
    assert deps == {"topic-init": "service_completed_successfully", "simulator": "service_completed_successfully"}
    # the file it publishes is the one the simulator writes, on a volume both mount at one path
    sim = parse_ponder_command(services["simulator"]["command"])
    assert sim.command.name == "simulate" and services["simulator"].get("restart") == "no"
    assert PurePosixPath(str(ctx.params["file"])) == PurePosixPath(str(sim.params["out_dir"])) / "events.jsonl"
    mounts = [{(src, tgt) for kind, src, tgt in volume_mounts(services[n]) if kind == "volume"}
              for n in ("simulator", "publisher")]
    assert mounts[0] & mounts[1] and any(tgt == str(sim.params["out_dir"]) for _, tgt in mounts[0] & mounts[1])
    # the image creates the mount point owned by its user, so a fresh volume is writable by it
    chowned = " ".join(a for op, a in dockerfile_instructions() if op == "RUN" and "chown" in a)
    assert str(sim.params["out_dir"]) in chowned
    # its events name their tenant in the field the pipeline bills by, for two tenants
    from ponder.simulate import Fleet

    assert sim.params["tenants"] >= 2 and pipe.tenant == "tenant"
    event = next(Fleet(4, 1, 0, tenants=sim.params["tenants"]).iter_events())
    assert pipe.tenant in event and pipe.schema is not None and pipe.tenant in pipe.schema.__struct_fields__


def test_worker_runs_the_tiered_pipeline_with_vllm_as_the_cloud_tier(services, worker_pipeline):
    tiers = {t.name: t for t in worker_pipeline.tiers}
    assert set(tiers) == {"reflex", "edge", "cloud"}
    # cloud: the vllm service, at the port it listens on, asking for the model it serves
    m = re.fullmatch(r"http://([^:/]+):(\d+)/v1", tiers["cloud"].engine)
    assert m, tiers["cloud"].engine
    vllm = services["vllm"]
    cmd = vllm["command"]
    assert m.group(1) == "vllm" and int(m.group(2)) == int(cmd[cmd.index("--port") + 1])
    assert int(m.group(2)) in container_ports(vllm)
    assert tiers["cloud"].model == cmd[cmd.index("--model") + 1]
    raw_env = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["environment"]
    assert raw_env["PONDER_CLOUD_MODEL"] == "${VLLM_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"  # follows VLLM_MODEL
    assert tiers["cloud"].price is not None and tiers["edge"].price is not None
    # edge: in process, on the checkpoint the Dockerfile writes with `ponder init-model`
    assert tiers["edge"].engine.startswith("jax:")
    ckpt = tiers["edge"].engine.removeprefix("jax:")
    inits = [shlex.split(a) for op, a in dockerfile_instructions() if op == "RUN" and "init-model" in a]
    assert len(inits) == 1 and inits[0][0] == "ponder"
    ctx = parse_ponder_command(inits[0][1:])
    assert ctx.command.name == "init-model" and str(ctx.params["out_dir"]) == ckpt
    # the budgets hold for the whole group: caps per tenant at the cloud tier and one overall
    caps = {(b.tenant, b.tier) for b in worker_pipeline.budgets}
    assert caps == {("acme", "cloud"), ("globex", "cloud"), ("*", "*")}


def test_the_tiered_pipeline_without_its_environment_says_what_is_missing(monkeypatch):
    for k in ("PONDER_EDGE_ENGINE", "PONDER_CLOUD_URL"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match=r"needs \$PONDER_EDGE_ENGINE: jax:CHECKPOINT_DIR"):
        load_pipeline("ponder.pipelines.iot_tiered:pipeline")
    monkeypatch.setenv("PONDER_EDGE_ENGINE", "jax:/models/edge")
    with pytest.raises(ValueError, match=r"needs \$PONDER_CLOUD_URL: the URL of an OpenAI-compatible server"):
        load_pipeline("ponder.pipelines.iot_tiered:pipeline")
    monkeypatch.setenv("PONDER_CLOUD_URL", "vllm:8000")
    with pytest.raises(ValueError, match=r"\$PONDER_CLOUD_URL must be an http\(s\):// URL .*got 'vllm:8000'"):
        load_pipeline("ponder.pipelines.iot_tiered:pipeline")


def test_vllm(services):
    v = services["vllm"]
    assert v["image"].startswith("vllm/vllm-openai:")
    devices = v["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    cmd = v["command"]
    assert "--enable-prefix-caching" in cmd
    assert "--enable-prompt-tokens-details" in cmd  # else its usage reports no cached tokens
    model = cmd[cmd.index("--model") + 1]
    assert model == "Qwen/Qwen2.5-0.5B-Instruct"  # the default of ${VLLM_MODEL:-...}
    assert "${VLLM_MODEL" in yaml.safe_load(COMPOSE.read_text())["services"]["vllm"]["command"][1]
    port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else 8000
    assert port == 8000 and (8000, 8000) in {(h, c) for _, h, c in published_ports(v)}
    assert any(kind == "volume" and tgt.endswith(".cache/huggingface") for kind, _, tgt in volume_mounts(v))


# -- prometheus and grafana -----------------------------------------------------------------------


def test_prometheus_config_scrapes_existing_services(services, worker_ctx):
    prom = services["prometheus"]
    mounts = {tgt.split(":")[0]: src for kind, src, tgt in volume_mounts(prom) if kind == "bind"}
    config_path = next((a.split("=", 1)[1] for a in prom.get("command", [])
                        if a.startswith("--config.file=")), "/etc/prometheus/prometheus.yml")
    assert (ROOT / mounts[config_path]).resolve() == PROMETHEUS
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    targets: dict[str, set[int]] = {}
    for job in cfg["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                host, port = t.rsplit(":", 1)
                targets.setdefault(host, set()).add(int(port))
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A" and "port" in sd, "A records need a port"
            for n in sd["names"]:
                targets.setdefault(n, set()).add(int(sd["port"]))
    targets.pop("localhost", None)  # prometheus itself
    assert {"worker", "vllm"} <= set(targets)
    for host, ports in targets.items():
        assert host in services, f"scrape target {host!r} is not a compose service"
        assert ports <= container_ports(services[host]), f"{host}: {ports} not exposed"
    assert 8000 in targets["vllm"]
    # the workers serve /metrics only when asked to, on the port prometheus scrapes
    assert worker_ctx.params["metrics_port"] in targets["worker"], \
        "pass --metrics-port to the worker with the port deploy/prometheus.yml scrapes"


def test_grafana_datasource_points_at_prometheus(services):
    g = services["grafana"]
    binds = {tgt: src for kind, src, tgt in volume_mounts(g) if kind == "bind"}
    target = next(t for t, s in binds.items() if (ROOT / s).resolve() == GRAFANA_DATASOURCES)
    assert target.startswith("/etc/grafana/provisioning/datasources/")
    cfg = yaml.safe_load(GRAFANA_DATASOURCES.read_text())
    assert cfg["apiVersion"] == 1
    (ds,) = cfg["datasources"]
    assert ds["type"] == "prometheus"
    m = re.fullmatch(r"http://([^:/]+):(\d+)/?", ds["url"])
    assert m, ds["url"]
    host, port = m.group(1), int(m.group(2))
    assert host in services and host == "prometheus"
    assert port in container_ports(services[host])
    assert (3000, 3000) in {(h, c) for _, h, c in published_ports(g)}
    assert depends_on(g).get("prometheus")


def test_grafana_provisions_the_ponder_dashboard_on_the_provisioned_datasource(services):
    g = services["grafana"]
    binds = {(ROOT / s).resolve(): tgt.split(":")[0] for kind, s, tgt in volume_mounts(g) if kind == "bind"}
    assert binds[GRAFANA_DASHBOARDS].startswith("/etc/grafana/provisioning/dashboards/")
    (provider,) = yaml.safe_load(GRAFANA_DASHBOARDS.read_text())["providers"]
    assert provider["type"] == "file"
    # the folder the provider reads is the mounted deploy/grafana/dashboards, which holds the dashboard
    folder = ROOT / "deploy" / "grafana" / "dashboards"
    assert binds[folder.resolve()] == provider["options"]["path"]
    dash = json.loads((folder / "ponder.json").read_text())
    (ds,) = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    used = {json.dumps(p["datasource"], sort_keys=True) for p in dash["panels"]}
    used |= {json.dumps(t["datasource"], sort_keys=True) for p in dash["panels"] for t in p["targets"]}
    assert used == {json.dumps({"type": ds["type"], "uid": ds["uid"]}, sort_keys=True)}
