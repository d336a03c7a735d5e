"""Output paths that cannot be written: one ``error:`` line naming the path and the fix, exit code 2,
no traceback, no partial file (issue 16's ten cases), plus the checks and writers underneath.

As root, ``chmod 555`` does not stop writes (CAP_DAC_OVERRIDE), so the CLIs of the read-only cases run
with that capability dropped (``setpriv``, else ``capsh``); without either the read-only cases skip
with the reason. Every case fails before any matching, except ``match_dense --features DIR``: see
:func:`test_match_dense_features_naming_a_folder`.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from core import io
from core.errors import UserError, os_error_message
from core.files import atomic_path, check_output_dir, check_output_file, current_umask
from tests.conftest import PROJECT_ROOT

DROP = "-dac_override,-dac_read_search"


@lru_cache(maxsize=1)
def _unprivileged_prefix() -> tuple[str, ...] | None:
    """A command prefix under which mode bits are enforced (None: no way found here)."""
    if os.geteuid() != 0:
        return ()
    probe_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f".write-failures-probe-{os.getpid()}"
    probe_dir.mkdir(exist_ok=True)
    try:
        probe_dir.chmod(0o555)
        candidates = []
        if shutil.which("setpriv"):
            candidates.append(("setpriv", f"--inh-caps={DROP}", f"--bounding-set={DROP}", "--"))
        if shutil.which("capsh"):
            candidates.append(("capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$0" "$@"'))
        for prefix in candidates:
            try:
                run = subprocess.run([*prefix, "touch", str(probe_dir / "x")], capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if run.returncode != 0 and not (probe_dir / "x").exists():
                return prefix
            (probe_dir / "x").unlink(missing_ok=True)
        return None
    finally:
        probe_dir.chmod(0o755)
        shutil.rmtree(probe_dir, ignore_errors=True)


def unprivileged() -> tuple[str, ...]:
    prefix = _unprivileged_prefix()
    if prefix is None:
        pytest.skip(
            "running as root and neither setpriv nor capsh can drop CAP_DAC_OVERRIDE here, "
            "so a read-only folder would not stop writes"
        )
    return prefix


def run_cli(module: str, *args: str | Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", module, *map(str, args)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def assert_one_line_error(run: subprocess.CompletedProcess, *expected: str | Path, progress: bool = False) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if progress:  # tqdm bars of work done before the failure
        lines = [line for line in lines if not line.lstrip().startswith("matching:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for text in expected:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".write-test-")]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Four overlapping crops of one texture (SIFT matches them in a blink)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((200, 300)).astype(np.float32), (0, 0), 1.5)
    texture = (255 * (texture - texture.min()) / np.ptp(texture)).astype(np.uint8)
    for i in range(4):
        cv2.imwrite(str(folder / f"img{i}.png"), texture[6 * i : 6 * i + 120, 8 * i : 8 * i + 160])
    return folder


@pytest.fixture
def read_only(tmp_path: Path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder\n")
    return path


# ----------------------------------------------------------------------------------- the ten cases
@pytest.mark.parametrize("where", ["in", "under"])
def test_reconstruct_outputs_in_or_under_a_read_only_folder(images, read_only, tmp_path, where):
    outputs = read_only / "out" if where == "in" else read_only / "deeper" / "out"
    run = run_cli(
        "pipeline.reconstruct", "--images", images, "--outputs", outputs, "--matcher", "sift", prefix=unprivileged()
    )
    line = assert_one_line_error(run, outputs, read_only, "--outputs")
    assert "not writable" in line and "permission denied" in line
    assert files_under(read_only) == set() and no_temp_files(tmp_path)


def test_reconstruct_outputs_an_existing_file(images, a_file, tmp_path):
    run = run_cli("pipeline.reconstruct", "--images", images, "--outputs", a_file, "--matcher", "sift")
    line = assert_one_line_error(run, a_file, "--outputs needs a folder")
    assert a_file.read_text() == "not a folder\n" and no_temp_files(tmp_path), line


def test_reconstruct_outputs_below_a_file(images, a_file, tmp_path):
    outputs = a_file / "out"
    run = run_cli("pipeline.reconstruct", "--images", images, "--outputs", outputs, "--matcher", "sift")
    assert_one_line_error(run, outputs, f"{a_file} is a file, not a folder")
    assert a_file.read_text() == "not a folder\n" and no_temp_files(tmp_path)


def test_match_dense_features_naming_a_folder(images, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("img0.png img1.png\nimg1.png img2.png\n")
    folder = tmp_path / "features_folder"
    folder.mkdir()
    matches = tmp_path / "matches.h5"
    run = run_cli(
        "pipeline.match_dense",
        "--images",
        images,
        "--pairs",
        pairs,
        "--features",
        folder,
        "--matches",
        matches,
        "--matcher",
        "sift",
    )
    checked_first = "check_match_outputs" in (PROJECT_ROOT / "pipeline" / "match_dense.py").read_text()
    line = assert_one_line_error(run, folder, progress=not checked_first)
    assert files_under(folder) == set() and not matches.exists() and no_temp_files(tmp_path), line
    if checked_first:  # main_cli checks its outputs before any pair is matched
        assert "matching" not in run.stderr and not (tmp_path / "matches.h5.raw").exists()
        assert "--features needs a file" in line
    # The check that fails before any pair is matched (until main_cli calls it, the rename fails after matching):
    with pytest.raises(UserError, match="is a folder, but --features needs a file"):
        io.check_match_outputs(folder, matches)


@pytest.fixture
def imc2023_data(images: Path, tmp_path: Path) -> Path:
    data = tmp_path / "imc2023"
    (data / "test").mkdir(parents=True)
    shutil.copytree(images, data / "test" / "ds" / "scene" / "images")
    rows = "".join(f"ds/scene/images/{p.name},ds,scene\n" for p in sorted(images.iterdir()))
    (data / "sample_submission.csv").write_text("image_path,dataset,scene\n" + rows)
    return data


def test_imc2023_output_in_a_read_only_folder(imc2023_data, read_only, tmp_path):
    output = read_only / "submission.csv"
    run = run_cli(
        "recipes.imc2023", "--data", imc2023_data, "--output", output, "--matcher", "sift", prefix=unprivileged()
    )
    assert_one_line_error(run, output, "--output", "not writable")
    assert files_under(read_only) == set() and no_temp_files(tmp_path)


def test_imc2023_output_naming_a_folder(imc2023_data, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    run = run_cli("recipes.imc2023", "--data", imc2023_data, "--output", folder, "--matcher", "sift")
    assert_one_line_error(run, folder, "--output needs a file", folder / "submission.csv")
    assert files_under(folder) == set() and no_temp_files(tmp_path)


def test_imc2022_output_in_a_read_only_folder_or_naming_a_folder(read_only, tmp_path):
    data = tmp_path / "imc2022"  # the output is checked first: the data need not be complete
    data.mkdir()
    run = run_cli("recipes.imc2022", "--data", data, "--output", read_only / "submission.csv", prefix=unprivileged())
    assert_one_line_error(run, read_only / "submission.csv", "not writable")
    run = run_cli("recipes.imc2022", "--data", data, "--output", tmp_path)
    assert_one_line_error(run, tmp_path, "--output needs a file")
    assert files_under(read_only) == set() and no_temp_files(tmp_path)


def test_match_out_in_a_read_only_folder(images, read_only, tmp_path):
    out = read_only / "viz.png"
    run = run_cli(
        "matchers.match",
        images / "img0.png",
        images / "img1.png",
        "--matcher",
        "sift",
        "--out",
        out,
        prefix=unprivileged(),
    )
    assert_one_line_error(run, out, "--out", "not writable")
    assert "matches in" not in run.stdout  # failed before matching
    assert files_under(read_only) == set() and no_temp_files(tmp_path)


def test_aachen_outputs_a_file(a_file, tmp_path):
    run = run_cli("localization.aachen", "--dataset", tmp_path / "aachen", "--outputs", a_file, "--matcher", "sift")
    assert_one_line_error(run, a_file, "--outputs needs a folder")
    assert a_file.read_text() == "not a folder\n" and no_temp_files(tmp_path)


# -------------------------------------------------------------------------- OS errors while writing
@pytest.mark.parametrize(
    "code,fix",
    [
        (errno.EACCES, "folder you can write to"),
        (errno.EISDIR, "a folder is where a file is expected"),
        (errno.ENOTDIR, "a file is where a folder is expected"),
        (errno.EEXIST, "something is in the way"),
        (errno.ENOSPC, "free some space"),
        (errno.EROFS, "read-only"),
        (errno.EDQUOT, "quota"),
    ],
)
def test_write_errors_become_one_line_with_the_path_and_a_fix(tmp_path, code, fix):
    script = (
        "import errno, sys\n"
        "from core.errors import run_cli\n"
        "def main():\n"
        f"    raise OSError({code}, 'x', {str(tmp_path / 'out.h5')!r})\n"
        "run_cli(main)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert_one_line_error(run, tmp_path / "out.h5", fix, os.strerror(code).lower())


def test_other_os_errors_are_not_swallowed():
    assert os_error_message(ConnectionResetError(errno.ECONNRESET, "reset")) is None
    h5py_style = OSError(
        "Unable to create file (unable to open file: name = '/x/f.h5', errno = 28, "
        "error message = 'No space left on device', flags = 13)"
    )
    assert os_error_message(h5py_style).startswith("/x/f.h5: no space left on device; free some space")


def test_full_disk_while_writing_leaves_no_partial_file_and_names_the_target(tmp_path):
    target = tmp_path / "features.h5"
    target.write_text("previous\n")
    with pytest.raises(OSError) as raised:
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(temp))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]


def test_rename_onto_a_folder_is_eisdir_naming_the_target(tmp_path):
    (tmp_path / "features.h5").mkdir()
    with pytest.raises(OSError) as raised:
        io.write_text_atomic(tmp_path / "features.h5", "x")
    assert raised.value.errno == errno.EISDIR and raised.value.filename == str(tmp_path / "features.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]
    assert os_error_message(raised.value).startswith(f"{tmp_path / 'features.h5'}: is a directory; ")


# ------------------------------------------------------------------------------------ the checks
def test_output_checks_accept_writable_places_and_create_nothing(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_file(tmp_path / "new" / "x.csv") == tmp_path / "new" / "x.csv"
    (tmp_path / "existing.csv").write_text("old")
    check_output_file(tmp_path / "existing.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.csv"]


def test_output_checks_refuse_files_and_folders_in_the_wrong_place(tmp_path, a_file):
    with pytest.raises(UserError, match="is a file, but --outputs needs a folder"):
        check_output_dir(a_file, "--outputs")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(a_file / "x" / "y", "--outputs")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file(a_file / "x.csv", "--output")
    with pytest.raises(UserError, match=r"is a folder, but --output needs a file; give a file path, e\.g\. .*s\.csv"):
        check_output_file(tmp_path, "--output", example="s.csv")
    with pytest.raises(UserError, match="name the same file"):
        io.check_match_outputs(tmp_path / "a.h5", tmp_path / "a.h5")


def test_output_check_needs_room(tmp_path):
    with pytest.raises(UserError, match="free on the file system.*needed; free some space or choose --outputs"):
        check_output_dir(tmp_path / "out", "--outputs", needed_bytes=1 << 62)


# ------------------------------------------------------------------------------------------ umask
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(tmp_path, mask, mode):
    from matchers.base import Matches
    from matchers.viz import plot_matches

    old = os.umask(mask)
    try:
        assert current_umask() == mask
        with atomic_path(tmp_path / "a.bin") as temp:
            temp.write_bytes(b"x")
        io.write_text_atomic(tmp_path / "b.txt", "x")
        io.write_features(tmp_path / "f.h5", {"a.png": (np.zeros((2, 2)), np.ones(2), (4, 4))})
        io.write_matches(tmp_path / "m.h5", {("a.png", "b.png"): (np.array([0, -1]), np.ones(2))})
        image = np.zeros((20, 30), np.float32)
        empty = Matches(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32))
        plot_matches(image, image, empty, tmp_path / "p.png")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.txt", "f.h5", "m.h5", "p.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_umask_in_a_fresh_process_under_022(tmp_path):
    script = (
        "import os; os.umask(0o022)\n"
        "from core.io import write_text_atomic\n"
        f"write_text_atomic({str(tmp_path / 'summary.json')!r}, '{{}}')\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, check=True, timeout=60)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644
