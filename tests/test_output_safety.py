"""Issue 12 classes 4 and 8: the input is never destroyed, the output never mixed, and exit codes tell the truth.

Each hostile setup is built in code. A refused command must exit 2 with exactly one ``qcompile: error:`` line on
stderr, free of control characters, leave the input's bytes unchanged and the watched folders as they were (no
output, no temporary). Saves that run must leave one consistent model/data pair and no temporary, also when two
saves race, a save is killed between its renames, the disk fills up, or SIGTERM/SIGINT arrives.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler import io, io_write

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TEMP = re.compile(r"\.qcompile-[0-9a-f]{8}\.[0-9a-f]{12}\.tmp")
FEEDS = {"x": np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)}


# -- helpers --------------------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _temps(folder: Path) -> list[str]:
    return [n for n in _listing(folder) if _TEMP.fullmatch(n)]


def _expect_refused(args: list[str], watched: list[Path], folders: list[Path], capfd: pytest.CaptureFixture[str],
                    needle: str) -> str:
    """Run ``main(args)``: exit 2, one clean error line containing ``needle``, files and folders unchanged."""
    from qcompiler.cli import main

    hashes = {p: _sha(p) for p in watched if p.is_file()}
    listings = {f: _listing(f) for f in folders}
    code = main(args)
    captured = capfd.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), captured.err
    assert not _CONTROL.search(captured.err), repr(captured.err)
    assert captured.out == ""
    for path, digest in hashes.items():
        assert _sha(path) == digest, f"{path} was modified"
    for folder, listing in listings.items():
        assert _listing(folder) == listing, f"files left or removed in {folder}"
    assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _outputs(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, FEEDS)[0]


def _closest(path: Path, references: dict[str, np.ndarray]) -> str:
    """Which float model the compiled model at ``path`` computes (the quantization error is far below the gap)."""
    got = _outputs(path)
    errors = {name: float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) for name, ref in references.items()}
    best = min(errors, key=errors.get)
    assert errors[best] < 0.1 and all(e > 0.5 for n, e in errors.items() if n != best), errors
    return best


def _data_files(folder: Path, name: str) -> list[str]:
    return [n for n in _listing(folder) if re.fullmatch(re.escape(name) + r"\.[0-9a-f]{16}\.data", n)]


def _referenced(model: Path) -> set[str]:
    proto = onnx.load(model, load_external_data=False)
    return {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"}


@pytest.fixture
def env(tmp_path: Path, make_mlp, write_model) -> dict[str, Path]:
    """m/model.onnx with its weights in m/model.onnx.data, two float models a.onnx/b.onnx, and an output folder."""
    model = write_model(make_mlp(seed=0), tmp_path / "m", external=True)
    a = write_model(make_mlp(seed=1), tmp_path / "src", "a.onnx")
    b = write_model(make_mlp(seed=2), tmp_path / "src", "b.onnx")
    (tmp_path / "out").mkdir()
    return {"root": tmp_path, "m": model.parent, "model": model, "data": model.parent / "model.onnx.data",
            "a": a, "b": b, "out": tmp_path / "out", "o": tmp_path / "out" / "o.onnx"}


@pytest.fixture
def external_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every compiled model keep its initializers in an external-data file."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(io, "EXTERNAL_MIN_TENSOR_BYTES", 0)


# -- class 4: refused outputs -----------------------------------------------------------------------------------------
def _case(name: str, env: dict[str, Path]) -> tuple[list[str], list[Path], str]:
    """Build one hostile setup; return (qcompile arguments, folders that must not change, expected words)."""
    model, data, out, o = env["model"], env["data"], env["out"], env["o"]
    folders = [env["m"], out]
    if name == "output-hardlink-to-input-data":
        os.link(data, o)
        return [str(model), "-o", str(o)], folders, "external data"
    if name == "output-symlink-to-input-data":
        o.symlink_to(data)
        return [str(model), "-o", str(o)], folders, "external data"
    if name == "output-is-input-data":
        return [str(model), "-o", str(data)], folders, "external data"
    if name == "output-fifo":
        os.mkfifo(o)
        return [str(model), "-o", str(o)], folders, "FIFO"
    if name == "output-socket":
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(o))
        except OSError:
            pytest.skip("cannot bind a unix socket here")
        finally:
            sock.close()
        return [str(model), "-o", str(o)], folders, "socket"
    if name == "output-device":
        return [str(model), "-o", os.devnull], folders, "device"
    if name == "report-is-input":
        renamed = env["m"] / "model.md"
        model.rename(renamed)
        return [str(renamed), "-o", str(o), "--report", str(renamed)], folders, "is the input"
    if name == "report-is-input-data":
        link = out / "r.json"
        os.link(data, link)
        return [str(model), "-o", str(o), "--report", str(link)], folders, "external data"
    if name == "report-is-output":
        return [str(model), "-o", str(out / "o.md"), "--report", str(out / "o.md")], folders, "output model"
    if name == "report-fifo":
        os.mkfifo(out / "r.md")
        return [str(model), "-o", str(o), "--report", str(out / "r.md")], folders, "FIFO"
    if name == "report-folder":
        (out / "r.md").mkdir()
        return [str(model), "-o", str(o), "--report", str(out / "r.md")], folders, "folder"
    if name == "dump-dir-holds-input":
        return [str(model), "-o", str(o), "--dump-after", "all", "--dump-dir", str(env["m"])], folders, "holds"
    if name == "dump-dir-holds-input-data":
        (env["m"] / "w").mkdir()
        data.rename(env["m"] / "w" / "model.onnx.data")
        _relocate(model, "w/model.onnx.data")
        return ([str(model), "-o", str(o), "--dump-after", "all", "--dump-dir", str(env["m"] / "w")],
                [*folders, env["m"] / "w"], "holds")
    if name == "dump-dir-holds-hardlink-to-input":
        (out / "d").mkdir()
        os.link(model, out / "d" / "01-infer-shapes.onnx")
        return ([str(model), "-o", str(o), "--dump-after", "all", "--dump-dir", str(out / "d")],
                [*folders, out / "d"], "link to the input")
    if name == "dump-dir-is-a-file":
        (out / "d").write_bytes(b"x")
        return [str(model), "-o", str(o), "--dump-after", "all", "--dump-dir", str(out / "d")], folders, "not a folder"
    if name == "input-data-named-like-output-data":
        data.rename(env["m"] / "o.onnx.0123456789abcdef.data")
        _relocate(model, "o.onnx.0123456789abcdef.data")
        return [str(model), "-o", str(env["m"] / "o.onnx")], folders, "named like the output's data"
    raise AssertionError(name)


def _relocate(model: Path, location: str) -> None:
    proto = onnx.load(model, load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, model)


@pytest.mark.parametrize("case", [
    "output-hardlink-to-input-data", "output-symlink-to-input-data", "output-is-input-data", "output-fifo",
    "output-socket", "output-device", "report-is-input", "report-is-input-data", "report-is-output", "report-fifo",
    "report-folder", "dump-dir-holds-input", "dump-dir-holds-input-data", "dump-dir-holds-hardlink-to-input",
    "dump-dir-is-a-file", "input-data-named-like-output-data"])
def test_output_that_would_destroy_the_input_is_refused(env: dict[str, Path], capfd: pytest.CaptureFixture[str],
                                                        case: str) -> None:
    args, folders, needle = _case(case, env)
    inputs = [p for p in env["m"].rglob("*") if p.is_file()]
    _expect_refused(args, inputs, folders, capfd, needle)
    assert not (env["out"] / "o.onnx.dumps").exists()


def test_input_data_named_like_the_old_data_file_survives(env: dict[str, Path], external_output: None,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """The issue's case: an input whose data file is ``o.onnx.data`` beside ``-o o.onnx`` (it was overwritten)."""
    from qcompiler.cli import main

    data = env["m"] / "o.onnx.data"
    env["data"].rename(data)
    _relocate(env["model"], "o.onnx.data")
    before = _sha(data)
    expected = _outputs(env["model"])
    assert main([str(env["model"]), "-o", str(env["m"] / "o.onnx"), "-q"]) == 0, capfd.readouterr().err
    assert _sha(data) == before and _referenced(env["model"]) == {"o.onnx.data"}
    assert _referenced(env["m"] / "o.onnx") == set(_data_files(env["m"], "o.onnx")) != set()
    np.testing.assert_allclose(_outputs(env["m"] / "o.onnx"), expected, rtol=0.1, atol=0.1)
    np.testing.assert_array_equal(_outputs(env["model"]), expected)  # the input still loads, unchanged


def test_dumps_are_written_safely(env: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    dumps = env["out"] / "d"
    assert main([str(env["model"]), "-o", str(env["o"]), "--dump-after", "all", "--dump-dir", str(dumps), "-q"]) == 0
    names = _listing(dumps)
    assert names and all(re.fullmatch(r"\d\d-[a-z0-9-]+\.onnx", n) for n in names), names
    assert _temps(env["out"]) == [] and _temps(env["m"]) == []


# -- class 4: model and data commit as one unit -----------------------------------------------------------------------
_CHILD = """
import os, signal, sys, time
from qcompiler import io, io_write
io.EXTERNAL_DATA_THRESHOLD = 0
io.EXTERNAL_MIN_TENSOR_BYTES = 0
{patch}
from qcompiler.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _child(patch: str, args: list[str]) -> subprocess.Popen[str]:
    code = _CHILD.format(patch=patch)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_crash_between_data_and_model_rename_keeps_a_consistent_pair(env: dict[str, Path], external_output: None,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    refs = {"a": _outputs(env["a"]), "b": _outputs(env["b"])}
    out, o = env["out"], env["o"]
    assert main([str(env["a"]), "-o", str(o), "-q"]) == 0
    first = _data_files(out, "o.onnx")
    # build b, and die (SIGKILL: no cleanup at all) once its data file is renamed and before its model is
    patch = ("real = os.replace\ncalls = []\n"
             "def replace(src, dst):\n    calls.append(dst)\n"
             "    if len(calls) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n    real(src, dst)\n"
             "os.replace = replace\n")
    proc = _child(patch, [str(env["b"]), "-o", str(o), "-q"])
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert _closest(o, refs) == "a" and _referenced(o) == set(first)  # the previous pair is intact and live
    assert len(_data_files(out, "o.onnx")) == 2 and len(_temps(out)) == 1  # b's data, b's dead model temporary
    capfd.readouterr()
    assert main([str(env["b"]), "-o", str(o), "-q"]) == 0  # the next save cleans both up
    assert _closest(o, refs) == "b" and _referenced(o) == set(_data_files(out, "o.onnx"))
    assert len(_data_files(out, "o.onnx")) == 1 and _temps(out) == []


def test_interleaved_saves_leave_one_consistent_pair(env: dict[str, Path], external_output: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Save a writes its files, b saves completely, then a commits: a's pair is live, b's data removed."""
    refs = {"a": _outputs(env["a"]), "b": _outputs(env["b"])}
    models = {k: io.load_model(env[k]) for k in ("a", "b")}
    a_written, b_done = threading.Event(), threading.Event()
    real = io_write._write_bytes

    def write(f, blob) -> None:
        real(f, blob)
        if threading.current_thread().name == "save-a":
            a_written.set()
            assert b_done.wait(30)

    monkeypatch.setattr(io_write, "_write_bytes", write)
    errors: list[BaseException] = []

    def save_a() -> None:
        try:
            io.save_model(models["a"], env["o"], input_path=env["a"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=save_a, name="save-a")
    thread.start()
    assert a_written.wait(30)
    assert len(_temps(env["out"])) == 2  # a's data and model, locked while a lives
    io.save_model(models["b"], env["o"], input_path=env["b"])  # must not remove a's temporaries
    assert _closest(env["o"], refs) == "b"
    b_done.set()
    thread.join(30)
    assert not errors, errors
    assert _closest(env["o"], refs) == "a"
    assert _referenced(env["o"]) == set(_data_files(env["out"], "o.onnx")) and _temps(env["out"]) == []


def test_stale_temporaries_are_removed_live_ones_kept(env: dict[str, Path]) -> None:
    import fcntl

    out = env["out"]
    tid = io_write._target_id("o.onnx")
    stale = out / f".qcompile-{tid}.{'a' * 12}.tmp"
    live = out / f".qcompile-{tid}.{'b' * 12}.tmp"
    other = out / f".qcompile-{io_write._target_id('p.onnx')}.{'c' * 12}.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer that is still alive
        io.save_model(io.load_model(env["a"]), env["o"], input_path=env["a"])
    assert _listing(out) == sorted(["o.onnx", live.name, other.name])


def test_data_the_model_still_reads_is_never_removed(env: dict[str, Path], external_output: None) -> None:
    """A model loaded from o.onnx's data, changed, and saved back over o.onnx: the file it reads stays."""
    io.save_model(io.load_model(env["a"]), env["o"])
    (old,) = _data_files(env["out"], "o.onnx")
    model = io.load_model(env["o"])  # lazy: reads its weights from the old data file
    w = model.graph.initializers["W2"]
    w.const_value = ir_tensor(w.const_value.numpy() * 2, "W2")
    io.save_model(model, env["o"])
    names = _data_files(env["out"], "o.onnx")
    assert old in names and len(names) == 2 and _referenced(env["o"]) == set(names) - {old}
    np.testing.assert_array_equal(model.graph.initializers["W1"].const_value.numpy(),
                                  io.load_model(env["a"]).graph.initializers["W1"].const_value.numpy())
    io.save_model(io.load_model(env["a"]), env["o"])  # nothing reads them any more: both go
    assert len(_data_files(env["out"], "o.onnx")) == 1


def ir_tensor(array: np.ndarray, name: str):
    import onnx_ir as ir

    return ir.Tensor(array, name=name)


# -- class 8: exit codes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("writer", ["_write_bytes", "_write_tensor"])
def test_disk_full_is_exit_2_and_leaves_the_previous_output(env: dict[str, Path], external_output: None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str], code: int,
                                                            writer: str) -> None:
    from qcompiler.cli import main

    assert main([str(env["a"]), "-o", str(env["o"]), "-q"]) == 0
    previous = {n: _sha(env["out"] / n) for n in _listing(env["out"])}
    real = getattr(io_write, writer)

    def full(f, payload) -> None:
        real(f, payload)  # some bytes reach the temporary first
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io_write, writer, full)
    capfd.readouterr()
    _expect_refused([str(env["b"]), "-o", str(env["o"])], [env["b"]], [env["out"]], capfd, "no space left")
    assert {n: _sha(env["out"] / n) for n in _listing(env["out"])} == previous


def _not_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the check must come before compiling")

    monkeypatch.setattr(io, "load_model", refuse)


def test_read_only_folder_is_exit_2_before_compiling(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    _not_compiled(monkeypatch)
    monkeypatch.setattr(io_write.os, "open", read_only)
    _expect_refused([str(env["a"]), "-o", str(env["o"])], [env["a"]], [env["out"]], capfd, "read-only")


@pytest.mark.parametrize("target", ["output", "report"])
def test_unwritable_folder_is_exit_2_before_compiling(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str], target: str) -> None:
    out = env["out"]
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop this process from writing")
        _not_compiled(monkeypatch)
        args = ([str(env["a"]), "-o", str(env["o"])] if target == "output" else
                [str(env["a"]), "-o", str(env["root"] / "o.onnx"), "--report", str(out / "r.md")])
        _expect_refused(args, [env["a"]], [out], capfd, "permission denied")
    finally:
        out.chmod(0o755)


def test_a_250_byte_name_compiles(env: dict[str, Path], external_output: None,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    name = "n" * 245 + ".onnx"
    report = "r" * 247 + ".md"
    assert main([str(env["a"]), "-o", str(env["out"] / name), "--report", str(env["out"] / report), "-q"]) == 0, \
        capfd.readouterr().err
    (data,) = _referenced(env["out"] / name)
    assert len(data.encode()) <= 255 and (env["out"] / data).is_file()
    assert _listing(env["out"]) == sorted([name, report, data])
    np.testing.assert_allclose(_outputs(env["out"] / name), _outputs(env["a"]), rtol=0.1, atol=0.1)
    assert main([str(env["a"]), "-o", str(env["out"] / name), "-q"]) == 0  # again: same names, nothing stale
    assert _listing(env["out"]) == sorted([name, report, data])


def test_a_name_too_long_is_exit_2_before_compiling(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    _not_compiled(monkeypatch)
    _expect_refused([str(env["a"]), "-o", str(env["out"] / ("n" * 251 + ".onnx"))], [env["a"]], [env["out"]], capfd,
                    "256 bytes")


def test_a_folder_where_the_data_file_goes_is_exit_2(env: dict[str, Path], external_output: None,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    assert main([str(env["a"]), "-o", str(env["o"]), "-q"]) == 0
    (data,) = _data_files(env["out"], "o.onnx")
    for name in _listing(env["out"]):
        (env["out"] / name).unlink()
    (env["out"] / data).mkdir()
    _expect_refused([str(env["a"]), "-o", str(env["o"])], [env["a"]], [env["out"]], capfd, "folder is in the way")


_SLOW_WRITE = ("real = io_write._write_bytes\n"
               "def slow(f, blob):\n    real(f, blob)\n    f.flush()\n"
               "    open(MARKER, 'w').close()\n    time.sleep(60)\n"
               "io_write._write_bytes = slow\n")
_SLOW_PASS = ("from qcompiler.passes.finalize import FinalizePass\n"
              "real = FinalizePass.call\n"
              "def slow(self, model):\n    open(MARKER, 'w').close()\n    time.sleep(60)\n    return real(self, model)\n"
              "FinalizePass.call = slow\n")


@pytest.mark.parametrize(("moment", "signum"), [("pass", signal.SIGTERM), ("write", signal.SIGTERM),
                                                ("write", signal.SIGINT)], ids=["SIGTERM-pass", "SIGTERM-write",
                                                                                 "SIGINT-write"])
def test_signal_during_a_slow_compile_leaves_nothing(env: dict[str, Path], moment: str, signum: int) -> None:
    env["o"].write_bytes(b"previous output")
    marker = env["root"] / "busy"
    patch = f"MARKER = {str(marker)!r}\n" + (_SLOW_WRITE if moment == "write" else _SLOW_PASS)
    proc = _child(patch, [str(env["a"]), "-o", str(env["o"])])
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=10)
    assert len(_temps(env["out"])) == (2 if moment == "write" else 0)  # data and model temporaries while writing
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert len(err.strip().split("\n")) == 1 and "no partial output" in err, err
    assert _listing(env["out"]) == ["o.onnx"] and env["o"].read_bytes() == b"previous output"


def test_sigterm_during_the_commit_is_held_until_the_pair_is_in_place(env: dict[str, Path]) -> None:
    patch = ("real = os.replace\n"
             "def replace(src, dst):\n    os.kill(os.getpid(), signal.SIGTERM)\n    real(src, dst)\n"
             "os.replace = replace\n")
    proc = _child(patch, [str(env["a"]), "-o", str(env["o"])])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert _referenced(env["o"]) == set(_data_files(env["out"], "o.onnx")) != set() and _temps(env["out"]) == []
    np.testing.assert_allclose(_outputs(env["o"]), _outputs(env["a"]), rtol=0.1, atol=0.1)


def test_control_characters_are_escaped_in_errors(env: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    evil = env["root"] / "e\x1b[2J\x9bvil\x07" / "o.onnx"
    line = _expect_refused([str(env["a"]), "-o", str(evil)], [env["a"]], [env["out"]], capfd, "does not exist")
    assert "e\\x1b[2J\\x9bvil\\x07" in line


def test_control_characters_are_escaped_in_log_lines(env: dict[str, Path]) -> None:
    name = "o\x1b]0;owned\x07\x7f.onnx"
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", str(env["a"]), "-o", str(env["out"] / name), "-v"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (env["out"] / name).is_file()
    assert not _CONTROL.search(proc.stdout + proc.stderr)
    assert "o\\x1b]0;owned\\x07\\x7f.onnx" in proc.stdout
    assert any("saved" in line and "o\\x1b]0;owned\\x07\\x7f.onnx" in line for line in proc.stderr.splitlines())
