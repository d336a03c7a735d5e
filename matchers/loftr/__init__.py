"""LoFTR: detector-free local feature matching with transformers (Sun et al., CVPR 2021).

This project's own implementation; its state-dict keys equal the official and kornia ones, so their checkpoints
load unchanged::

    from matchers.loftr import LoFTR, LoFTRConfig, load_pretrained, LoFTRMatcher
    model = LoFTR(LoFTRConfig.preset("outdoor_ds")).eval()
    model.load_state_dict(state_dict)
    out = model.match(image0, image1)   # keypoints0, keypoints1, confidence (original pixel coordinates)

See :mod:`matchers.loftr.model` for the coordinate convention and the batched API, and
:mod:`matchers.loftr.weights` for checkpoint names, download and the ``LOFTR_WEIGHTS`` variable.
"""

from .config import LoFTRConfig
from .matcher import LoFTRMatcher
from .model import EncodedImage, LoFTR, collate
from .weights import WEIGHTS_ENV, load_pretrained, save_checkpoint

__all__ = [
    "LoFTR",
    "LoFTRConfig",
    "LoFTRMatcher",
    "EncodedImage",
    "collate",
    "load_pretrained",
    "save_checkpoint",
    "WEIGHTS_ENV",
]
