"""The command line: the smoke command, config validation, and exit 2 on bad input."""

import os
import subprocess
import sys

import pytest

from ntk_tickets.cli import main


def test_info_computes_an_analytic_ntk_end_to_end(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "neural-tangents: 0.6.5" in out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.7  # kernel regression on 100 digits; chance is 0.1


def test_config_prints_the_resolved_config_and_hash(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text("[train]\nsteps = 5\n")
    assert main(["config", str(path), "--set", "model.widths=[4]"]) == 0
    out = capsys.readouterr().out
    assert '"steps": 5' in out and "config hash: " in out


@pytest.mark.parametrize("args, fragment", [
    (["config", "missing.toml"], "missing.toml' does not exist"),
    (["config", "{toml}", "--set", "train.steps=x"], "train.steps must be an integer"),
    (["config", "{toml}", "--set", "bogus.key=1"], "unknown config key 'bogus'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, fragment):
    path = tmp_path / "s.toml"
    path.write_text("name = 'x'\n")
    assert main([a.format(toml=path) for a in args]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "ntk_tickets", "config", "nowhere.toml"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("ntk-tickets: error: config file 'nowhere.toml'")


def test_list_shows_every_preset_with_its_runtime(capsys):
    from ntk_tickets import resolve_config
    from ntk_tickets.preset_files import preset_names, preset_runtime

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(preset_names()) >= 7
    for name, line in zip(preset_names(), lines, strict=True):
        resolve_config(name)  # every preset is a valid config
        assert line.startswith(name) and preset_runtime(name).startswith("about ")
        assert line.endswith(f"[{preset_runtime(name)} on 2 CPU cores]")


def test_a_reader_that_stops_early_gets_no_traceback():
    # `ntk-tickets list | head -1`: the pipe closes after the first line.
    out = subprocess.run(f"{sys.executable} -m ntk_tickets list | head -c 10", shell=True,
                         capture_output=True, text=True)
    assert len(out.stdout) == 10
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


@pytest.mark.parametrize("args", [["--help"], ["list"], ["config", "nowhere.toml"],
                                  ["run", "demo", "--set", "train.steps=x"]])
def test_help_list_config_and_bad_input_import_neither_jax_nor_pandas(args):
    """DESIGN.md §6: the CLI imports lazily (a fresh interpreter, so nothing is cached)."""
    code = (f"import sys\nfrom ntk_tickets.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('jax', 'pandas', 'neural_tangents') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


def test_a_run_keeps_its_compiled_programs_for_the_next(tmp_path):
    """`run` points JAX's persistent cache at NTK_TICKETS_XLA_CACHE: a second run of the
    same study loads programs from it (files appear after the first run, none are added by
    the second), and `off` keeps nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    run = [sys.executable, "-m", "ntk_tickets", "run", "demo", "--force",
           "--set", "model.widths=[16]", "--set", "train.steps=3",
           "--set", "train.seeds=[0]", "--set", "paths=['exact']"]
    cache = tmp_path / "xla"
    for attempt in range(2):
        done = subprocess.run([*run, "--out", str(tmp_path / "r")], capture_output=True,
                              text=True, env={**env, "NTK_TICKETS_XLA_CACHE": str(cache)})
        assert done.returncode == 0, done.stderr
        entries = sorted(p.name for p in cache.iterdir())
        if attempt == 0:
            first = entries
            assert first
    assert entries == first
    done = subprocess.run([*run, "--out", str(tmp_path / "r2")], capture_output=True,
                          text=True, env={**env, "NTK_TICKETS_XLA_CACHE": "off",
                                          "HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "home").exists()
