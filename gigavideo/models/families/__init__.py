"""Model families: one adapter per family owns what differs between them (gigavideo/models/families/wan21.py
says what). `model.family` names the adapter; a family outside this package plugs in as
"module:Class" in its preset, so adding one is a new file plus a preset."""

from __future__ import annotations

from gigavideo.registry import resolve

FAMILIES = {
    "wan2.1": "gigavideo.models.families.wan21:Wan21",
    "wan2.2-ti2v": "gigavideo.models.families.wan22_ti2v:Wan22TI2V",
    "wan2.2-a14b": "gigavideo.models.families.wan22_a14b:Wan22A14B",
}


def family_for(model_cfg: dict):
    """The adapter of model.family, bound to this [model] section."""
    return resolve(FAMILIES, model_cfg.get("family", "wan2.1"), "model.family")(model_cfg)
