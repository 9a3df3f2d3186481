"""What a checkpoint directory holds, for tests that compare it before and after."""

from __future__ import annotations

from pathlib import Path

#: The save lock's text names its current holder and since when; every save
#: that takes the lock rewrites it. It is not part of the checkpoint.
LOCK_TEXT = b"<the save lock: its holder's name, rewritten by each save>"


def checkpoint_bytes(path: Path) -> dict[str, bytes]:
    """Every file's bytes by name; a save lock stands in as :data:`LOCK_TEXT`
    (present or not is still compared, its holder text is not)."""
    return {
        p.name: LOCK_TEXT if p.name.endswith(".distcp.lock") else p.read_bytes()
        for p in sorted(path.iterdir())
    }
