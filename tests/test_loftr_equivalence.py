"""Numerical equivalence of matchers.loftr.LoFTR with kornia.feature.LoFTR (run with ``pytest -k equivalence``).

Both models get the same seeded random state dict (kornia's random init with randomised BatchNorm running
statistics, so the BN folding is exercised too). The seed was picked so that the random model yields many
matches on these images (random weights give few mutual nearest neighbours for some seeds). The coarse threshold is 0, so every mutual nearest
neighbour off the border is a match and no match can flip on a threshold. Images are generated (random shapes
on smooth noise, and a homography-warped copy), so the tests never skip.
"""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch

from matchers.loftr import LoFTR, LoFTRConfig
from matchers.loftr.position_encoding import position_encoding

kornia_loftr = pytest.importorskip("kornia.feature.loftr.loftr")

KEYPOINT_TOL = 1e-3  # px
CONFIDENCE_TOL = 1e-4
MIN_MATCHES = 50
SEED = 3  # the random model must still give enough matches for the comparison to mean something


def textured_image(height: int, width: int, seed: int, shapes: int = 120) -> np.ndarray:
    """Random filled circles/rectangles over smooth noise, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 16 + 1, width // 16 + 1)).astype(np.float32)
    image = 0.5 * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(shapes):
        value = float(rng.random())
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(3, 25)), value, -1)
        else:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(4, 40)), y + int(rng.integers(4, 40))), value, -1)
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    return ((image - image.min()) / (image.max() - image.min())).astype(np.float32)


def warped(image: np.ndarray, size: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """A mild perspective warp of ``image`` into an image of ``size`` (W, H)."""
    homography = np.array([[1.05 * scale, 0.05, -6.0], [-0.04, 1.0 * scale, 4.0], [1e-4, 0.0, 1.0]])
    return cv2.warpPerspective(image, homography, size, flags=cv2.INTER_LINEAR).astype(np.float32)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image)[None, None]


def perturb(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random BatchNorm running statistics (kornia's init leaves them at 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        if key.endswith("running_mean"):
            value = 0.05 * torch.randn(value.shape, generator=gen)
        elif key.endswith("running_var"):
            value = 0.8 + 0.4 * torch.rand(value.shape, generator=gen)
        out[key] = value.clone()
    return out


def make_pair(temp_bug_fix: bool = False, attention: str = "linear") -> tuple[torch.nn.Module, LoFTR]:
    """kornia's LoFTR and ours with one seeded random state dict, threshold 0."""
    cfg = copy.deepcopy(kornia_loftr.default_cfg)
    cfg["match_coarse"]["thr"] = 0.0
    cfg["coarse"]["temp_bug_fix"] = temp_bug_fix
    cfg["coarse"]["attention"] = attention
    torch.manual_seed(SEED)
    reference = kornia_loftr.LoFTR(pretrained=None, config=cfg)
    reference.load_state_dict(perturb(reference.state_dict(), seed=1))
    reference.eval()
    config = LoFTRConfig.preset("indoor_ds_new" if temp_bug_fix else "outdoor_ds").replace(
        matching={"thr": 0.0}, coarse={"attention": attention}
    )
    ours = LoFTR(config).eval()
    ours.load_state_dict(reference.state_dict())  # strict: every key and shape must agree
    return reference, ours


def assert_same_matches(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, float]:
    """Same match set (keyed by batch index and image-0 grid point), keypoints and confidences within tolerance."""

    def keyed(out: dict[str, torch.Tensor]) -> dict[tuple[int, int, int], int]:
        kpts0 = out["keypoints0"].round().long().tolist()
        return {(int(b), x, y): n for n, (b, (x, y)) in enumerate(zip(out["batch_indexes"].tolist(), kpts0))}

    ref_keys, our_keys = keyed(ref), keyed(ours)
    assert len(ref_keys) == len(ref["keypoints0"]), "kornia returned duplicate image-0 keypoints"
    assert set(ref_keys) == set(our_keys), (
        f"match sets differ: {len(set(ref_keys) - set(our_keys))} only in kornia, "
        f"{len(set(our_keys) - set(ref_keys))} only in ours"
    )
    order_ref = torch.tensor([ref_keys[k] for k in sorted(ref_keys)], dtype=torch.long)
    order_ours = torch.tensor([our_keys[k] for k in sorted(ref_keys)], dtype=torch.long)
    kp0 = (ref["keypoints0"][order_ref] - ours["keypoints0"][order_ours]).abs().max().item()
    kp1 = (ref["keypoints1"][order_ref] - ours["keypoints1"][order_ours]).abs().max().item()
    conf = (ref["confidence"][order_ref] - ours["confidence"][order_ours]).abs().max().item()
    assert kp0 <= KEYPOINT_TOL and kp1 <= KEYPOINT_TOL, f"keypoints differ by {kp0}, {kp1} px"
    assert conf <= CONFIDENCE_TOL, f"confidences differ by {conf}"
    return {"matches": len(ref_keys), "keypoints": max(kp0, kp1), "confidence": conf}


@pytest.fixture(scope="module")
def default_pair() -> tuple[torch.nn.Module, LoFTR]:
    return make_pair()


def run_both(
    reference: torch.nn.Module, ours: LoFTR, image0: np.ndarray, image1: np.ndarray
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    t0, t1 = as_tensor(image0), as_tensor(image1)
    with torch.inference_mode():
        ref = reference({"image0": t0, "image1": t1})
        out = ours.match(t0, t1)
    return ref, out


def test_equivalence_320x240(default_pair) -> None:
    """(a) same-size pair: kornia runs one batched backbone pass, ours one pass per image (BatchNorm in eval)."""
    reference, ours = default_pair
    image0 = textured_image(240, 320, seed=1)
    ref, out = run_both(reference, ours, image0, warped(image0, (320, 240)))
    stats = assert_same_matches(ref, out)
    assert stats["matches"] >= MIN_MATCHES, stats
    print("equivalence 320x240:", stats)


def test_equivalence_sizes_not_multiple_of_8(default_pair) -> None:
    """(b) two images of different sizes, neither side a multiple of 8."""
    reference, ours = default_pair
    image0 = textured_image(237, 301, seed=2)
    image1 = warped(image0, (250, 203), scale=0.93)
    ref, out = run_both(reference, ours, image0, image1)
    stats = assert_same_matches(ref, out)
    assert stats["matches"] >= MIN_MATCHES, stats
    # keypoints lie on image 0's 8-pixel grid, inside both images
    assert torch.equal(out["keypoints0"], (out["keypoints0"] / 8).round() * 8)
    assert (out["keypoints1"][:, 0] < 250).all() and (out["keypoints1"][:, 1] < 203).all()
    print("equivalence 301x237 vs 250x203:", stats)


@pytest.mark.parametrize("temp_bug_fix", [True, False])
def test_equivalence_temp_bug_fix(temp_bug_fix: bool) -> None:
    """(c) both position encodings (the flag changes the encoding, so both settings are really exercised)."""
    reference, ours = make_pair(temp_bug_fix=temp_bug_fix)
    other = position_encoding(256, 18, 24, temp_bug_fix=not temp_bug_fix)
    assert not torch.allclose(ours.pos_encoding.encoding(18, 24, torch.device("cpu")), other, atol=1e-3)
    image0 = textured_image(144, 192, seed=3)
    ref, out = run_both(reference, ours, image0, warped(image0, (192, 144)))
    stats = assert_same_matches(ref, out)
    assert stats["matches"] >= MIN_MATCHES, stats
    print(f"equivalence temp_bug_fix={temp_bug_fix}:", stats)


def test_equivalence_full_attention() -> None:
    """'full' softmax attention (scaled_dot_product_attention here, einsum in kornia)."""
    reference, ours = make_pair(attention="full")
    image0 = textured_image(120, 160, seed=4, shapes=40)
    ref, out = run_both(reference, ours, image0, warped(image0, (160, 120)))
    stats = assert_same_matches(ref, out)
    assert stats["matches"] >= 10, stats
    print("equivalence full attention:", stats)


def test_equivalence_batched_forward(default_pair) -> None:
    """A batch of two same-size pairs through forward() equals kornia's batched forward."""
    reference, ours = default_pair
    a = textured_image(120, 176, seed=5)
    b = textured_image(120, 176, seed=6)
    image0 = torch.cat([as_tensor(a), as_tensor(b)])
    image1 = torch.cat([as_tensor(warped(a, (176, 120))), as_tensor(warped(b, (176, 120)))])
    with torch.inference_mode():
        ref = reference({"image0": image0, "image1": image1})
        out = ours(image0, image1)
    stats = assert_same_matches(ref, out)
    assert set(out["batch_indexes"].tolist()) == {0, 1}
    print("equivalence batched:", stats)
