"""One device resolver for every step that runs torch: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

Returns the device as a string (``torch.device(name)`` takes it); torch is imported only when a GPU
could be involved, so SIFT-only runs stay light.
"""

from __future__ import annotations

from core.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: object = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cuda' or 'cuda:N' without one is a UserError.

    A ``torch.device`` is accepted too (its string form is returned).
    """
    name = str(device).strip().lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "cpu":
        return "cpu"
    import torch  # only when a GPU could be involved

    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise UserError(
            f"device {device!r} requested but no CUDA GPU is usable by this torch build "
            f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch (see README)"
        )
    if name.startswith("cuda:"):
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise UserError(f"unknown device {device!r}; write cuda:N with a GPU number") from None
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return name
