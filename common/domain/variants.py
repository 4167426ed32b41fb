"""Model variants: fal's model names -> checkpoint, backbone, patch order, resolutions, queue. Pure data
(no torch), shared by the gateway, producer and worker; `variant_overrides` adds or changes entries."""

from __future__ import annotations

from typing import Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field

Endpoint = Literal["v1", "v2"]
PatchOrder = Literal["einops", "legacy"]


def is_endpoint(name: str) -> TypeGuard[Endpoint]:
    """A fal endpoint version this service serves."""
    return name in ("v1", "v2")


RES_1024 = "1024x1024"
RES_2048 = "2048x2048"
RES_2304 = "2304x2304"


class VariantSpec(BaseModel):
    """One servable BiRefNet checkpoint and how to run it."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Stable slug; also names the Celery queue (birefnet.<id>).")
    fal_names: dict[Endpoint, str] = Field(
        default_factory=dict, description="fal `model` enum value per endpoint version."
    )
    weights: str = Field(
        description="Checkpoint source: hf://<repo>@<revision>/<file>, a https URL, s3://bucket/key, a local "
        "path, or 'recipe' (untrained weights made from the recipe, never a trained model)."
    )
    backbone: str = "swin_v1_l"
    patch_order: PatchOrder = "legacy"
    default_resolution: str = RES_1024
    allowed_resolutions: tuple[str, ...] = (RES_1024, RES_2048)
    note: str = ""
    time_limit: float | None = Field(
        None, gt=0, description="Run-time limit (s) of this variant's jobs; None: the job_time_limit setting."
    )

    @property
    def queue(self) -> str:
        return f"birefnet.{self.id}"


# Checkpoints published before 2024-11-05 use the legacy patch channel order, later ones einops.
# Hugging Face sources are pinned to a commit of the model repo (hf://<repo>@<commit>/<file>), so a
# re-upload cannot silently change what a variant serves. The hashes are the repos' commits as of
# Aug 2026, as recorded (and agreeing) in several public projects that pin them; bump them
# deliberately, after checking the new weights (e.g. with `python -m worker.patch_order_check`).
_HF = "hf://ZhengPeng7"

BUILTIN_VARIANTS: tuple[VariantSpec, ...] = (
    # fal names old GitHub-release .pth files for v1 (BiRefNet-DIS_ep580.pth, BiRefNet-massive-epoch_240.pth,
    # BiRefNet-portrait-TR_P3M_10k-epoch_120.pth). They are not in the v1 release and predate the current
    # architecture, so v1 serves the published checkpoints trained on the same data. Operators with the
    # original files can point `weights` at them (BIREFNET_VARIANT_OVERRIDES).
    VariantSpec(
        id="v1-general-light",
        fal_names={"v1": "General Use (Light)"},
        # BiRefNet-DIS5K: the commit a public project pins (its only public record); same file layout.
        weights=f"{_HF}/BiRefNet-DIS5K@8d0803f8dee999ceb31c20092bb53b6021aeec13/model.safetensors",
        note="v1 endpoint: DIS5K-trained BiRefNet (fal names BiRefNet-DIS_ep580.pth).",
    ),
    VariantSpec(
        id="v1-general-heavy",
        fal_names={"v1": "General Use (Heavy)"},
        # The massive-set checkpoint (GitHub release BiRefNet-massive-TR_DIS5K_TR_TEs) is the Hugging Face
        # repo BiRefNet-DIS5K-TR_TEs; commit as a public project pinning it records (alongside the same
        # BiRefNet commit as general-light's).
        weights=f"{_HF}/BiRefNet-DIS5K-TR_TEs@487f440314ea7ab8ea7d184861953a4010b55587/model.safetensors",
        note="v1 endpoint: BiRefNet trained on the massive mixed set (fal names "
        "BiRefNet-massive-epoch_240.pth).",
    ),
    VariantSpec(
        id="v1-portrait",
        fal_names={"v1": "Portrait"},
        weights=f"{_HF}/BiRefNet-portrait@ecdeb6240ef23557dbd48ff27c59c1a88cbcb755/model.safetensors",
        note="v1 endpoint: the portrait model trained on P3M-10k (fal names "
        "BiRefNet-portrait-TR_P3M_10k-epoch_120.pth).",
    ),
    VariantSpec(
        id="general-light",
        fal_names={"v2": "General Use (Light)"},
        weights=f"{_HF}/BiRefNet@e2bf8e4460fc8fa32bba5ea4d94b3233d367b0e4/model.safetensors",
    ),
    VariantSpec(
        id="general-light-2k",
        fal_names={"v2": "General Use (Light 2K)"},
        weights=f"{_HF}/BiRefNet_lite-2K@67d658fa863b1e716c3854270645e68860007d0e/model.safetensors",
        backbone="swin_v1_t",
    ),
    VariantSpec(
        id="general-heavy",
        fal_names={"v2": "General Use (Heavy)"},
        # fal documents BiRefNet_lite (the Swin-T model) for "Heavy"; we follow fal verbatim.
        weights=f"{_HF}/BiRefNet_lite@7838f1c3472f827cd8ce13ab5ccc2ce48077360f/model.safetensors",
        backbone="swin_v1_t",
        note="Mapped as fal documents it (BiRefNet_lite, Swin-T), although the name suggests the larger "
        "model.",
    ),
    VariantSpec(
        id="matting",
        fal_names={"v2": "Matting"},
        weights=f"{_HF}/BiRefNet-matting@57f9f68b43ba337c75762b14cf3075d659007268/model.safetensors",
    ),
    VariantSpec(
        id="portrait",
        fal_names={"v2": "Portrait"},
        weights=f"{_HF}/BiRefNet-portrait@ecdeb6240ef23557dbd48ff27c59c1a88cbcb755/model.safetensors",
    ),
    VariantSpec(
        id="general-dynamic",
        fal_names={"v2": "General Use (Dynamic)"},
        weights=f"{_HF}/BiRefNet_dynamic@280306042f57b7a33854319da62fd86aaa89ec4c/model.safetensors",
        patch_order="einops",
        allowed_resolutions=(RES_1024, RES_2048, RES_2304),
    ),
    VariantSpec(
        id="hr",
        weights=f"{_HF}/BiRefNet_HR@a7a562f6fd16021180f2f4348f4de003a2d3d1e1/model.safetensors",
        patch_order="einops",
        default_resolution=RES_2048,
        note="Not a fal model name; reachable by variant id (S3 metadata model=hr).",
    ),
    VariantSpec(
        id="hr-matting",
        weights=f"{_HF}/BiRefNet_HR-matting@5d6b6f8adcb5b417c871b1d84ceaae9871355b7f/model.safetensors",
        patch_order="einops",
        default_resolution=RES_2048,
        note="Not a fal model name; reachable by variant id (S3 metadata model=hr-matting).",
    ),
)

DEFAULT_MODEL_NAME = "General Use (Light)"


class VariantRegistry:
    """Looks variants up by id or by (endpoint, fal model name)."""

    def __init__(self, variants: tuple[VariantSpec, ...] | list[VariantSpec]):
        self._by_id = {v.id: v for v in variants}

    @classmethod
    def with_overrides(cls, overrides: dict[str, dict] | None = None) -> VariantRegistry:
        merged = {v.id: v for v in BUILTIN_VARIANTS}
        for variant_id, fields in (overrides or {}).items():
            base = merged.get(variant_id)
            data = {**(base.model_dump() if base else {}), **fields, "id": variant_id}
            merged[variant_id] = VariantSpec.model_validate(data)
        return cls(list(merged.values()))

    def __iter__(self):
        return iter(self._by_id.values())

    def get(self, variant_id: str) -> VariantSpec:
        try:
            return self._by_id[variant_id]
        except KeyError:
            raise KeyError(f"unknown model variant {variant_id!r}; known: {sorted(self._by_id)}") from None

    def model_names(self, endpoint: Endpoint) -> list[str]:
        return [v.fal_names[endpoint] for v in self._by_id.values() if endpoint in v.fal_names]

    def by_model_name(self, endpoint: Endpoint, name: str) -> VariantSpec:
        for v in self._by_id.values():
            if v.fal_names.get(endpoint) == name:
                return v
        raise KeyError(f"unknown model {name!r} for {endpoint}; expected one of {self.model_names(endpoint)}")

    def resolve(self, endpoint: Endpoint, name_or_id: str) -> VariantSpec:
        """A fal model name for the endpoint, or a variant id (S3 metadata may use either)."""
        if name_or_id in self._by_id:
            return self._by_id[name_or_id]
        return self.by_model_name(endpoint, name_or_id)
