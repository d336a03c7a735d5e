"""Two-view epipolar geometry shared by every step that verifies matches (OpenCV's MAGSAC++, ``cv2.USAC_MAGSAC``)."""

from __future__ import annotations

import cv2
import numpy as np


def fundamental_magsac(
    points0: np.ndarray, points1: np.ndarray, threshold: float, confidence: float = 0.999, max_iterations: int = 10000
) -> tuple[np.ndarray | None, np.ndarray]:
    """A fundamental matrix fitted to (N, 2) correspondences by MAGSAC++ at ``threshold`` px, and its (N,) bool
    inlier mask; (None, all False) with fewer than 8 points or when no model is found (degenerate input)."""
    none = np.zeros(len(points0), bool)
    if len(points0) < 8:
        return None, none
    try:
        matrix, mask = cv2.findFundamentalMat(
            np.asarray(points0, np.float64),
            np.asarray(points1, np.float64),
            cv2.USAC_MAGSAC,
            threshold,
            confidence,
            max_iterations,
        )
    except cv2.error:  # degenerate input (e.g. all points identical)
        return None, none
    if matrix is None or mask is None or matrix.shape != (3, 3):
        return None, none
    return matrix, mask.reshape(-1).astype(bool)


__all__ = ["fundamental_magsac"]
