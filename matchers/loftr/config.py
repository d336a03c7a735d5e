"""Typed configuration of the LoFTR model, with one preset per official checkpoint.

The field names follow the official yacs config (``LOFTR.RESNETFPN``, ``LOFTR.COARSE``, ``LOFTR.MATCH_COARSE``,
``LOFTR.FINE``) in lower case, so a value can be looked up in the paper's code by name. Every dimension is a field,
so smaller variants (the ``compact`` preset) use the same modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

AttentionType = Literal["linear", "full"]
MatchType = Literal["dual_softmax", "sinkhorn"]
LayerName = Literal["self", "cross"]

#: pixel stride of the coarse (1/8) and fine (1/2) feature maps of the (official) 3-stage ResNetFPN_8_2 backbone;
#: a 4-stage backbone (the coarse-only ``student`` preset) has coarse stride 16 (:attr:`LoFTRConfig.coarse_stride`)
COARSE_STRIDE = 8
FINE_STRIDE = 2


@dataclass(frozen=True)
class BackboneConfig:
    """ResNetFPN_8_2: a 7x7/2 stem with ``initial_dim`` channels, then three stages at 1/2, 1/4, 1/8.

    Four ``block_dims`` add a fourth stage at 1/16 (coarse stride 16, as in Coarse_LoFTR_TRT); that backbone has
    no FPN and no fine map, so it is only valid with ``FineConfig(enabled=False)``.
    """

    initial_dim: int = 128
    block_dims: tuple[int, ...] = (128, 196, 256)


@dataclass(frozen=True)
class CoarseConfig:
    """The coarse (1/8) transformer and its position encoding."""

    d_model: int = 256
    #: kept for parity with the official config; the official layer (and this one) always uses an MLP of 2*d_model
    d_ffn: int = 256
    nhead: int = 8
    layer_names: tuple[LayerName, ...] = ("self", "cross") * 4
    attention: AttentionType = "linear"
    #: False reproduces the position-encoding bug every released checkpoint except indoor_ds_new was trained with
    temp_bug_fix: bool = False


@dataclass(frozen=True)
class MatchingConfig:
    """Coarse matching: confidence matrix (dual-softmax or optimal transport) and match selection."""

    thr: float = 0.2
    border_rm: int = 2
    match_type: MatchType = "dual_softmax"
    dsmax_temperature: float = 0.1
    skh_iters: int = 3
    skh_init_bin_score: float = 1.0
    #: drop rows/columns whose best entry is the dustbin (official default False, kornia's True)
    skh_prefilter: bool = False


@dataclass(frozen=True)
class FineConfig:
    """The fine (1/2) transformer on ``window`` x ``window`` crops around each coarse match."""

    d_model: int = 128
    d_ffn: int = 128
    nhead: int = 8
    layer_names: tuple[LayerName, ...] = ("self", "cross")
    attention: AttentionType = "linear"
    window: int = 5
    concat_coarse_feat: bool = True
    #: False: a coarse-only model (no fine FPN branch, no fine transformer); matches stay on coarse cell centres
    enabled: bool = True


@dataclass(frozen=True)
class LoFTRConfig:
    """Complete model configuration. Build one with :meth:`preset` and adjust with :meth:`replace`."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    fine: FineConfig = field(default_factory=FineConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def coarse_stride(self) -> int:
        """Pixel stride of the coarse map: 8 for the 3-stage backbone, 16 for the 4-stage one."""
        return 2 ** len(self.backbone.block_dims)

    # -------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "LoFTRConfig":
        """The configuration of an official checkpoint (or of the project's compact model).

        ``outdoor_ds``, ``indoor_ds``: dual-softmax, buggy position encoding (as released);
        ``indoor_ds_new``: dual-softmax, fixed position encoding; ``outdoor_ot``, ``indoor_ot``: optimal transport
        (official eval settings: 3 Sinkhorn iterations, no dustbin prefilter); ``compact``: a smaller model
        (64/96/128 backbone, d_model 128 / 64) trained by this project, with the fixed position encoding;
        ``student``: a coarse-only model after Coarse_LoFTR_TRT (backbone 8/16/32/32 with coarse stride 16,
        d_model 32, 1 head, [self, cross] x 2, no fine stage), distilled from a teacher by ``recipes.distill``.
        """
        key = name.lower().replace("-", "_")
        aliases = {
            "outdoor": "outdoor_ds",
            "indoor": "indoor_ds",
            "indoor_new": "indoor_ds_new",
            "loftr_compact": "compact",
            "loftr_student": "student",
        }
        key = aliases.get(key, key)
        if key in ("outdoor_ds", "indoor_ds"):
            return cls()
        if key == "indoor_ds_new":
            return cls(coarse=CoarseConfig(temp_bug_fix=True))
        if key in ("outdoor_ot", "indoor_ot"):
            return cls(matching=MatchingConfig(match_type="sinkhorn"))
        if key == "compact":
            return cls(
                backbone=BackboneConfig(initial_dim=64, block_dims=(64, 96, 128)),
                coarse=CoarseConfig(
                    d_model=128, d_ffn=128, nhead=4, layer_names=("self", "cross") * 2, temp_bug_fix=True
                ),
                fine=FineConfig(d_model=64, d_ffn=64, nhead=4),
            )
        if key == "student":
            return cls(
                backbone=BackboneConfig(initial_dim=8, block_dims=(8, 16, 32, 32)),
                coarse=CoarseConfig(
                    d_model=32, d_ffn=32, nhead=1, layer_names=("self", "cross") * 2, temp_bug_fix=True
                ),
                matching=MatchingConfig(thr=0.1, border_rm=1),
                fine=FineConfig(enabled=False),
            )
        raise ValueError(f"unknown LoFTR preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")

    # -------------------------------------------------------------------------------------------- helpers
    def replace(self, **sections: Any) -> "LoFTRConfig":
        """A copy with some fields changed: ``cfg.replace(matching={"thr": 0.1}, coarse={"temp_bug_fix": True})``."""
        updates: dict[str, Any] = {}
        for section, changes in sections.items():
            current = getattr(self, section)
            updates[section] = changes if dataclasses.is_dataclass(changes) else dataclasses.replace(current, **changes)
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples) that ``torch.load(weights_only=True)`` can read back."""
        return {
            name: {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, name)).items()
            }
            for name in ("backbone", "coarse", "matching", "fine")
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoFTRConfig":
        """Inverse of :meth:`to_dict`; unknown fields raise ``TypeError``."""
        sections = {"backbone": BackboneConfig, "coarse": CoarseConfig, "matching": MatchingConfig, "fine": FineConfig}
        kwargs = {}
        for name, section_cls in sections.items():
            values = dict(data.get(name, {}))
            for key, value in values.items():
                if isinstance(value, list):
                    values[key] = tuple(value)
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    def validate(self) -> None:
        """Check that the dimensions fit together (raises ``ValueError``)."""
        dims = self.backbone.block_dims
        problems = []
        if len(dims) not in (3, 4):
            problems.append(f"backbone.block_dims needs 3 values (4 for a coarse-only 1/16 model), got {dims}")
        else:
            if self.coarse.d_model != dims[-1]:
                problems.append(f"coarse.d_model {self.coarse.d_model} must equal backbone.block_dims[-1] {dims[-1]}")
            if self.fine.enabled and len(dims) != 3:
                problems.append(f"a fine stage needs the 3-stage (1/8) backbone, got block_dims {dims}")
            if self.fine.enabled and self.fine.d_model != dims[0]:
                problems.append(f"fine.d_model {self.fine.d_model} must equal backbone.block_dims[0] {dims[0]}")
        sections = (("coarse", self.coarse), ("fine", self.fine)) if self.fine.enabled else (("coarse", self.coarse),)
        for name, section in sections:
            if section.d_model % section.nhead:
                problems.append(f"{name}.d_model {section.d_model} is not divisible by nhead {section.nhead}")
            if section.attention not in ("linear", "full"):
                problems.append(f"{name}.attention must be 'linear' or 'full', got {section.attention!r}")
            if any(n not in ("self", "cross") for n in section.layer_names):
                problems.append(f"{name}.layer_names may only hold 'self'/'cross', got {section.layer_names}")
        if self.coarse.d_model % 4:
            problems.append(f"coarse.d_model {self.coarse.d_model} must be divisible by 4 (position encoding)")
        if self.matching.match_type not in ("dual_softmax", "sinkhorn"):
            problems.append(
                f"matching.match_type must be 'dual_softmax' or 'sinkhorn', got {self.matching.match_type!r}"
            )
        if self.fine.window % 2 != 1:
            problems.append(f"fine.window must be odd, got {self.fine.window}")
        if problems:
            raise ValueError("invalid LoFTR config: " + "; ".join(problems))


PRESET_NAMES: tuple[str, ...] = (
    "outdoor_ds",
    "indoor_ds",
    "indoor_ds_new",
    "outdoor_ot",
    "indoor_ot",
    "compact",
    "student",
)
