"""The shipped ``loftr-compact`` weights really match: homographies of the three Sacre Coeur photos held out of its
training (``matchers/loftr/weights/MODEL_CARD.md``), checked against the true homography."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacre_coeur" / "images"
HELD_OUT = ("60584745_2207571072", "71295362_4051449754", "93341989_396310999")


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/sacre_coeur is not present")
def test_loftr_compact_on_held_out_homographies(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from matchers.factory import make_matcher
    from recipes.eval_pairs import EVAL_HOMOGRAPHY, evaluate_homographies, make_homography_pairs
    from recipes.training.data import HomographyConfig

    for name in HELD_OUT:
        shutil.copy(DATA / f"{name}.jpg", tmp_path / f"{name}.jpg")
    config = HomographyConfig(**{**EVAL_HOMOGRAPHY.__dict__, "height": 240, "width": 320})
    pairs = make_homography_pairs(tmp_path, 1, 12345, config)
    matcher = make_matcher("loftr", weights="loftr-compact", resize=320, device="cpu")
    result = evaluate_homographies(matcher, pairs, precision_px=8.0, progress=False)
    assert result["pairs"] == 3
    assert result["min_matches"] >= 150, result
    assert result["precision"] >= 0.9, result  # keypoint 1 within one coarse cell of the true position
    assert result["median_corner_error_px"] < 3.0, result
