"""API_CHECKPOINT_PATH -> the checkpoint files it names: one, or the k folds of a cross-validation run.

A fold ensemble is named the way training writes it: a folder holding one subfolder per fold
(`outputs/checkpoints` with `fold_0/best_model.pt` ... `fold_4/best_model.pt`), or a glob
(`outputs/checkpoints/fold_*/best_model.pt`). In a fold's subfolder the checkpoint is
`best_model.pt` when there is one, else its only checkpoint file, else the subfolder itself when
it is a timm model folder. API_FOLDS picks some of them by name. No torch here: the swap's room
check sizes the files before a byte is read (api/remote/host/rules.py).
"""

from __future__ import annotations

import glob
from pathlib import Path

from api.errors import CheckpointNotFound, ConfigError

PREFERRED = ("best_model.pt", "best_model.pth", "model_best.pth.tar", "best_model.safetensors")
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar"})
_GLOB = frozenset("*?[")


def is_glob(path: Path) -> bool:
    return any(ch in str(path) for ch in _GLOB)


def fold_paths(path: Path, pick: str | None = None) -> list[tuple[str, Path]]:
    """(name, checkpoint) of every fold `path` names, in name order; one entry for a single checkpoint.

    `pick` (API_FOLDS): comma-separated fold names (e.g. "fold_0,fold_2"); None: all of them."""
    if is_glob(path):
        found = [Path(p) for p in sorted(glob.glob(str(path)))]
        if not found:
            raise CheckpointNotFound(
                f"API_CHECKPOINT_PATH={path} matches no file; check the pattern (e.g. outputs/checkpoints/fold_*/"
                "best_model.pt)"
            )
        folds = [(_fold_name(p, found), p) for p in found]
    elif path.is_dir() and not (path / "config.json").is_file():
        folds = [(sub.name, ckpt) for sub in sorted(path.iterdir()) if (ckpt := _fold_checkpoint(sub)) is not None]
        if not folds:  # not a folder of folds: the checkpoint reader names what is missing
            return [(path.name, path)]
    else:
        if pick:
            raise ConfigError(
                f"API_FOLDS={pick} picks folds, but API_CHECKPOINT_PATH={path} names one checkpoint; point it at "
                "the folder of folds (or a glob), or unset API_FOLDS"
            )
        return [(path.stem if path.is_file() else path.name, path)]
    return _picked(folds, pick, path)


def _fold_name(path: Path, found: list[Path]) -> str:
    """A glob's fold: its folder's name when every match has its own folder (fold_0/best_model.pt), else its stem."""
    parents = {p.parent for p in found}
    return path.parent.name if len(parents) == len(found) else path.stem


def _fold_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir() or folder.name.startswith("."):
        return None
    if (folder / "config.json").is_file():
        return folder  # a timm model folder
    for name in PREFERRED:
        if (folder / name).is_file():
            return folder / name
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    if len(files) > 1:
        raise ConfigError(
            f"fold {folder} holds {len(files)} checkpoints ({', '.join(p.name for p in files[:4])}) and no "
            f"{PREFERRED[0]}; keep one per fold, or name them with a glob in API_CHECKPOINT_PATH"
        )
    return files[0] if files else None


def _picked(folds: list[tuple[str, Path]], pick: str | None, path: Path) -> list[tuple[str, Path]]:
    if not pick:
        return folds
    names = [name.strip() for name in pick.split(",") if name.strip()]
    known = {name for name, _ in folds}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"API_FOLDS={pick}: no fold named {', '.join(unknown)} in {path}; its folds are "
            f"{', '.join(sorted(known))} (leave API_FOLDS unset to serve them all)"
        )
    return [(name, ckpt) for name, ckpt in folds if name in names]


def weights_bytes(path: Path) -> int:
    """The size on disk of what `path` names (every fold; a timm folder: every file in it); nothing is read."""
    total = 0
    for _, ckpt in fold_paths(path) if is_glob(path) or path.exists() else []:
        if ckpt.is_dir():
            total += sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        elif ckpt.is_file():
            total += ckpt.stat().st_size
    return total
