"""The model cache (API_CACHE_DIR, the `cache` volume): converted models and runtime choices.

An entry is a folder named by the hash of its key (checkpoint sha256, runtime version, precision,
input size, what it was built for), holding `model.xml`/`model.bin` and a manifest with the key and
the files' sha256. Entries are written to a temporary folder and renamed into place, so a crash
never leaves half an entry; one whose files no longer match their manifest (corrupt, truncated,
another version's) is deleted and rebuilt, never served. A cache that cannot be written is a
warning, not a failure: the model is converted on every start instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.engine.model.files.checkpoint import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.folder / name


@dataclass(frozen=True)
class ModelCache:
    root: Path | None  # None: no cache

    def _folder(self, key: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256(json.dumps({"format": FORMAT, **key}, sort_keys=True).encode()).hexdigest()
        return self.root / f"{key.get('kind', 'entry')}-{digest[:24]}"

    def get(self, key: dict[str, Any]) -> CacheEntry | None:
        """The entry for `key` when it is whole and matches; None (and the entry removed) otherwise."""
        folder = self._folder(key)
        if folder is None or not folder.is_dir():
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest.get("key") != {"format": FORMAT, **key}:
                raise ValueError("it was written for another key")
            for name, digest in manifest["files"].items():
                if file_sha256(folder / name) != digest:
                    raise ValueError(f"{name} does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("model cache: entry %s is unusable (%s); rebuilding it", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return CacheEntry(folder, manifest)

    def put(self, key: dict[str, Any], write: Any, extra: dict[str, Any] | None = None) -> CacheEntry | None:
        """Write an entry: `write(folder)` puts the files in a fresh folder; then checksummed and renamed
        into place. Returns None (with a warning) when the cache cannot be written."""
        folder = self._folder(key)
        if folder is None:
            return None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder.parent))
            try:
                write(staging)
                files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
                manifest = {"key": {"format": FORMAT, **key}, "files": files, **(extra or {})}
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as error:
            logger.warning(
                "model cache: cannot write %s (%s); converting at every start (set API_CACHE_DIR to a writable folder)",
                folder,
                error.strerror or error,
            )
            return None
        return CacheEntry(folder, manifest)
