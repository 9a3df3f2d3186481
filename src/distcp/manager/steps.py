"""The ``step-<N>`` checkpoints under a manager's root, on local disk or any
fsspec store: which exist, which are committed, removing one."""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any

from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.stores import split_url

__all__ = ["STEP_NAME", "StepDirectories"]

#: ``step-<N>``: a step's directory under a manager's root (also what ``distcp ls`` lists).
STEP_NAME = re.compile(r"step-(\d+)")


class StepDirectories:
    """``root/step-<N>`` locations: local paths, or URLs under an fsspec root."""

    def __init__(
        self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None
    ) -> None:
        text = os.fspath(root)
        scheme, rest = split_url(text)
        self.url = scheme not in (None, "file")
        self.root = text.rstrip("/") if self.url else str(Path(rest))
        self._fs: Any = None
        self._fs_root = ""
        if self.url:
            import fsspec.core

            self._fs, self._fs_root = fsspec.core.url_to_fs(text, **(storage_options or {}))

    def location(self, name: str) -> str:
        return f"{self.root}/{name}" if self.url else str(Path(self.root) / name)

    def step_location(self, step: int) -> str:
        return self.location(f"step-{step}")

    def prepare(self) -> None:
        if not self.url:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def steps(self) -> dict[int, bool]:
        """Every ``step-<N>`` under the root: N → committed."""
        found: dict[int, bool] = {}
        if self.url:
            self._fs.invalidate_cache(self._fs_root)
            try:
                entries = self._fs.ls(self._fs_root, detail=True)
            except FileNotFoundError:
                return {}
            for entry in entries:
                name = posixpath.basename(entry["name"].rstrip("/"))
                match = STEP_NAME.fullmatch(name)
                if match and entry.get("type") == "directory":
                    metadata = posixpath.join(entry["name"].rstrip("/"), METADATA_FILE_NAME)
                    found[int(match.group(1))] = bool(self._fs.exists(metadata))
            return found
        root = Path(self.root)
        if not root.is_dir():
            return {}
        for entry in os.scandir(root):
            match = STEP_NAME.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                found[int(match.group(1))] = os.path.exists(
                    os.path.join(entry.path, METADATA_FILE_NAME)
                )
        return found

    def remove(self, step: int) -> None:
        """Delete ``step-<N>``: its metadata first, so that a removal cut short
        leaves an incomplete step (never chosen), not a committed one missing
        data."""
        if self.url:
            path = posixpath.join(self._fs_root, f"step-{step}")
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(posixpath.join(path, METADATA_FILE_NAME))
            self._fs.rm(path, recursive=True)
            return
        directory = Path(self.root) / f"step-{step}"
        (directory / METADATA_FILE_NAME).unlink(missing_ok=True)
        shutil.rmtree(directory)

    def append_line(self, name: str, line: str) -> None:
        """Append one line to the text object ``name`` under the root."""
        if not self.url:
            with open(Path(self.root) / name, "a", encoding="utf-8") as file:
                file.write(line + "\n")
            return
        path = posixpath.join(self._fs_root, name)
        try:
            existing = self._fs.cat_file(path)
        except FileNotFoundError:
            existing = b""
        self._fs.pipe_file(path, existing + line.encode() + b"\n")
