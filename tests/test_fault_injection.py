"""Fault injection (issue 16, "Must show"): a run killed at each stage resumes to the outputs of an uninterrupted
run, and a full disk at each writer is one ``error:`` line (exit 2) with no corrupt or partial file left behind.

* **SIGKILL at each stage.** ``python -m pipeline.reconstruct`` runs in a subprocess through a small bootstrap
  (:data:`BOOTSTRAP`) that wraps one function of the pipeline and sends the process SIGKILL right before or after
  its n-th call (``FAULT_KILL=before|after:module.attr:n``, or ``replace:NAME:n`` — just before the n-th atomic
  rename onto a path ending in NAME, the temporary file complete — or ``rename:NAME:n`` for ``Path.rename``). The
  kill is a real SIGKILL (no ``finally``, no cleanup) at a deterministic point; the pipeline itself has no hook.
  The LoFTR case is killed from outside, by polling for its first raw ``.npz``. After each kill the same command
  runs to completion and its outputs must equal the uninterrupted run's: the same files (so no temporary file is
  left), the same features.h5 / matches.h5 datasets, the same registered images, poses (1e-6) and points.
* **Full disk at each writer** (in-process, :func:`pipeline.reconstruct.main_cli` through
  :func:`core.errors.run_cli`): the lowest write of one writer fails with ENOSPC the way the real one does —
  Python-level writes (raw ``.npz``, stamps, pairs, summary.json, the PNG, the HTML) write half their bytes and
  then fail in ``write()``, without a file name; h5py fails in ``create_dataset``; SQLite (pycolmap) raises
  ``RuntimeError: ... database or disk is full``; COLMAP's C++ writers (the model, ``points.ply``) truncate the
  file *silently*, as they do on a real full disk. Each case must give one line naming the file, exit 2, leave
  the previous complete file (if any) byte-identical and no temporary file, and a re-run after the "disk" is
  freed completes to the uninterrupted run's outputs.
* **A real full disk**: the CLI on a small tmpfs mounted in a private user + mount namespace (``unshare -rm``;
  skipped with the reason where that is not allowed), sized to fill up at h5py, SQLite, COLMAP's model writer
  and a Python writer.

Two deviations are fixed in :func:`core.files.atomic_path` (outside pipeline/): a ``write()`` that fails on a
full disk names no file, and the temporary file of a writer killed before its rename stays forever. Until that
patch is in, the tests that meet them run every other assertion and then xfail, listing what they saw
(:class:`KnownBugs`); once it is in, they are ordinary failures.

The scene: 5 rendered views, 160x120, over a 40 degree arc (SIFT registers all five in ~2 s); mapping with
``--num-threads 1`` is exactly reproducible, so an interrupted run must give the same model.
"""

from __future__ import annotations

import errno
import io as pyio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT

SCENE = dict(width=160, height=120, num_views=5, num_boxes=3, arc_degrees=40.0)
SIFT = ("--matcher", "sift", "--num-threads", "1")
LOFTR = (
    "--matcher",
    "loftr+sift",
    "--weights",
    "loftr-compact",
    "--resize",
    "160",
    "--device",
    "cpu",
    "--num-threads",
    "1",
)

#: runs pipeline.reconstruct as ``python -m`` would, after wrapping one function to SIGKILL the process
BOOTSTRAP = r"""
import functools, importlib, os, pathlib, runpy, signal, sys

def install(spec):
    kind, rest = spec.split(":", 1)
    target, count = rest.rsplit(":", 1)
    count, calls = int(count), [0]

    def hit(matches=True):
        if matches:
            calls[0] += 1
            if calls[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("before", "after"):
        parts = target.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                owner = importlib.import_module(".".join(parts[:split]))
                break
            except ImportError:
                continue
        for name in parts[split:-1]:
            owner = getattr(owner, name)
        original = getattr(owner, parts[-1])

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            hit(kind == "before")
            result = original(*args, **kwargs)
            hit(kind == "after")
            return result

        setattr(owner, parts[-1], wrapper)
    elif kind == "replace":  # os.replace(temp, path): the temporary file is complete, not yet in place
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            hit(str(dst).endswith(target))
            return real(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind == "rename":  # Path.rename(...) of a path called target
        real_rename = pathlib.Path.rename

        def rename(self, *args, **kwargs):
            hit(self.name == target)
            return real_rename(self, *args, **kwargs)

        pathlib.Path.rename = rename
    else:
        raise SystemExit(f"bad FAULT_KILL {spec!r}")

if os.environ.get("FAULT_KILL"):
    install(os.environ["FAULT_KILL"])
sys.argv[0] = "pipeline.reconstruct"
runpy.run_module("pipeline.reconstruct", run_name="__main__", alter_sys=True)
"""


# ------------------------------------------------------------------------------------------------ helpers
def _atomic_path_is_patched() -> bool:
    """Whether :func:`core.files.atomic_path` names the file when ``write()`` fails without a name (a full
    disk) and removes the temporary files that killed writers left behind. Until it does (the proposed patch of
    matchers/files.py), those two deviations make the tests that meet them xfail instead of fail."""
    import tempfile

    from core.files import atomic_path

    with tempfile.TemporaryDirectory() as folder:
        target, stale = Path(folder) / "probe.txt", Path(folder) / ".probe.txt.abcdefgh.tmp"
        stale.write_text("left by a killed writer")
        with atomic_path(target) as temp:
            temp.write_text("x")
        try:
            with atomic_path(target):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            return not stale.exists() and error.filename == str(target)
    return False


ATOMIC_PATCHED = _atomic_path_is_patched()


class KnownBugs:
    """Deviations the core.files patch fixes: a failure once it is applied, an xfail (with what was seen)
    until then; every other assertion of the test still runs."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            if ATOMIC_PATCHED:
                pytest.fail(message)
            self.seen.append(message)
        return ok

    def finish(self) -> None:
        if self.seen:
            pytest.xfail(
                f"{len(self.seen)} known deviation(s) until matchers/files.py is patched: " + "; ".join(self.seen[:3])
            )


@pytest.fixture
def known() -> KnownBugs:
    return KnownBugs()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from datasets.synthetic import SceneConfig, render_scene, write_scene

    scene = render_scene(SceneConfig(**SCENE))
    return write_scene(scene, tmp_path_factory.mktemp("scene")) / "images"


def cli(images: Path, out: Path, *flags: str, fault: str | None = None, timeout: float = 300):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FAULT_KILL", None)
    if fault:
        env["FAULT_KILL"] = fault
    return subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, "--images", str(images), "--outputs", str(out), *flags],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory) -> Path:
    """An uninterrupted SIFT run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run = cli(images, out, *SIFT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["registered"] == SCENE["num_views"]
    assert not temp_files(out)
    return out


def temp_files(root: Path) -> list[str]:
    """Leftovers of interrupted writers: temporary files and folders, the previous model, side files."""
    leftovers = []
    for path in root.rglob("*"):
        name = path.name
        if (
            name.endswith((".tmp", ".old", "-journal", "-wal", "-shm"))
            or name.startswith(".write-test-")
            or name.endswith(".colmap")
            or name.endswith(".pairs.txt")
        ):
            leftovers.append(str(path.relative_to(root)))
    return sorted(leftovers)


def listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as file:
        file.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def assert_same_model(sfm: Path, reference_sfm: Path) -> None:
    import pycolmap

    model, expected = pycolmap.Reconstruction(str(sfm)), pycolmap.Reconstruction(str(reference_sfm))
    names = {model.images[i].name: i for i in model.reg_image_ids()}
    expected_names = {expected.images[i].name: i for i in expected.reg_image_ids()}
    assert sorted(names) == sorted(expected_names)
    for name, image_id in names.items():
        pose = model.images[image_id].cam_from_world().matrix()
        expected_pose = expected.images[expected_names[name]].cam_from_world().matrix()
        np.testing.assert_allclose(pose, expected_pose, rtol=0, atol=1e-6, err_msg=name)
    assert model.num_points3D() == expected.num_points3D()
    assert model.compute_num_observations() == expected.compute_num_observations()
    for camera_id, camera in expected.cameras.items():
        np.testing.assert_allclose(model.cameras[camera_id].params, camera.params, rtol=0, atol=1e-6)


def _atomic_temp(name: str) -> bool:
    """A name atomic_path gives a temporary file: '.' + target + '.' + 8 random characters + '.tmp'."""
    return name.startswith(".") and name.endswith(".tmp") and len(name.rsplit(".", 2)[-2]) == 8


def assert_same_outputs(out: Path, reference: Path, known: KnownBugs) -> dict:
    """``out`` holds what the uninterrupted run wrote, and nothing else; returns its summary."""
    leftovers = temp_files(out)
    stale = [name for name in leftovers if _atomic_temp(Path(name).name)]
    known.check(not stale, f"temporary files of killed writers left behind: {stale}")
    assert [name for name in leftovers if name not in stale] == []
    assert listing(out) - set(stale) == listing(reference), listing(out) ^ listing(reference)
    for h5 in sorted(reference.rglob("*.h5")):
        got, expected = h5_datasets(out / h5.relative_to(reference)), h5_datasets(h5)
        assert sorted(got) == sorted(expected), h5
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), (h5, key)
    assert_same_model(out / "sfm", reference / "sfm")
    assert (out / "points.ply").read_bytes() == (reference / "points.ply").read_bytes()
    summary, expected = (json.loads((root / "summary.json").read_text()) for root in (out, reference))
    for key in ("registered", "total", "points", "observations", "unregistered", "models", "database"):
        assert summary[key] == expected[key], key
    return summary


# --------------------------------------------------------------------------------------- SIGKILL at each stage
#: (stage, FAULT_KILL, what the resumed run's summary must say: pairs_reused, up_to_date, reused_database)
KILLS = [
    ("matching: 4 of 10 raw pairs saved", "after:pipeline.raw_store.RawMatchStore.save_many:4", (4, False, False)),
    ("matching: a raw .npz written, not renamed", "replace:.npz:3", (2, False, False)),
    ("quantization", "before:pipeline.match_dense.aggregate_matches:1", (10, False, False)),
    ("features.h5 written, not renamed", "replace:features.h5:1", (10, False, False)),
    ("matching stamp", "replace:done.json:1", (10, False, False)),
    ("database verified, not renamed", "after:pipeline.colmap_db.verify:1", (10, True, False)),
    ("database stamp", "replace:database.json:1", (10, True, False)),
    ("mapping: models written", "after:pipeline.mapping._incremental:1", (10, True, True)),
    ("model written, not renamed", "rename:.sfm.tmp:1", (10, True, True)),
    ("summary.json", "replace:summary.json:1", (10, True, True)),
]


@pytest.mark.parametrize("stage,fault,resumed", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_at_each_stage_resumes_to_the_same_outputs(images, reference, tmp_path, stage, fault, resumed, known):
    out = tmp_path / "out"
    killed = cli(images, out, *SIFT, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (stage, killed.returncode, killed.stderr[-3000:])
    assert not (out / "summary.json").exists()
    run = cli(images, out, *SIFT)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = assert_same_outputs(out, reference, known)
    matching = summary["matching"]
    assert (matching["pairs_reused"], matching["up_to_date"], summary["reused_database"]) == resumed, stage
    assert summary["resumed_model"] is False
    known.finish()


def test_sigkill_while_an_existing_model_is_replaced(images, reference, tmp_path, known):
    """A model is replaced by moving it aside first: killed right then (neither sfm/ nor the new one in place),
    the next run still ends with the reference model and no leftovers."""
    out = tmp_path / "out"
    assert cli(images, out, *SIFT, fault="replace:summary.json:1").returncode == -signal.SIGKILL  # sfm/ exists
    assert (out / "sfm").is_dir()
    assert cli(images, out, *SIFT, fault="rename:.sfm.tmp:1").returncode == -signal.SIGKILL  # sfm/ moved aside
    assert not (out / "sfm").exists() and (out / ".sfm.tmp").is_dir() and (out / ".sfm.old").is_dir()
    run = cli(images, out, *SIFT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_outputs(out, reference, known)
    known.finish()


# ------------------------------------------------------------------------------------ full disk at each writer
ENOSPC_TEXT = os.strerror(errno.ENOSPC)


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, ENOSPC_TEXT)  # what write() raises: no file name


class _FullFile:
    """A file whose disk fills up after ``budget`` bytes: the first bytes reach the file, then write() fails."""

    def __init__(self, handle, budget: int) -> None:
        self._handle, self._budget = handle, budget

    def write(self, data):
        if len(data) <= self._budget:
            self._budget -= len(data)
            return self._handle.write(data)
        self._handle.write(data[: self._budget])
        self._handle.flush()
        self._budget = 0
        raise _enospc()

    def fileno(self):  # writers that would write to the descriptor directly (PIL) use write() instead
        raise pyio.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)


def _is_temp_of(path, target: str) -> bool:
    """``path`` is an atomic writer's temporary file for a file called ``target`` ('*' : any raw .npz)."""
    name = Path(os.fspath(path)).name
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    stem = name[1:-4].rsplit(".", 1)[0]  # drop mkstemp's random part
    return stem.endswith(".npz") if target == "*.npz" else stem == target


#: writer -> (target file, how its lowest write fails). "python": open()/write() of the temporary file
#: (half-written, then ENOSPC); "h5py": create_dataset raises h5py's RuntimeError carrying errno 28;
#: "sqlite": pycolmap raises SQLite's "database or disk is full"; "silent": COLMAP's C++ writer truncates the
#: file and reports nothing (as on a real full disk).
WRITERS = {
    "pairs.txt": ("pairs.txt", "python"),
    "raw .npz": ("*.npz", "python"),
    "features.h5": ("features.h5", "h5py"),
    "matches.h5": ("matches.h5", "h5py"),
    "matching stamp": ("matches.h5.raw/done.json", "python"),
    "database": ("database.db", "sqlite"),
    "database stamp": ("database.json", "python"),
    "sfm model": ("sfm", "silent"),
    "points.ply": ("points.ply", "silent"),
    "reconstruction.png": ("reconstruction.png", "python"),
    "reconstruction.html": ("reconstruction.html", "python"),
    "summary.json": ("summary.json", "python"),
}


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(writer)``: from now on, the lowest write of ``writer`` fails as on a full disk."""
    import builtins

    import pycolmap

    state: dict = {"writer": None, "skip": 0}

    def active(kind: str) -> str | None:
        writer = state["writer"]
        return Path(WRITERS[writer][0]).name if writer is not None and WRITERS[writer][1] == kind else None

    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        target = active("python")
        if (
            target
            and any(flag in mode for flag in "wax+")
            and isinstance(file, (str, bytes, os.PathLike))
            and _is_temp_of(file, target)
        ):
            state["skip"] -= 1
            if state["skip"] < 0:
                return _FullFile(handle, 64)
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(pyio, "open", fake_open)

    real_create_dataset = h5py.Group.create_dataset

    def create_dataset(self, name, *args, **kwargs):
        target = active("h5py")
        if target and _is_temp_of(self.file.filename, target) and len(self.file) > 1:
            raise RuntimeError(
                f"Can't decrement id ref count (file write failed: time = Mon Nov 30 11:55:22 2026\n, filename = "
                f"'{self.file.filename}', file descriptor = 4, errno = 28, error message = '{ENOSPC_TEXT}', "
                f"buf = 0x56376bf71740, total write size = 128, bytes this sub-write = 128, offset = 16384)"
            )
        return real_create_dataset(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)

    real_verify = pycolmap.verify_matches

    def verify_matches(database, *args, **kwargs):
        if active("sqlite"):
            raise RuntimeError("[database_sqlite.cc:1296] SQLite error: database or disk is full")
        return real_verify(database, *args, **kwargs)

    monkeypatch.setattr(pycolmap, "verify_matches", verify_matches)

    def truncating(method: str, target: str):
        real = getattr(pycolmap.Reconstruction, method)

        def write(self, path, *args, **kwargs):
            result = real(self, path, *args, **kwargs)
            if active("silent") == target:
                files = [Path(path)] if Path(path).is_file() else sorted(Path(path).iterdir())
                victim = max(files, key=lambda p: p.stat().st_size)
                victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # and no error, as COLMAP
            return result

        monkeypatch.setattr(pycolmap.Reconstruction, method, write)

    truncating("write_text", "sfm")
    truncating("export_PLY", "points.ply")

    def set_writer(writer: str | None) -> None:
        state["writer"], state["skip"] = writer, 2 if writer == "raw .npz" else 0  # 2 raw pairs fit

    return set_writer


def run_main(images: Path, out: Path, capsys) -> tuple[int, str]:
    """pipeline.reconstruct's CLI in this process: (exit status, stderr)."""
    from core.errors import run_cli
    from pipeline import reconstruct

    capsys.readouterr()
    try:
        run_cli(lambda: reconstruct.main_cli(["--images", str(images), "--outputs", str(out), *SIFT]))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def writer_targets(out: Path, writer: str) -> list[Path]:
    target = WRITERS[writer][0]
    return sorted(out.rglob("*.npz")) if target == "*.npz" else [out / target]


def snapshot(paths: list[Path]) -> dict[Path, tuple]:
    """Content and identity (inode, mtime) of files and folders: 'intact' means not replaced and not changed."""
    state = {}
    for path in paths:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                stat = child.stat()
                state[child] = (child.read_bytes(), stat.st_ino, stat.st_mtime_ns)
        elif path.exists():
            stat = path.stat()
            state[path] = (path.read_bytes(), stat.st_ino, stat.st_mtime_ns)
    return state


def assert_one_error_line(code: int, stderr: str, *expected: str) -> str:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return errors[0]


def test_full_disk_at_each_writer_of_a_fresh_run(images, reference, tmp_path, full_disk, capsys, known):
    """Writer after writer fails (each run resumes what the previous one finished): one line naming the file,
    exit 2, no partial or temporary file; once the disk has room, the outputs of an uninterrupted run."""
    out = tmp_path / "out"
    for writer in WRITERS:
        full_disk(writer)
        code, stderr = run_main(images, out, capsys)
        line = assert_one_error_line(code, stderr, "no space left on device", "free some space")
        targets = writer_targets(out, writer)
        named = WRITERS[writer][0] if writer != "raw .npz" else "matches.h5.raw/"
        known.check(
            line.startswith(f"error: {out}") and named in line.split(": no space")[0],
            f"{writer}: the error line names no file: {line!r}",
        )
        assert temp_files(out) == [], (writer, temp_files(out))
        if writer == "raw .npz":
            assert len(targets) == 2, targets  # the pairs matched before the disk filled are kept
        elif writer != "sfm model":
            assert not targets[0].exists(), writer
        else:
            assert not (out / "sfm").exists()
    full_disk(None)
    code, stderr = run_main(images, out, capsys)
    assert code == 0, stderr[-3000:]
    assert_same_outputs(out, reference, known)
    known.finish()


def test_full_disk_keeps_the_previous_complete_files(images, reference, tmp_path, full_disk, capsys, known):
    """An up-to-date output folder whose files are all rewritten (a stale matching stamp: everything from
    quantization on is redone): when the disk fills at a writer, its previous file stays as it was."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    stale = [("view_001.png", "view_000.png")] + [
        tuple(line.split()) for line in (reference / "pairs.txt").read_text().splitlines()
    ][1:]
    for writer in WRITERS:
        if writer == "raw .npz":
            for path in sorted(out.rglob("*.npz"))[:3]:
                path.unlink()
        if writer == "pairs.txt":  # a pairs file of other content: rewritten
            (out / "pairs.txt").write_text("".join(f"{a} {b}\n" for a, b in stale))
        (out / "matches.h5.raw" / "done.json").write_text('{"stamp": "stale"}')  # all is redone from the raw matches
        before = snapshot(writer_targets(out, writer))
        assert before, writer
        full_disk(writer)
        code, stderr = run_main(images, out, capsys)
        assert_one_error_line(code, stderr, "no space left on device")
        after = snapshot(writer_targets(out, writer))
        assert {path: after[path] for path in before} == before, writer
        assert temp_files(out) == [], (writer, temp_files(out))
    full_disk(None)
    code, stderr = run_main(images, out, capsys)
    assert code == 0, stderr[-3000:]
    assert_same_outputs(out, reference, known)
    known.finish()


# ----------------------------------------------------------------------------- LoFTR + SIFT, killed from outside
def test_loftr_ensemble_killed_from_outside_during_matching_then_in_the_merge(images, tmp_path, known):
    """The default ensemble with the shipped loftr-compact: SIGKILL from another process as soon as LoFTR's first
    raw pair is on disk, then (resumed) just before the ensemble's matches.h5 is in place; the third run ends
    with an uninterrupted run's outputs (LoFTR and SIFT files, the merged ones, the model)."""
    pytest.importorskip("torch")
    reference = tmp_path / "reference"
    run = cli(images, reference, *LOFTR)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["matching"]["ensemble"] is not None and summary["registered"] >= 3

    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "FAULT_KILL"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, "--images", str(images), "--outputs", str(out), *LOFTR],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 240
            while not list((out / "loftr" / "matches.h5.raw").glob("*/*.npz")):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
                time.sleep(0.002)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(60)
    assert process.returncode == -signal.SIGKILL
    raw = list((out / "loftr" / "matches.h5.raw").glob("*/*.npz"))
    assert 1 <= len(raw) <= 10 and not (out / "loftr" / "matches.h5").exists()  # killed before LoFTR's outputs
    assert (out / "sift" / "matches.h5.raw" / "done.json").is_file()  # SIFT went first and finished

    # loftr/matches.h5 is the first matches.h5 put in place, the ensemble's the second
    killed = cli(images, out, *LOFTR, fault="replace:/matches.h5:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "loftr" / "matches.h5").is_file() and not (out / "matches.h5").exists()

    run = cli(images, out, *LOFTR)
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = assert_same_outputs(out, reference, known)
    assert resumed["matching"]["pairs_reused"] == 10
    assert resumed["matching"]["ensemble"] == summary["matching"]["ensemble"]
    known.finish()


# ------------------------------------------------------------------------------------------ a real full disk
#: the CLI runs on a tmpfs in a private mount namespace; before each run the tmpfs is resized to what is in use
#: plus this many KiB (0: the first run, on 16 KiB). On the scene above these fill up at, in turn: a raw .npz,
#: features.h5, matches.h5, SQLite (database.db), reconstruction.html, the model (sfm/); the last run has room.
REAL_DISK_STEPS = (0, 48, 96, 150, 500, 60, 1 << 16)

REAL_DISK_SCRIPT = r"""
set -u
results=$1; images=$2; shift 2
mnt=$results/mnt; out=$mnt/out
mkdir -p "$mnt"
mount -t tmpfs -o size=16k tmpfs "$mnt" || exit 90
step=0
for extra in "$@"; do
  step=$((step + 1))
  if [ "$extra" != 0 ]; then
    used=$(df -k --output=used "$mnt" | tail -1)
    mount -o remount,size=$((used + extra))k tmpfs "$mnt" || exit 91
  fi
  "$PYTHON" -c "$BOOTSTRAP" --images "$images" --outputs "$out" --matcher sift --num-threads 1 \
    >/dev/null 2>"$results/$step.err"
  echo $? > "$results/$step.rc"
  cp -a "$out" "$results/$step.out"
done
"""


def _namespace_tmpfs_works(tmp: Path) -> str | None:
    """None when ``unshare -rm`` can mount a tmpfs here; else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {tmp} && umount {tmp}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def assert_no_corrupt_file(out: Path, reference: Path) -> None:
    """Every file a failed run left is complete: what the uninterrupted run has, byte for byte (the model: the
    same images, poses and points), the stamps valid JSON, the database a sound SQLite file."""
    import sqlite3

    assert temp_files(out) == [], temp_files(out)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out)
        assert (reference / relative).exists(), relative
        if path.suffix == ".h5":
            got, expected = h5_datasets(path), h5_datasets(reference / relative)
            assert sorted(got) == sorted(expected) and all(np.array_equal(got[k], expected[k]) for k in expected), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".db":
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
                assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",), path
        elif relative.parts[0] not in ("sfm", "models"):
            assert path.read_bytes() == (reference / relative).read_bytes(), relative
    for model in [out / "sfm", *sorted((out / "models").glob("*"))]:
        if model.exists():
            assert_same_model(model, reference / model.relative_to(out))


def test_a_real_full_disk_at_each_stage(images, reference, tmp_path, known):
    reason = _namespace_tmpfs_works(tmp_path)
    if reason:
        pytest.skip(reason)
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "BOOTSTRAP": BOOTSTRAP, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FAULT_KILL", None)
    run = subprocess.run(
        [
            "unshare",
            "-rm",
            "bash",
            "-c",
            REAL_DISK_SCRIPT,
            "script",
            str(results),
            str(images),
            *map(str, REAL_DISK_STEPS),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    failed_at = []
    out = results / "mnt" / "out"  # the path the runs saw (the tmpfs is gone now)
    for step in range(1, len(REAL_DISK_STEPS)):
        code, stderr = int((results / f"{step}.rc").read_text()), (results / f"{step}.err").read_text()
        line = assert_one_error_line(code, stderr, "no space left on device", "free some space")
        if known.check(line.startswith(f"error: {out}/"), f"the error line names no file: {line!r}"):
            failed_at.append(line.split(": ")[1][len(str(out)) + 1 :])
        assert_no_corrupt_file(results / f"{step}.out", reference)
    assert int((results / f"{len(REAL_DISK_STEPS)}.rc").read_text()) == 0
    assert_same_outputs(results / f"{len(REAL_DISK_STEPS)}.out", reference, known)
    # the disk filled up in matching, in HDF5, in SQLite, in COLMAP's model writer and in a Python writer
    print("a real full disk at:", failed_at)
    known.finish()
    assert len(set(failed_at)) >= 5, failed_at
