"""systemd units (systemd-analyze verify) and the supervisord configuration."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.deploy.support import (
    DEPLOY,
    REPO,
    run,
    settings_defaults,
    tool,
)

SYSTEMD = DEPLOY / "systemd"
SUPERVISOR = DEPLOY / "supervisor" / "supervisord.conf"
EXEC = "/opt/fairlane/venv/bin/fairlane"
# unit file -> the name to verify it under (templates as an instance)
UNITS = {
    "fairlane-migrate.service": "fairlane-migrate.service",
    "fairlane-auth.service": "fairlane-auth.service",
    "fairlane-queue@.service": "fairlane-queue@1.service",
    "fairlane-worker@.service": "fairlane-worker@1.service",
    "fairlane.target": "fairlane.target",
}
# The TLS drop-in and the units it goes into (docs/deploy.md, "systemd").
TLS_DROP_IN = "fairlane-tls.conf"
TLS_UNITS = ("fairlane-auth.service", "fairlane-queue@.service", "fairlane-worker@.service")
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "DynamicUser": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((SYSTEMD / name).read_text())


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return sections


def verify_root(tmp_path: Path) -> Path:
    """A file-system root holding the units with the TLS drop-in installed as the docs
    say, the system's own units (for sysinit.target and friends) and a stand-in for the
    installed `fairlane` executable and the shell."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for path in (EXEC, "/bin/sh"):
        exe = root / path.lstrip("/")
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, root / "etc/systemd/system" / name)
    for name in TLS_UNITS:
        drop_ins = root / "etc/systemd/system" / f"{name}.d"
        drop_ins.mkdir()
        shutil.copy(SYSTEMD / TLS_DROP_IN, drop_ins / "tls.conf")
    return root


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert sorted(
        p.name for p in SYSTEMD.glob("fairlane*.*") if p.suffix not in (".env", ".conf")
    ) == sorted(UNITS)
    root = verify_root(tmp_path)
    out = run(
        [tool("systemd-analyze"), "verify", "--man=no", f"--root={root}", *UNITS.values()],
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", "systemd-analyze verify printed warnings"


def test_systemd_analyze_catches_mistakes(tmp_path: Path) -> None:
    root = verify_root(tmp_path)
    broken = root / "etc/systemd/system/fairlane-auth.service"
    broken.write_text(broken.read_text().replace("ProtectSystem=", "ProtectSytem="))
    out = run(
        [tool("systemd-analyze"), "verify", "--man=no", f"--root={root}", "fairlane-auth.service"],
        check=False,
    )
    assert "ProtectSytem" in out.stderr


def test_systemd_analyze_reads_the_tls_drop_in(tmp_path: Path) -> None:
    root = verify_root(tmp_path)
    drop_in = root / "etc/systemd/system/fairlane-queue@.service.d/tls.conf"
    drop_in.write_text(drop_in.read_text().replace("LoadCredential=", "LoadCredentail=", 1))
    out = run(
        [tool("systemd-analyze"), "verify", "--man=no", f"--root={root}", UNITS[TLS_UNITS[1]]],
        check=False,
    )
    assert "LoadCredentail" in out.stderr


def test_tls_drop_in_hands_the_services_their_files() -> None:
    """A transient user (DynamicUser) cannot read a root-only key: systemd loads the files
    as root and the settings name its copies (%d, which EnvironmentFile= does not expand)."""
    service = parse_unit((SYSTEMD / TLS_DROP_IN).read_text())["Service"]
    credentials = dict(c.split(":", 1) for c in service["LoadCredential"])
    assert credentials == {
        "tls.crt": "/etc/fairlane/tls/tls.crt",
        "tls.key": "/etc/fairlane/tls/tls.key",
        "ca.crt": "/etc/fairlane/tls/ca.crt",
    }
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert env == {
        "FAIRLANE_TLS_CERT_FILE": "%d/tls.crt",
        "FAIRLANE_TLS_KEY_FILE": "%d/tls.key",
        "FAIRLANE_TLS_CA_FILE": "%d/ca.crt",
        "FAIRLANE_TLS_CLIENT_CA_FILE": "%d/ca.crt",
    }
    assert set(env) <= set(settings_defaults())
    # fairlane.env (an EnvironmentFile, which wins over Environment=) must not set them.
    assert not {k for k in env_file("fairlane.env") if k.startswith("FAIRLANE_TLS_")}
    text = (SYSTEMD / TLS_DROP_IN).read_text()
    for name in TLS_UNITS:
        assert f"/etc/systemd/system/{name}.d/tls.conf" in text


@pytest.mark.parametrize("name", [n for n in UNITS if n.endswith(".service")])
def test_units_are_hardened(name: str) -> None:
    sections = unit(name)
    service = {key: values[-1] for key, values in sections["Service"].items()}
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{name}: {key}"
    assert sections["Service"]["EnvironmentFile"][0] == "/etc/fairlane/fairlane.env"
    assert sections["Install"]["WantedBy"] == ["fairlane.target"]
    if name == "fairlane-migrate.service":
        assert service["Type"] == "oneshot"
        # Retried within its one start, so the services' start jobs wait for it (a
        # failed start would fail theirs for good).
        assert service["ExecStart"] == (
            f"/bin/sh -c 'until {EXEC} migrate; do echo \"fairlane migrate failed, trying "
            "again in 5 s\" >&2; sleep 5; done'"
        )
        assert "Restart" not in service
        assert int(service["TimeoutStartSec"].removesuffix("min")) >= 5
    else:
        role = name.split("-", 1)[1].split("@", maxsplit=1)[0].split(".", maxsplit=1)[0]
        assert service["ExecStart"] == f"{EXEC} serve {role}"
        assert service["Restart"] == "on-failure"
        # A cold boot: PostgreSQL or RabbitMQ may take minutes; never stop restarting.
        assert sections["Unit"]["StartLimitIntervalSec"] == ["0"]
        assert "StartLimitBurst" not in sections["Unit"]
        assert int(service["RestartSec"].rstrip("s")) >= 5
        assert service["RestartPreventExitStatus"] == "2", "startup_refused: settings"
        assert service["KillSignal"] == "SIGTERM"
        assert int(service["TimeoutStopSec"].rstrip("s")) > 20, "beyond FAIRLANE_GRACE_SECONDS"
        assert sections["Unit"]["Requires"] == ["fairlane-migrate.service"]
        assert "fairlane-migrate.service" in sections["Unit"]["After"][0].split()
    if "@" in name:
        # Each replica has its own identity and may override ports in its own env file.
        role = name.split("-", 1)[1].split("@", maxsplit=1)[0]
        assert f"FAIRLANE_INSTANCE_ID=%H-{role}-%i" in sections["Service"]["Environment"]
        assert sections["Service"]["EnvironmentFile"][1] == f"-/etc/fairlane/{role}-%i.env"


def env_file(name: str) -> dict[str, str]:
    out = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_env_files_use_real_settings() -> None:
    known = set(settings_defaults())
    for path in SYSTEMD.glob("*.env"):
        for key in env_file(path.name):
            assert key in known or key.startswith("OTEL_"), f"{path.name}: {key}"
    # The second queue replica is where deploy/nginx/nginx.conf expects it.
    queue2 = env_file("queue-2.env")["FAIRLANE_QUEUE_LISTEN"]
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert f"server {queue2} " in nginx
    assert f"server {env_file('fairlane.env')['FAIRLANE_QUEUE_LISTEN']} " in nginx


def test_env_files_name_files_that_exist() -> None:
    for path in SYSTEMD.glob("*.env"):
        for named in re.findall(r"\bdeploy/[\w./@-]*\w", path.read_text()):
            assert (REPO / named).exists(), f"{path.name} names {named}"


# --- supervisord ---------------------------------------------------------------------


def test_supervisord_config_parses(tmp_path: Path) -> None:
    """supervisord's own option parser reads the file (with FAIRLANE_RUN_DIR set)."""
    code = """if True:
        import json, sys
        from supervisor.options import ServerOptions
        o = ServerOptions()
        o.realize(args=["-c", sys.argv[1]])
        print(json.dumps({
            "socket": o.server_configs[0]["file"],
            "logfile": o.logfile,
            "groups": {g.name: sorted(p.name for p in g.process_configs)
                       for g in o.process_group_configs},
            "programs": {p.name: {
                "command": p.command, "stopsignal": int(p.stopsignal),
                "stopwaitsecs": p.stopwaitsecs, "stopasgroup": p.stopasgroup,
                "killasgroup": p.killasgroup, "autorestart": bool(p.autorestart),
                "stdout": p.stdout_logfile, "startretries": p.startretries,
                "backoff_total": sum(range(1, p.startretries + 1)),
            } for g in o.process_group_configs for p in g.process_configs},
        }))
    """
    env = dict(os.environ, FAIRLANE_RUN_DIR=str(tmp_path))
    out = run([sys.executable, "-c", code, str(SUPERVISOR)], env=env)
    cfg = json.loads(out.stdout)
    assert cfg["socket"] == f"{tmp_path}/supervisor.sock"
    assert cfg["logfile"] == f"{tmp_path}/supervisord.log"
    assert cfg["groups"] == {"fairlane": ["auth", "queue", "worker"]}
    for name, prog in cfg["programs"].items():
        assert prog["command"] == f"fairlane serve {name}"
        assert prog["stopsignal"] == signal.SIGTERM  # graceful stop
        assert prog["stopwaitsecs"] > 20, "beyond FAIRLANE_GRACE_SECONDS"
        assert prog["stopasgroup"], "SIGTERM reaches the whole process group"
        assert prog["killasgroup"]
        assert prog["autorestart"]
        assert prog["stdout"] == f"{tmp_path}/{name}.log"
        # supervisord waits 1 s, 2 s, ... between quick exits: minutes in all, for a
        # database or broker that starts after it.
        assert prog["backoff_total"] >= 300, "FATAL before PostgreSQL/RabbitMQ are up"


def test_supervisord_procedure_loads_every_settings_file() -> None:
    """The service secret is in secret.env (the systemd layout's): without it every
    program exits with startup_refused and ends FATAL."""
    units = "".join((SYSTEMD / name).read_text() for name in UNITS)
    files = set(re.findall(r"^EnvironmentFile=(/etc/fairlane/\w+\.env)$", units, re.M))
    assert files == {"/etc/fairlane/fairlane.env", "/etc/fairlane/secret.env"}
    doc = (REPO / "docs" / "deploy.md").read_text()
    procedure = doc.split("\n## supervisord\n", 1)[1].split("\n## ", 1)[0]
    header = SUPERVISOR.read_text().split("[unix_http_server]", 1)[0]
    for text in (procedure, header):
        sourced = re.search(r"set -a; (.*); set \+a", text)
        assert sourced, "no `set -a; . FILE; set +a` line"
        assert set(re.findall(r"\. (/etc/fairlane/\S+\.env)", sourced.group(1))) == files


def test_supervisord_config_needs_run_dir() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FAIRLANE_RUN_DIR"}
    out = run([tool("supervisord"), "-c", str(SUPERVISOR), "-n"], env=env, check=False, timeout=30)
    assert out.returncode != 0
    assert "FAIRLANE_RUN_DIR" in out.stdout + out.stderr
