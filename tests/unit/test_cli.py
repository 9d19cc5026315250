"""The ``edgefleet`` command as a user runs it: real processes, files, exit codes and output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from shared.cli.main import app

CLI = [sys.executable, "-m", "shared.cli.main"]


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def user_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert the convention for user errors and return the one line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def all_command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = [[]]
    for name, group in root.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(group, "commands", {})]
    return paths


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "edgefleet")
def test_every_command_has_help(path):
    proc = run(*path, "--help")
    assert "Usage:" in proc.stdout


def test_release_flow_from_the_command_line(tmp_path, model_dir):
    keys, bundle = tmp_path / "keys", tmp_path / "tiny.bundle"
    run("keys", "init", keys)
    assert (keys / "root.json").is_file()
    built = run("bundle", "build", model_dir, "--version", "1.0.0", "--out", bundle)
    assert "built" in built.stdout
    unsigned = json.loads(run("bundle", "inspect", bundle, "--json").stdout)
    assert unsigned["signed"] is False
    assert [f["path"] for f in unsigned["files"]][:2] == ["labels.txt", "onnx/model.onnx"]

    run("bundle", "sign", bundle, "--keys", keys, "--expires", "12h", "--hardware-id", "rpi5")
    verified = run("bundle", "verify", bundle, "--trust", keys / "root.json")
    assert "verified tiny 1.0.0" in verified.stdout
    summary = json.loads(
        run("bundle", "verify", bundle, "--trust", keys / "root.json", "--json").stdout
    )
    assert summary["verified"] is True
    assert summary["release"]["counter"] == 1
    assert summary["release"]["hardware_ids"] == ["rpi5"]

    line = user_error(
        run(
            "bundle",
            "verify",
            bundle,
            "--trust",
            keys / "root.json",
            "--hardware-id",
            "jetson",
            ok=False,
        )
    )
    assert "released for hardware ['rpi5'], not 'jetson'" in line


def test_verify_names_the_failed_check_in_one_line(tmp_path, signed_bundle, keystore):
    data = bytearray(signed_bundle.read_bytes())
    data[-1024 - 512] ^= 0xFF  # first byte of the last payload file (vectors/y.npy)
    signed_bundle.write_bytes(bytes(data))
    line = user_error(
        run("bundle", "verify", signed_bundle, "--trust", keystore.path / "root.json", ok=False)
    )
    assert "sha256 mismatch (expected" in line


def test_verify_with_someone_elses_trust_root_fails(tmp_path, signed_bundle):
    run("keys", "init", tmp_path / "other")
    line = user_error(
        run(
            "bundle", "verify", signed_bundle, "--trust", tmp_path / "other" / "root.json", ok=False
        )
    )
    assert "signed by 0/" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bundle", "verify", "missing.bundle", "--trust", "root.json"], "root.json: cannot read"),
        (["bundle", "inspect", "missing.bundle"], "missing.bundle: cannot open"),
        (["bundle", "sign", "b", "--keys", ".", "--expires", "soon"], "duration must be"),
        (["bundle", "build", ".", "--version", "1", "--out", "x"], "no model.json"),
        (["keys", "show", "nowhere"], "no root.json here"),
        (["keys", "init", "k", "--root-keys", "1", "--root-threshold", "2"], "threshold must be"),
        (["keys", "rotate", "admin", "--keys", "."], "role must be one of"),
        (["models", "example", "out", "--size", "huge"], "--size must be one of"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert fragment in user_error(run(*args, ok=False))


def test_keys_init_refuses_to_overwrite(tmp_path):
    run("keys", "init", tmp_path / "k")
    before = (tmp_path / "k" / "root.json").read_bytes()
    assert "refusing to overwrite" in user_error(run("keys", "init", tmp_path / "k", ok=False))
    assert (tmp_path / "k" / "root.json").read_bytes() == before


def test_keys_rotate_and_show(tmp_path):
    run("keys", "init", tmp_path / "k")
    run("keys", "rotate", "timestamp", "--keys", tmp_path / "k")
    shown = json.loads(run("keys", "show", tmp_path / "k", "--json").stdout)
    assert shown["root_version"] == 2
    assert shown["roles"]["root"]["threshold"] == 2
    assert shown["roles"]["timestamp"]["private_keys_here"] == 1
