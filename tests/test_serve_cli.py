"""`pidray serve` start-up refusals (issue 10, findings 13-14): one clear line, no Ray started, no traceback."""

import socket
import subprocess
import sys

import pytest

from conftest import ROOT


def _serve(*args, env=None):
    import os

    env = {k: v for k, v in (env or os.environ).items() if k != "PIDRAY_API_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "pidray.cli", "serve", *args], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=60)  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    return out


def test_f14_taken_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _serve("--port", str(port))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"pidray serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another port with --port"
    )


def test_f14_token_never_on_the_command_line(tmp_path):
    out = _serve("--token", "s3cret")
    assert out.returncode == 2 and "--token-file" in out.stderr and "s3cret" not in out.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = _serve("--token-file", str(empty))
    assert out.returncode == 2 and "is empty" in out.stderr


def test_f13_warns_without_a_token_beyond_loopback():
    with socket.socket() as s:  # a taken port ends the command right after the warning
        s.bind(("0.0.0.0", 0))
        s.listen()
        out = _serve("--host", "0.0.0.0", "--port", str(s.getsockname()[1]))
    assert out.returncode == 2
    assert "warning: no API token and listening on 0.0.0.0" in out.stderr


def test_read_token_from_file_or_env(tmp_path, monkeypatch):
    from serve.run import is_loopback, read_token

    (tmp_path / "t").write_text("abc\nignored\n")
    assert read_token(str(tmp_path / "t")) == "abc"
    monkeypatch.setenv("PIDRAY_API_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "10.0.0.1")] == [
        True, True, True, False, False]  # fmt: skip


@pytest.mark.parametrize("manifest", ["rayservice.yaml"])
def test_f13_rayservice_never_starts_token_less(manifest):
    import yaml

    svc = yaml.safe_load((ROOT / "k8s" / "base" / manifest).read_text())
    spec = svc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0].get("env", [])}
        ref = env["PIDRAY_API_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref.get("optional", False) is False, "a missing secret must stop the pod, not start it token-less"
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["require_token"] is True


def test_endpoint_arguments_are_a_typed_model():
    """Issue 11: the Serve app's arguments are validated once, by a typed model (config.yaml's and RayService's too)."""
    import yaml

    from serve.app import AppArgs, build_app

    with pytest.raises(ValueError, match="bogus"):
        build_app({"bogus": 1})
    with pytest.raises(ValueError, match="max_in_flight"):
        build_app({"max_in_flight": "many"})
    with pytest.raises(ValueError, match="unknown option"):
        build_app({"options": {"colour": "red"}, "gpu": False})
    conf = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    svc = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
    for args in (
        conf["applications"][0]["args"],
        yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"],
    ):
        assert AppArgs.model_validate(args).model_options().preset == args["preset"]
    assert AppArgs(kernels="torch").model_options().kernels == "torch"  # no longer dropped
