"""Every matcher behind one interface: two images in, keypoints0/keypoints1/scores out.

``make_matcher("loftr" | "sift", ...)`` builds one; see :mod:`matchers.base` for the interface.
Importing this package is light: torch and the LoFTR model load only when a LoFTR matcher is built.
"""

from core.device import resolve_device
from core.errors import UserError

from .base import Matcher, Matches
from .factory import make_matcher

__all__ = ["Matcher", "Matches", "UserError", "make_matcher", "resolve_device"]
