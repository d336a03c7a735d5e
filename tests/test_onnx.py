"""ONNX export (matchers.loftr.export_onnx) and the onnxruntime matcher (matchers.loftr.onnx_backend).

The exported graph must reproduce the torch model: the same match set (coarse cell pairs) and keypoints within
1e-3 px, on random-weight images of several sizes (always) and on real temple_ring / scannet_sample pairs with the
shipped loftr-compact weights at two image sizes from one exported file (skipped when ../shared/data is absent).
Both ways the graph computes the fine windows (receptive fields only, or the whole fine map: an ``If`` chosen by
the match count, as in ``LoFTR.match``) are checked against torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.errors import UserError
from core.image_io import read_gray
from matchers import make_matcher
from matchers.base import Matches
from matchers.loftr import LoFTR, LoFTRConfig, LoFTRMatcher
from matchers.loftr.export_onnx import (
    BRANCH_DOMAIN,
    CONFIG_KEY,
    DIGEST_KEY,
    FORMAT_KEY,
    INPUT_NAMES,
    OUTPUT_NAMES,
    OnnxLoFTR,
    export,
    main_cli,
    state_dict_digest,
)
from matchers.loftr.onnx_backend import OnnxLoFTRMatcher
from tests.conftest import PROJECT_ROOT, data_path
from tests.test_loftr_equivalence import perturb, textured_image, warped

KEYPOINT_TOL = 1e-3  # px


def random_model(config: LoFTRConfig, seed: int = 5) -> LoFTR:
    torch.manual_seed(seed)
    model = LoFTR(config).eval()
    model.load_state_dict(perturb(model.state_dict(), seed + 1))
    return model


def tiny_config(**coarse: object) -> LoFTRConfig:
    """A small architecture (fast export) of the same modules."""
    return LoFTRConfig.preset("compact").replace(
        backbone={"initial_dim": 16, "block_dims": (16, 24, 32)},
        coarse={"d_model": 32, "d_ffn": 32, "nhead": 2, "layer_names": ("self", "cross"), **coarse},
        fine={"d_model": 16, "d_ffn": 16, "nhead": 2},
        matching={"thr": 0.0},
    )


@pytest.fixture(scope="module")
def outdoor(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoFTR, Path]:
    """outdoor_ds-shaped random weights (random BatchNorm statistics), threshold 0, and their export."""
    model = random_model(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": 0.0}))
    path = export(model, tmp_path_factory.mktemp("onnx") / "outdoor_random.onnx", weights_label="random")
    return model, path


@pytest.fixture(scope="module")
def compact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped loftr-compact weights exported through the CLI."""
    path = tmp_path_factory.mktemp("onnx") / "compact.onnx"
    main_cli(["--weights", "loftr-compact", "--output", str(path)])
    return path


def keyed(matches: Matches) -> dict[tuple[float, ...], int]:
    """Match index by its coarse cell pair (original pixels)."""
    cells = np.concatenate([matches.coarse0, matches.coarse1], axis=1).round(3)
    return {tuple(row): n for n, row in enumerate(cells.tolist())}


def assert_same_matches(reference: Matches, other: Matches) -> float:
    """Same coarse cell pairs, keypoints within 1e-3 px, same confidences; returns the largest keypoint difference."""
    ka, kb = keyed(reference), keyed(other)
    assert len(ka) == len(reference) and set(ka) == set(kb), (
        f"match sets differ: {len(set(ka) - set(kb))} only in torch, {len(set(kb) - set(ka))} only in onnxruntime"
    )
    ia = np.array([ka[k] for k in sorted(ka)], dtype=np.int64)
    ib = np.array([kb[k] for k in sorted(ka)], dtype=np.int64)
    worst = 0.0
    if len(ia):
        worst = float(
            max(
                np.abs(reference.keypoints0[ia] - other.keypoints0[ib]).max(),
                np.abs(reference.keypoints1[ia] - other.keypoints1[ib]).max(),
            )
        )
        np.testing.assert_allclose(reference.scores[ia], other.scores[ib], rtol=1e-3, atol=1e-5)
    assert worst <= KEYPOINT_TOL, f"keypoints differ by {worst} px"
    return worst


# ------------------------------------------------------------------------------------------------ the file
def test_export_is_a_checked_dynamic_onnx_file_with_metadata(outdoor: tuple[LoFTR, Path]) -> None:
    model, path = outdoor
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    image_dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert image_dims[2:] == ["height0", "width0"]  # dynamic height and width
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "matches" for o in proto.graph.output)  # dynamic M
    assert not {"Einsum"} & {node.op_type for node in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[FORMAT_KEY] == "loftr-matches"
    assert LoFTRConfig.from_dict(json.loads(meta[CONFIG_KEY])) == model.config
    assert meta[DIGEST_KEY] == state_dict_digest(model) and len(meta[DIGEST_KEY]) == 64
    assert meta["preset"] == "outdoor_ds"


def fine_branch(model: LoFTR, count: int, size: tuple[int, int]) -> str:
    """The fine-window computation ``LoFTR.match`` (and the graph's If) picks for ``count`` matches at (W, H)."""
    per_window, per_cell = model.backbone.window_cost(model.config.fine.window)
    cells = -(-size[0] // 2) * -(-size[1] // 2)  # the 1/2 map
    return "windows" if count * per_window < model.lazy_fine_ratio * per_cell * cells else "full"


def if_nodes(path: Path) -> list[onnx.NodeProto]:
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.domain == BRANCH_DOMAIN]  # no placeholder is left
    assert BRANCH_DOMAIN not in {op.domain for op in proto.opset_import}
    return [n for n in proto.graph.node if n.op_type == "If"]


def test_fine_windows_are_an_if_with_two_branches(outdoor: tuple[LoFTR, Path], tmp_path: Path) -> None:
    """One If per image, each branch with its own convolutions (receptive fields / whole map); none coarse-only."""
    _, path = outdoor
    branches = if_nodes(path)
    assert len(branches) == 2
    for node in branches:
        graphs = {a.name: a.g for a in node.attribute}
        assert set(graphs) == {"then_branch", "else_branch"}
        for graph in graphs.values():
            assert len(graph.node) > 10 and "Conv" in {n.op_type for n in graph.node}
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    model = random_model(tiny_config())
    assert not if_nodes(export(model, tmp_path / "coarse.onnx", coarse_only=True))
    coarse_model = random_model(tiny_config().replace(fine={"enabled": False}))
    assert not if_nodes(export(coarse_model, tmp_path / "no_fine.onnx"))


def test_receptive_windows_equal_the_backbone_windows_and_the_full_map() -> None:
    """The graph's one-batch windows are ``fine_windows`` (bit for bit) and crops of the whole map (rounding)."""
    model = random_model(LoFTRConfig.preset("outdoor_ds"))
    graph = OnnxLoFTR(model)
    for height, width in ((120, 160), (77, 123)):
        image = torch.rand(1, 1, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            coarse, inputs = model.backbone.forward_coarse(image)
            h, w = coarse.shape[2], coarse.shape[3]
            corners = torch.tensor([0, w - 1, (h - 1) * w, h * w - 1])
            ids = torch.cat([torch.randperm(h * w, generator=torch.Generator().manual_seed(1))[:30], corners])
            stride = 4
            expected = model.backbone.fine_windows(
                inputs, torch.zeros_like(ids), ids // w * stride, ids % w * stride, 5
            )
            windows = graph._receptive_windows(inputs, ids, w)
            full = graph._windows(model.backbone.fine_full(inputs), ids, w)
        torch.testing.assert_close(windows, expected, rtol=0, atol=0)
        torch.testing.assert_close(windows, full, rtol=1e-4, atol=1e-4)


def test_state_dict_digest_depends_on_weights_only() -> None:
    a = random_model(tiny_config(), seed=1)
    b = random_model(tiny_config(), seed=1)
    c = random_model(tiny_config(), seed=2)
    assert state_dict_digest(a) == state_dict_digest(b) != state_dict_digest(c)


# ------------------------------------------------------------------------------------------------ random weights
@pytest.mark.parametrize("size0, size1", [((160, 120), (160, 120)), ((224, 160), (192, 144)), ((123, 77), (100, 90))])
def test_random_weights_match_torch(
    outdoor: tuple[LoFTR, Path], size0: tuple[int, int], size1: tuple[int, int]
) -> None:
    """Any sizes (also not multiples of 8, and different for the two images) from one exported file."""
    model, path = outdoor
    image0 = textured_image(size0[1], size0[0], seed=sum(size0))
    image1 = warped(image0, size1)
    reference = LoFTRMatcher(model, resize=None, device="cpu").match(image0, image1)
    onnx_matcher = OnnxLoFTRMatcher(path, resize=None, device="cpu")
    result = onnx_matcher.match(image0, image1)
    assert len(reference) > 10
    assert_same_matches(reference, result)
    # the plain module (not the inference copy) too
    plain = LoFTRMatcher(model, resize=None, device="cpu", optimize=False).match(image0, image1)
    assert_same_matches(plain, result)


def test_threshold_both_directions_and_no_matches(outdoor: tuple[LoFTR, Path]) -> None:
    model, path = outdoor
    image0 = textured_image(120, 160, seed=8)
    image1 = warped(image0, (160, 120))
    for options in ({"match_threshold": 0.05}, {"both_directions": True}):
        reference = LoFTRMatcher(model, resize=None, device="cpu", **options).match(image0, image1)
        assert_same_matches(
            reference, OnnxLoFTRMatcher(path, resize=None, device="cpu", **options).match(image0, image1)
        )
    none = OnnxLoFTRMatcher(path, resize=None, device="cpu", match_threshold=2.0).match(image0, image1)
    assert len(none) == 0 and none.has_coarse


def test_both_fine_branches_match_torch(outdoor: tuple[LoFTR, Path]) -> None:
    """Thresholds from many matches (whole fine map) to few (receptive fields) and none, from one file."""
    model, path = outdoor
    size = (160, 120)
    image0 = textured_image(size[1], size[0], seed=21)
    image1 = warped(image0, size)
    taken = set()
    for threshold in (0.0, 0.01, 0.03, 0.1, 1.0):
        reference = LoFTRMatcher(model, resize=None, device="cpu", match_threshold=threshold).match(image0, image1)
        result = OnnxLoFTRMatcher(path, resize=None, device="cpu", match_threshold=threshold).match(image0, image1)
        assert_same_matches(reference, result)
        taken.add(fine_branch(model, len(reference), size))
    assert taken == {"windows", "full"}


def test_full_attention_sinkhorn_and_coarse_only(tmp_path: Path) -> None:
    """Other architectures: softmax attention + optimal transport; a coarse-only export."""
    image0 = textured_image(120, 160, seed=4)
    image1 = warped(image0, (152, 128))
    config = tiny_config(attention="full").replace(matching={"match_type": "sinkhorn"})
    model = random_model(config)
    with torch.no_grad():
        model.coarse_matching.bin_score.fill_(-0.5)
    reference = LoFTRMatcher(model, resize=None, device="cpu").match(image0, image1)
    result = OnnxLoFTRMatcher(export(model, tmp_path / "ot.onnx"), resize=None, device="cpu").match(image0, image1)
    assert len(reference) > 5
    assert_same_matches(reference, result)

    model = random_model(tiny_config())
    reference = LoFTRMatcher(model, resize=None, device="cpu").match(image0, image1)
    coarse = OnnxLoFTRMatcher(export(model, tmp_path / "coarse.onnx", coarse_only=True), resize=None, device="cpu")
    result = coarse.match(image0, image1)
    assert coarse.describe()["coarse_only"] is True
    assert set(keyed(reference)) == set(keyed(result))
    np.testing.assert_array_equal(result.keypoints1, result.coarse1)  # image-1 keypoints stay on the grid
    np.testing.assert_array_equal(result.keypoints0, result.coarse0)


def test_sinkhorn_prefilter_confidence_equals_torch() -> None:
    """The graph's optimal-transport confidence with the dustbin prefilter (random weights send every match to the
    dustbin, so this is checked on peaked features, not end to end)."""
    from matchers.loftr.export_onnx import OnnxLoFTR

    config = tiny_config().replace(matching={"match_type": "sinkhorn", "skh_prefilter": True})
    model = random_model(config)
    generator = torch.Generator().manual_seed(0)
    feat0 = 3 * torch.randn(1, 40, 32, generator=generator)
    feat1 = torch.cat(
        [
            feat0[:, :30] + 0.1 * torch.randn(1, 30, 32, generator=generator),
            3 * torch.randn(1, 15, 32, generator=generator),
        ],
        dim=1,
    )
    with torch.no_grad():
        expected = model.coarse_matching.confidence(feat0, feat1)[0]
        graph = OnnxLoFTR(model)._confidence(feat0, feat1)
    assert (expected == 0).any() and (expected > 0.2).sum() > 10  # the prefilter and real matches both occur
    torch.testing.assert_close(graph, expected, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ the matcher
def test_make_matcher_builds_the_onnx_backend(outdoor: tuple[LoFTR, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = outdoor
    matcher = make_matcher("loftr", weights=str(path), resize=320, device="cpu")
    assert isinstance(matcher, OnnxLoFTRMatcher) and matcher.name == "loftr"
    described = matcher.describe()
    assert described["backend"] == "onnxruntime" and described["weights_sha256"] == state_dict_digest(model)
    torch_matcher = LoFTRMatcher(model, resize=320, device="cpu")
    for size in ((640, 480), (1296, 968), (500, 333), (47, 40)):
        assert matcher.coarse_grid(size) == torch_matcher.coarse_grid(size)
    monkeypatch.setenv("LOFTR_WEIGHTS", str(path))  # the environment variable may name an export too
    assert isinstance(make_matcher("loftr", device="cpu"), OnnxLoFTRMatcher)
    # resized images: the same matches in original pixels as the torch matcher
    image0 = textured_image(300, 400, seed=11)
    image1 = warped(image0, (400, 300))
    assert_same_matches(torch_matcher.match(image0, image1), matcher.match(image0, image1))
    prepared = [matcher.prepare(image) for image in (image0, image1)]
    assert_same_matches(torch_matcher.match(image0, image1), matcher.match_prepared_batch([tuple(prepared)])[0])


# ------------------------------------------------------------------------------------------------ real pairs
def _pairs(root: Path, names: list[str], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(read_gray(root / a), read_gray(root / b)) for a, b in zip(names[:count], names[1 : count + 1])]


def _check_real(compact: Path, pairs: list[tuple[np.ndarray, np.ndarray]], sizes: tuple[int, ...]) -> None:
    onnx_matcher = OnnxLoFTRMatcher(compact, device="cpu")
    torch_matcher = LoFTRMatcher("loftr-compact", device="cpu")
    worst, total = 0.0, 0
    for size in sizes:  # two image sizes from one exported file
        onnx_matcher.resize = torch_matcher.resize = size
        for image0, image1 in pairs:
            reference = torch_matcher.match(image0, image1)
            worst = max(worst, assert_same_matches(reference, onnx_matcher.match(image0, image1)))
            total += len(reference)
    assert total > 100
    print(f"{total} matches, identical sets, max keypoint difference {worst:.2e} px")


def test_compact_temple_ring_pairs_match_torch(compact: Path) -> None:
    images = data_path("temple_ring", "images")
    names = sorted(p.name for p in images.glob("*.png"))
    _check_real(compact, _pairs(images, names[::4], 5), (640, 320))


def test_compact_real_pair_both_fine_branches_match_torch(compact: Path) -> None:
    """loftr-compact on a scannet pair at 320x240: a low threshold gives enough matches for the whole fine map, the
    default one few enough for the receptive fields; each equals torch's."""
    root = data_path("scannet_sample")
    first = (root / "pairs_with_gt.txt").read_text().split("\n")[0].split()
    image0, image1 = (read_gray(root / "images" / name) for name in first[:2])
    model = LoFTRMatcher("loftr-compact", device="cpu").model
    taken = {}
    for threshold in (0.0, 0.2):
        matcher = LoFTRMatcher(model, resize=320, device="cpu", match_threshold=threshold)
        reference = matcher.match(image0, image1)
        result = OnnxLoFTRMatcher(compact, resize=320, device="cpu", match_threshold=threshold).match(image0, image1)
        worst = assert_same_matches(reference, result)
        height, width = matcher.prepare(image0).encoded.image_size  # both images are 1296x968
        taken[fine_branch(model, len(reference), (width, height))] = (threshold, len(reference), worst)
    assert set(taken) == {"windows", "full"}, taken
    print(taken)


def test_compact_scannet_pairs_match_torch(compact: Path) -> None:
    root = data_path("scannet_sample")
    lines = (root / "pairs_with_gt.txt").read_text().split("\n")
    pairs = [
        (read_gray(root / "images" / line.split()[0]), read_gray(root / "images" / line.split()[1]))
        for line in lines
        if line.strip()
    ][:5]
    _check_real(compact, pairs, (640, 320))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_files_are_one_user_error_line(tmp_path: Path, compact: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a model" * 50)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(compact.read_bytes()[:100_000])
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "g", [tensor("x", onnx.TensorProto.FLOAT, [1])], [tensor("y", onnx.TensorProto.FLOAT, [1])]
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    cases = [
        (garbage, {}, "corrupt or not an ONNX model"),
        (truncated, {}, "corrupt or not an ONNX model"),
        (tmp_path / "missing.onnx", {}, "does not exist"),
        (foreign, {}, "not a LoFTR export"),
        (compact, {"preset": "outdoor_ds"}, "exported from LoFTR preset compact, not outdoor_ds"),
        (compact, {"amp": "bf16"}, "runs in float32"),
    ]
    for path, options, expected in cases:
        with pytest.raises(UserError, match=expected) as caught:
            make_matcher("loftr", weights=str(path), device="cpu", **options)
        message = str(caught.value)
        assert "\n" not in message and str(path.name if "amp" not in options else "amp") in message
        if "amp" not in options:
            assert "export_onnx" in message  # says how to make a good file
    OnnxLoFTRMatcher(compact, preset="compact", device="cpu")  # the right preset is accepted


def test_clis_exit_2_with_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), (textured_image(64, 64, seed=1) * 255).astype(np.uint8))
    commands = [
        [
            sys.executable,
            "-m",
            "matchers.match",
            str(image),
            str(image),
            "--weights",
            str(garbage),
            "--out",
            str(tmp_path / "viz.png"),
        ],
        [
            sys.executable,
            "-m",
            "matchers.loftr.export_onnx",
            "--weights",
            str(tmp_path / "none.ckpt"),
            "--output",
            str(tmp_path / "x.onnx"),
        ],
        [
            sys.executable,
            "-m",
            "matchers.loftr.export_onnx",
            "--weights",
            "loftr-compact",
            "--output",
            str(tmp_path / "x.bin"),
        ],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not (tmp_path / "x.onnx").exists()
