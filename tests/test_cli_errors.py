"""Bad input to every `mindskip` command, through the real entry point (`python -m mindskip_kernels` in a
subprocess): exit code 2, one line `mindskip <command>: error: ...` on stderr naming the argument, no traceback,
no half-written output, the routers read left unchanged; a traceback only for a bug or with --debug."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import mindskip_kernels as mk
from tests.models import ROOT, TEXT, randomize_routers

ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def mindskip(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m mindskip_kernels ARGS`; `block` makes those modules unimportable (a missing optional
    dependency), through the same `main` the entry point calls."""
    if block:
        code = (f"import sys\nfor m in {list(block)!r}: sys.modules[m] = None\n"
                "from mindskip_kernels.cli import main\nsys.exit(main(sys.argv[1:]))")
        command = [sys.executable, "-c", code, *args]
    else:
        command = [sys.executable, "-m", "mindskip_kernels", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)


def assert_usage_error(proc: subprocess.CompletedProcess, command: str, *fragments: str,
                       only_line: bool = True) -> str:
    """Exit 2, no traceback, the error as stderr's last line (its only line when the input is checked before
    the model loads), mentioning every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    if only_line:
        assert len(lines) == 1, proc.stderr
    assert lines[-1].startswith(f"mindskip {command}: error: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def tree(path) -> dict[str, str]:
    """{relative file: sha256} of a directory (what a failed command must leave as it was)."""
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture
def setup(tmp_path, saved_model):
    """(model dir, routers dir, held-out text file) in tmp_path."""
    model, _ = mk.integrations.hf.load_model(saved_model)
    mk.apply_mindskip(model, layers=[1, 2])
    randomize_routers(model)
    mk.save_routers(model, tmp_path / "routers")
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    return str(saved_model), str(tmp_path / "routers"), str(held)


def no_partial(parent) -> None:
    assert not [n for n in os.listdir(parent) if n.endswith(".partial")], os.listdir(parent)


class TestInputFiles:
    def test_missing_routers_folder(self, setup, tmp_path):
        model, _, held = setup
        for command in (["eval"], ["calibrate", "--keep", "0.5", "--out", str(tmp_path / "o")],
                        ["export-layers", "--n", "1", "--out", str(tmp_path / "o.json")]):
            proc = mindskip(*command, "--model", model, "--routers", str(tmp_path / "nope"), "--data", held)
            assert_usage_error(proc, command[0], f"--routers {tmp_path / 'nope'} does not exist")
        assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.json")

    @pytest.mark.parametrize("content, fragment", [(None, "does not exist"), (b"", "holds no examples"),
                                                   (b"ok\n\xff\xfe", "not UTF-8"), ("dir", "is a directory")])
    def test_bad_data_file(self, setup, tmp_path, content, fragment):
        model, routers, _ = setup
        data = tmp_path / "data.txt"
        if content == "dir":
            data.mkdir()
        elif content is not None:
            data.write_bytes(content)
        before = tree(routers)
        for command in (["tune", "--steps", "1", "--out", str(tmp_path / "o")],
                        ["eval", "--routers", routers]):
            proc = mindskip(*command, "--model", model, "--data", str(data))
            assert_usage_error(proc, command[0], "--data", str(data), fragment)
        assert not os.path.exists(tmp_path / "o") and tree(routers) == before
        no_partial(tmp_path)

    def test_malformed_drop_layers_json_names_the_file(self, setup, tmp_path):
        model, _, held = setup
        for name, text in (("broken", '{"target": "attention", "drop": [1'), ("shape", '{"drop": [1]}')):
            spec = tmp_path / f"{name}.json"
            spec.write_text(text)
            proc = mindskip("eval", "--model", model, "--drop-layers", str(spec), "--data", held)
            assert_usage_error(proc, "eval", f"--drop-layers {spec}", "not valid JSON" if name == "broken"
                               else "expected the JSON of `mindskip export-layers`")

    def test_malformed_routers_metadata_names_the_file(self, setup, tmp_path):
        model, routers, held = setup
        (tmp_path / "routers" / "mindskip.json").write_text("{")
        before = tree(routers)
        proc = mindskip("eval", "--model", model, "--routers", routers, "--data", held)
        assert_usage_error(proc, "eval", f"--routers {routers}: mindskip.json is not valid JSON", only_line=False)
        assert tree(routers) == before


class TestOutputs:
    def test_out_of_the_wrong_kind(self, setup, tmp_path):
        model, routers, held = setup
        afile = tmp_path / "afile"
        afile.write_text("keep me")
        for command in (["tune", "--steps", "1"], ["calibrate", "--routers", routers, "--keep", "0.5"]):
            proc = mindskip(*command, "--model", model, "--data", held, "--out", str(afile))
            assert_usage_error(proc, command[0], f"--out {afile} is an existing file")
        for command in (["export-layers", "--routers", routers, "--n", "1"], ["eval", "--routers", routers]):
            proc = mindskip(*command, "--model", model, "--data", held, "--out", str(tmp_path))
            assert_usage_error(proc, command[0], f"--out {tmp_path} is a directory")
        assert afile.read_text() == "keep me"

    def test_a_failure_while_writing_leaves_no_output_folder(self, setup, tmp_path):
        """tune fails after the routers are written (matplotlib, for the training curve, is missing): neither a
        new --out nor an existing one (here: a copy of other routers) is touched."""
        model, routers, held = setup
        existing = tmp_path / "existing"
        shutil.copytree(routers, existing)
        before = tree(existing)
        for out in (tmp_path / "new", existing):
            proc = mindskip("tune", "--model", model, "--data", held, "--method", "tune", "--steps", "1",
                            "--layers", "2", "--max-length", "32", "--out", str(out), block=("matplotlib",))
            assert_usage_error(proc, "tune", "matplotlib", only_line=False)
        assert not os.path.exists(tmp_path / "new") and tree(existing) == before
        no_partial(tmp_path)

    def test_calibrate_in_place_that_fails_keeps_the_routers(self, setup):
        model, routers, held = setup
        before = tree(routers)
        proc = mindskip("calibrate", "--model", model, "--routers", routers, "--data", held, "--keep", "0.5",
                        "--max-length", "1", "--out", routers)  # fails after the model and routers load
        assert_usage_error(proc, "calibrate", "max_length must be at least 2", only_line=False)
        assert tree(routers) == before
        no_partial(os.path.dirname(routers))


class TestTasks:
    def test_unknown_task_and_missing_include_path(self, setup, tmp_path):
        model, routers, held = setup
        base = ("eval", "--model", model, "--routers", routers, "--data", held)
        assert_usage_error(mindskip(*base, "--tasks", "stdlib_cloze,no_such_task"), "eval",
                           "--tasks: unknown task(s) no_such_task", "stdlib_continuation")
        assert_usage_error(mindskip(*base, "--tasks", "stdlib_cloze", "--include-path", str(tmp_path / "none")),
                           "eval", f"--include-path {tmp_path / 'none'} is not a directory")
        assert_usage_error(mindskip(*base, "--limit", "3"), "eval", "--limit set the --tasks run")

    def test_missing_harness_names_the_extra(self, setup):
        model, routers, held = setup
        proc = mindskip("eval", "--model", model, "--routers", routers, "--data", held, "--tasks", "stdlib_cloze",
                        block=("lm_eval",))
        assert_usage_error(proc, "eval", 'pip install "mindskip_kernels[eval]"')


class TestTracebacks:
    def test_debug_shows_the_traceback(self, setup, tmp_path):
        model, _, held = setup
        proc = mindskip("eval", "--model", model, "--routers", str(tmp_path / "nope"), "--data", held, "--debug")
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr

    def test_a_bug_is_a_traceback(self):
        code = ("import sys, mindskip_kernels.cli as cli\n"
                "def bug(args): raise RuntimeError('a bug')\n"
                "cli._info = bug\nsys.exit(cli.main(['info']))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
        assert "mindskip info: error" not in proc.stderr


def test_eval_json_report_is_written_whole(setup, tmp_path):
    model, routers, held = setup
    out = tmp_path / "report.json"
    proc = mindskip("eval", "--model", model, "--routers", routers, "--data", held, "--max-length", "32",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["held_out"]) == {"dense", "mindskip"} and "kl" in report["held_out"]["mindskip"]
    no_partial(tmp_path)
