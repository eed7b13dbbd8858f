"""Loading DINO weights from the reference implementation's files and ours (loading only).

Accepted layouts (facebookresearch/dino and this pipeline; `load_backbone`):

- a backbone-only state dict, as the reference publishes (`dino_deitsmall16_pretrain.pth`: keys
  `cls_token`, `pos_embed`, `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...,
  `norm.weight`; for resnet50 torchvision's keys without `fc`);
- a training checkpoint `{"student": ..., "teacher": ..., "optimizer": ..., "epoch": ...}` whose
  dicts are MultiCropWrapper state dicts: keys `backbone.*` and `head.*`, the student's (and a
  DDP-wrapped teacher's) also prefixed `module.`; our training checkpoints use the same layout;
- `{"teacher_backbone": state_dict}` (or `"student_backbone"`), our exported backbone;
- any of these wrapped in `{"state_dict": ...}` or `{"model": ...}`.

Nothing is loaded partially and nothing is guessed: a key the model lacks, a key the file lacks
or a shape that differs raises `CheckpointError` naming the file and the keys. The one adaptation
is the position embedding: when the file's patch grid differs from the model's (trained at 224,
built for another `img_size`), it is resized with the reference's bicubic interpolation. A file
that says what it holds (ours: the params' `model` section; the reference's: its argparse `args`)
must say the requested arch and patch size.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from stages.cli import StageError
from stages.dino.backbones import backbone_kwargs, build_backbone, interpolate_pos_embed

if TYPE_CHECKING:
    from stages.params import Params

logger = logging.getLogger(__name__)

#: Leading key prefixes added by wrappers, stripped everywhere: DistributedDataParallel's and
#: torch.compile's.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: Common wrappers around a whole checkpoint or state dict ({"state_dict": ...}, {"model": ...}).
_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model")
#: Weight-norm parameter names: torch.nn.utils.weight_norm (the reference's) <-> parametrizations.
_WEIGHT_NORM_NAMES: dict[str, str] = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
_SHOWN_KEYS = 12
#: Names of the reference's early releases (main_dino.py called its ViTs deit_* at first).
_ARCH_ALIASES: dict[str, str] = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}


class CheckpointError(StageError):
    """A checkpoint cannot be loaded as asked; the message names the file and the keys."""


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def clean_state_dict(state_dict: Mapping[str, Any], prefix: str | None = None) -> dict[str, Any]:
    """Strip wrapper prefixes and optionally select one sub-module's keys.

    Args:
        state_dict: a state dict, maybe saved from a DDP- or torch.compile-wrapped module (keys
            "module.x", "_orig_mod.x").
        prefix: "backbone." or "head." (or any other): keep only the keys that start with it,
            after the wrapper prefixes are gone, and strip it. None keeps every key.

    Returns:
        A new dict with the cleaned keys, values unchanged.
    """
    cleaned: dict[str, Any] = {}
    for key, value in state_dict.items():
        key = _strip_wrappers(key)
        if prefix is not None:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _describe_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" (and {len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{shown}{more}"


def _read(path: Path) -> Any:
    """torch.load on CPU: tensors-only first; trusted pickles (argparse args, numpy RNG) second."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.warning(
            "%s is not a tensors-only file (the reference's checkpoints hold argparse args, ours "
            "RNG states); retrying with weights_only=False: only load checkpoints you trust", path,
        )
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure of a foreign file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def _declared_model(obj: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """(arch, patch_size) a checkpoint says it holds, if it says: ours store the params' `model`
    section (exported backbone: "model"; training checkpoint: "params"["model"]), the reference
    its argparse "args"."""
    params = obj.get("params")
    sections = [obj.get("model"), params.get("model") if isinstance(params, Mapping) else None]
    for section in sections:
        if isinstance(section, Mapping) and isinstance(section.get("arch"), str):
            return _ARCH_ALIASES.get(section["arch"], section["arch"]), section.get("patch_size")
    args = obj.get("args")
    arch = getattr(args, "arch", None)
    if isinstance(arch, str):
        return _ARCH_ALIASES.get(arch, arch), getattr(args, "patch_size", None)
    return None, None


def _check_declared(obj: Mapping[str, Any], path: Path, arch: str, patch_size: int) -> None:
    declared_arch, declared_patch = _declared_model(obj)
    if declared_arch is None:
        return
    wrong_patch = arch != "resnet50" and isinstance(declared_patch, int) and declared_patch != patch_size
    if declared_arch != arch or wrong_patch:
        told = declared_arch if declared_arch == "resnet50" else f"{declared_arch}/{declared_patch}"
        asked = arch if arch == "resnet50" else f"{arch}/{patch_size}"
        raise CheckpointError(
            f"{path}: the file says it holds {told} (arch/patch_size), but {asked} was asked for"
        )


def _backbone_state(obj: Any, which: str, path: Path) -> dict[str, torch.Tensor]:
    """Find the backbone's state dict (keys without prefixes) in a loaded checkpoint object."""
    top = obj
    for _ in range(4):  # at most a few levels of {"state_dict"/"model": {...}} wrapping
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict, found a {type(obj).__name__}")
        if f"{which}_backbone" in obj:
            logger.info("%s: loading %r", path, f"{which}_backbone")
            state = obj[f"{which}_backbone"]
        elif which in obj:
            logger.info("%s: loading the %s's backbone from a training checkpoint", path, which)
            state = obj[which]
        elif _is_state_dict(obj):
            logger.info("%s: a bare backbone state dict (`which` does not apply)", path)
            state = obj
        else:
            inner = [k for k in _WRAPPER_KEYS if _is_state_dict(obj.get(k)) or (
                isinstance(obj.get(k), Mapping) and which in obj[k])]
            if not inner:
                break
            obj = obj[inner[0]]
            continue
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: the {which} entry is a {type(state).__name__} without tensors, "
                                  "not a state dict")
        cleaned = clean_state_dict(state)
        if any(k.startswith("backbone.") for k in cleaned):  # MultiCropWrapper: drop head.*
            return clean_state_dict(cleaned, prefix="backbone.")
        return cleaned
    other = "student" if which == "teacher" else "teacher"
    found = sorted(str(k) for k in top) if isinstance(top, Mapping) else []
    hint = f" (it holds the {other}'s: pass which={other!r})" if {other, f"{other}_backbone"} & set(found) else ""
    raise CheckpointError(
        f"{path}: no {which} backbone found; expected a state dict or a dict with key "
        f"{which!r} or {which + '_backbone'!r}, found keys: {_describe_keys(found)}{hint}"
    )


def _file_geometry(state: Mapping[str, torch.Tensor]) -> str:
    """A hint of what architecture a ViT state dict holds, from its tensor shapes."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return ""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return (
        f"; the file holds a ViT with embed_dim={proj.shape[0]}, patch_size={proj.shape[-1]}, "
        f"in_chans={proj.shape[1]}, depth={depth}"
    )


def _check_and_adapt(
    state: dict[str, torch.Tensor], model: nn.Module, path: Path, arch: str, patch_size: int
) -> dict[str, torch.Tensor]:
    """Refuse missing/unexpected keys and shape mismatches; resize pos_embed to the model's grid."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    name = f"{arch}/{patch_size}" if arch != "resnet50" else arch
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        raise CheckpointError(
            f"{path}: does not match {name} (arch or patch size differ?); "
            + "; ".join(parts) + _file_geometry(state)
        )
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != expected["pos_embed"].shape and pos.ndim == 3 \
            and pos.shape[-1] == expected["pos_embed"].shape[-1]:
        grid_h, grid_w = model.patch_embed.grid_size
        old_side = math.isqrt(pos.shape[1] - 1)
        if old_side * old_side == pos.shape[1] - 1:
            logger.info(
                "%s: resizing pos_embed from a %dx%d to a %dx%d patch grid (reference bicubic)",
                path, old_side, old_side, grid_h, grid_w,
            )
            state["pos_embed"] = interpolate_pos_embed(pos.float(), grid_h, grid_w).to(pos.dtype)
    wrong = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: does not match {name} (arch or patch size differ?); shapes differ: "
            + _describe_keys(wrong) + _file_geometry(state)
        )
    return state


def load_backbone(
    path: str | Path,
    arch: str,
    patch_size: int = 16,
    which: Literal["teacher", "student"] = "teacher",
    **build_kwargs: Any,
) -> nn.Module:
    """Build a backbone and load its weights from a reference or pipeline checkpoint.

    Args:
        path: a checkpoint in any layout of the module docstring.
        arch: the architecture the file holds ("vit_tiny", "vit_small", "vit_base", "resnet50").
        patch_size: the ViT patch size the file was trained with.
        which: "teacher" (what the reference evaluates) or "student", for training checkpoints.
        **build_kwargs: further `build_backbone` arguments (img_size, in_chans, embed_dim, depth,
            num_heads); nothing is inferred from the file.

    Returns:
        The backbone in eval mode with requires_grad False on every parameter.

    Raises:
        CheckpointError: unreadable file, no backbone for `which`, or keys/shapes that do not
            match the requested architecture (the message names the file and the keys).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(path)
    model = build_backbone(arch, patch_size=patch_size, **build_kwargs)
    obj = _read(path)
    if isinstance(obj, Mapping):
        _check_declared(obj, path, arch, patch_size)
    state = _backbone_state(obj, which, path)
    state = _check_and_adapt(state, model, path, arch, patch_size)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded %s/%s backbone (%d tensors) from %s", arch, patch_size, len(state), path)
    return model


def teacher_path(params: Params) -> Path:
    """``paths.teacher_backbone``, checked to exist.

    Raises:
        StageError: the file does not exist (naming it and what writes it).
    """
    ckpt = Path(params.paths.teacher_backbone)
    if not ckpt.is_file():
        raise StageError(f"{ckpt}: teacher backbone not found (run the pretrain stage, or point "
                         "paths.teacher_backbone at a reference checkpoint)")
    return ckpt


def load_teacher(params: Params, **build_overrides: Any) -> nn.Module:
    """The frozen teacher backbone of ``paths.teacher_backbone``, as ``params.model`` describes it:
    what every evaluation stage reads (ours, or a reference checkpoint pointed at).

    Args:
        params: validated params (paths.teacher_backbone, model.*).
        **build_overrides: further `build_backbone` arguments, over those of the model section
            (transfer's ``drop_path_rate``).

    Returns:
        The backbone, as `load_backbone` returns it (eval mode, no gradients, on the CPU).

    Raises:
        StageError: the file does not exist (naming it and the key).
        CheckpointError: the file does not hold a backbone matching ``params.model``.
    """
    model = params.model
    kwargs: dict[str, Any] = {**backbone_kwargs(model), **build_overrides}
    return load_backbone(teacher_path(params), model.arch, model.patch_size, which="teacher", **kwargs)


def _to_weight_norm_layout(key: str, target_keys: set[str]) -> str:
    """Rename a weight-norm key to the form the target module uses (either direction)."""
    if key in target_keys:
        return key
    for old, new in _WEIGHT_NORM_NAMES.items():
        if key.endswith("." + old) or key == old:
            candidate = key[: len(key) - len(old)] + new
        elif key.endswith("." + new) or key == new:
            candidate = key[: len(key) - len(new)] + old
        else:
            continue
        if candidate in target_keys:
            return candidate
    return key


def load_head_state(head: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a DINOHead's weights from the reference's or our layout, strictly.

    The reference's head uses `torch.nn.utils.weight_norm` (keys "last_layer.weight_g" = g,
    "last_layer.weight_v" = v); a head built with `torch.nn.utils.parametrizations.weight_norm`
    stores "last_layer.parametrizations.weight.original0" (g) and "...original1" (v). Either is
    mapped to whatever `head` uses. Wrapper prefixes ("module.") are stripped and, when present,
    only "head."-prefixed keys are taken (so a whole student/teacher state dict can be passed).

    Args:
        head: the head module to fill (e.g. `stages.dino.head.DINOHead`).
        state_dict: a head state dict, or a MultiCropWrapper state dict with "head." keys.

    Returns:
        `head`, loaded.

    Raises:
        CheckpointError: keys missing, unexpected or of the wrong shape (named in the message).
    """
    cleaned = clean_state_dict(state_dict)
    if any(k.startswith("head.") for k in cleaned):
        cleaned = clean_state_dict(cleaned, prefix="head.")
    expected = head.state_dict()
    target_keys = set(expected)
    renamed = {_to_weight_norm_layout(k, target_keys): v for k, v in cleaned.items()}
    missing = sorted(target_keys - set(renamed))
    unexpected = sorted(set(renamed) - target_keys)
    wrong = sorted(
        f"{k} {tuple(renamed[k].shape)} given, {tuple(v.shape)} in the head"
        for k, v in expected.items()
        if k in renamed and renamed[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {_describe_keys(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", wrong))
            if keys
        ]
        raise CheckpointError(f"head state dict does not match {type(head).__name__}; " + "; ".join(parts))
    head.load_state_dict(renamed, strict=True)
    return head
