"""`auditui doctor` / `auditui inspect` run offline on tiny fixtures; errors are one line, exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from typer.testing import CliRunner

from auditui.cli import app

runner = CliRunner()


def test_inspect_json_reports_sites_and_coverage(tiny_models, tiny_packs):
    result = runner.invoke(app, ["inspect", "--model", str(tiny_models["gpt_neox"]),
                                 "--pack", str(tiny_packs["gpt_neox"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["family"] == "gpt_neox" and data["model"]["parallel_blocks"] is True
    assert data["model"]["n_layers"] == 3 and data["sites"]["resid_post"] == 64
    coverage = {row["layer"]: row for row in data["coverage"]}
    assert coverage[0]["resid_pre"] and coverage[2]["mlp_out"] and coverage[1]["resid_pre"] is None
    assert len(data["saes"]) == 10 and data["pack"]["name"] == "tiny"


def test_inspect_human_table(tiny_models, tiny_packs):
    result = runner.invoke(app, ["inspect", "--model", str(tiny_models["llama"]), "--pack", str(tiny_packs["llama"])])
    assert result.exit_code == 0, result.output
    assert "llama" in result.stdout and "resid_post" in result.stdout and "topk/128" in result.stdout


def test_doctor_json_finds_model_and_pack(tiny_models, tiny_packs):
    result = runner.invoke(app, ["doctor", "--model", str(tiny_models["gpt2"]), "--pack", str(tiny_packs["gpt2"]),
                                 "--load", "--json"])
    assert result.exit_code == 0, result.output
    checks = {row["check"]: row for row in json.loads(result.stdout)}
    assert checks["model"]["ok"] and checks["pack"]["ok"] and checks["load"]["ok"]
    assert "3 layers, 10 SAEs" in checks["load"]["detail"]


def test_doctor_says_how_to_fix_a_missing_pack(tiny_models):
    result = runner.invoke(app, ["doctor", "--model", str(tiny_models["gpt2"]), "--pack", "demo", "--json"])
    checks = {row["check"]: row for row in json.loads(result.stdout)}
    assert not checks["pack"]["ok"] and "auditui pack build demo" in checks["pack"]["fix"]


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_models, tiny_packs):
    cases = [
        ["inspect", "--model", str(tmp_path / "nope"), "--pack", ""],
        ["inspect", "--model", str(tiny_models["gpt2"]), "--pack", str(tmp_path)],
        ["inspect", "--model", str(tiny_models["gpt2"]), "--pack", str(tiny_packs["llama"]), "--device", "cuda:7"],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if not line.startswith("...")]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_real_entry_point_error_has_no_traceback(tmp_path):
    """The installed entry point itself: one line on stderr, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "auditui", "inspect", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: model directory not found: {tmp_path / 'nope'}"


def test_every_command_has_help():
    for args in ([], ["doctor"], ["inspect"], ["session"], ["sample"], ["label"], ["report"], ["attribute"],
                 ["flow"], ["flow", "deactivate"], ["pack"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.stdout, (args, result.output)


INTERRUPTIBLE = """
import sys, time, typer
from auditui.cli import AuditGroup

app = typer.Typer(cls=AuditGroup)

@app.command()
def wait() -> None:
    print("ready", flush=True)
    while True:  # not signal.pause(): a SIGINT just before it would leave it waiting forever
        time.sleep(0.05)

@app.command()
def eof() -> None:
    raise EOFError  # what typer turns into Abort (e.g. Ctrl-D at a prompt)

app(sys.argv[1:])
"""


def test_ctrl_c_and_abort_print_interrupted_and_exit_130(tmp_path):
    script = tmp_path / "interruptible.py"
    script.write_text(INTERRUPTIBLE)
    proc = subprocess.Popen([sys.executable, str(script), "wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)  # a real Ctrl-C while the command runs
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stderr == "interrupted\n", stderr
    proc = subprocess.run([sys.executable, str(script), "eof"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted", proc.stderr


def test_doctor_names_each_package_that_differs_from_the_lock(tmp_path):
    from importlib import metadata

    from auditui.cli.setup import doctor_checks
    from auditui.config import Settings

    lock = tmp_path / "lock.txt"
    torch_version = metadata.version("torch")  # e.g. 2.13.0+cpu: the lock pins 2.13.0
    lock.write_text(f"# comment\ntorch=={torch_version.split('+')[0]}\ntyper==0.0.1\nno-such-package==1.0\n")
    checks = {c["check"]: c for c in doctor_checks(Settings(pack=""), load=False, lock=lock)}
    assert "lock torch" not in checks
    assert checks["lock typer"]["detail"] == f"installed {metadata.version('typer')}, locked 0.0.1"
    assert checks["lock no-such-package"]["detail"] == "installed nothing, locked 1.0"
    assert not checks["lock typer"]["ok"] and "setup.sh" in checks["lock typer"]["fix"]
    lock.write_text(f"typer=={metadata.version('typer')}\n")
    checks = {c["check"]: c for c in doctor_checks(Settings(pack=""), load=False, lock=lock)}
    assert checks["lock"]["ok"] and [c for c in checks if c.startswith("lock")] == ["lock"]
