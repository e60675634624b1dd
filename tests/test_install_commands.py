"""The README's two commands: what `.ci/run` runs, and that they install under PEP 668.

The commands install uv with `pip install --target .uv` (a project-local folder), which pip
allows even where the interpreter is "externally managed" (PEP 668: Debian 12, Ubuntu 24.04),
so they work with a distribution's `python3` without modifying it.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _readme_commands():
    """The one-line commands of the fenced bash blocks in the README's "Two commands" section."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Two commands.*?$(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Two commands' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", match.group(1), re.MULTILINE | re.DOTALL)
    commands = [block.strip() for block in blocks]
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each command must be a single line"
    return commands


def _test_command():
    (command,) = [c for c in _readme_commands() if c.endswith(" pytest")]
    return command


def test_ci_runs_the_readme_test_command_verbatim():
    demo, tests = _readme_commands()
    assert demo.endswith(" ntk-tickets demo")
    assert tests == _test_command()
    # Both commands install uv the same way and run it the same way.
    assert demo.removesuffix(" ntk-tickets demo") == tests.removesuffix(" pytest")
    # uv goes into the checkout's .uv/, never into the interpreter that runs pip.
    assert "pip install -q --target .uv uv" in tests
    assert " .uv/bin/uv run --frozen " in tests

    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    code = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    # The only line that installs or runs anything with uv is the README's, verbatim.
    assert [line for line in code if "pip install" in line or "uv run" in line] == [tests]
    # The exit status of pytest (5: nothing collected) is still checked right after it.
    assert code[code.index(tests) + 1] == "status=$?"


def _externally_managed(python: Path) -> bool:
    probe = (
        "import os, sys, sysconfig; "
        "print(sys.prefix == sys.base_prefix and "
        "os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "True"


def _find_uv(python: Path, env, cwd) -> str:
    code = "import importlib.util as u; print(u.find_spec('uv'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          env=env, cwd=cwd).stdout.strip()


def test_install_step_works_with_an_externally_managed_system_python(tmp_path):
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} does not exist on this machine")
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    if not _externally_managed(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is not externally managed (no PEP 668 marker)")
    has_pip = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "--version"], capture_output=True)
    if has_pip.returncode:
        pytest.skip(f"{SYSTEM_PYTHON} has no pip")

    # `python3` on PATH is the system interpreter, as on a stock Debian/Ubuntu machine.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(SYSTEM_PYTHON)
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_TARGET", "PIP_USER"}}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    checkout = tmp_path / "checkout"
    checkout.mkdir()

    def bash(command):
        return subprocess.run(["bash", "-c", command], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=300)

    # The premise: this pip refuses a plain install into the system interpreter (PEP 668).
    # --dry-run, so that nothing could be installed even if it did not refuse.
    refused = bash("python3 -m pip install --dry-run -q uv")
    if refused.returncode == 0 or "externally-managed-environment" not in refused.stderr:
        pytest.skip(f"this pip does not enforce PEP 668: {refused.stderr.strip()[-300:]}")

    uv_before = _find_uv(SYSTEM_PYTHON, env, tmp_path)

    # The install part of the README's command (before `&&`), run verbatim.
    install, run = _test_command().split(" && ")
    assert run.startswith(".uv/bin/uv ")
    first = bash(install)
    assert first.returncode == 0, first.stderr
    assert "externally-managed-environment" not in first.stderr
    version = bash(".uv/bin/uv --version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("uv "), version.stdout

    # A second run finds .uv/bin/uv and does not call pip at all (quiet, offline).
    second = bash(install)
    assert second.returncode == 0, second.stderr
    assert second.stdout == second.stderr == ""

    # Nothing went into the system interpreter: it finds the same uv (normally none) as before.
    assert _find_uv(SYSTEM_PYTHON, env, tmp_path) == uv_before


def test_the_accelerator_extras_are_locked_with_the_cpu_jaxlib():
    """`--extra cuda12` and `--extra tpu` resolve from the lock: the lock holds the CUDA
    plugin and libtpu under those extras, the CUDA plugin at the locked jaxlib's version
    (a plugin of another version refuses to load), and `uv lock --check` finds the lock in
    step with pyproject.toml."""
    import tomllib

    lock = tomllib.loads((ROOT / "uv.lock").read_text())

    def versions(name):
        return {p["version"] for p in lock["package"] if p["name"] == name}

    for jax in (p for p in lock["package"] if p["name"] == "jax"):
        extras = jax.get("optional-dependencies", {})
        assert {"cuda12", "tpu"} <= set(extras), sorted(extras)
        plugin = {d["version"] for d in extras["cuda12"] if d["name"] == "jax-cuda12-plugin"}
        assert plugin == {jax["version"]} and jax["version"] in versions("jaxlib")
        assert "libtpu" in {d["name"] for d in extras["tpu"]}
    (project,) = [p for p in lock["package"] if p["name"] == "ntk-tickets"]
    assert set(project["optional-dependencies"]) == {"cuda12", "tpu", "explore"}
    uv = ROOT / ".uv" / "bin" / "uv"
    if not uv.exists():
        pytest.skip("uv is installed by the README's test command (.uv/bin/uv)")
    check = subprocess.run([str(uv), "lock", "--check", "--offline"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_float64_on_a_tpu_is_warned_about():
    from ntk_tickets.study import x64_note

    assert "emulated" in x64_note(True, "tpu") and "\n" not in x64_note(True, "tpu")
    assert x64_note(False, "tpu") == x64_note(True, "cpu") == x64_note(True, "gpu") == ""
