"""The exceptions distcp raises.

Every error is a :class:`CheckpointError`, which subclasses :class:`Exception`
(torch DCP's ``CheckpointException`` subclasses ``BaseException`` and slips past
``except Exception``). ``CheckpointException`` is the name DCP users catch, so it
is kept as an alias of the base. Where a builtin fits, the error subclasses it
too (a missing checkpoint is also a ``FileNotFoundError``).

Messages name the key, rank and file involved and, where there is one, the fix.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from typing import TypeAlias

WrappedException: TypeAlias = tuple[BaseException, traceback.StackSummary]
"""DCP's ``WRAPPED_EXCEPTION``: a rank's exception and the stack it was raised from."""

__all__ = [
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CollectiveTimeoutError",
    "CommitOutcomeUnknownError",
    "CommitWarning",
    "ConcurrentSaveError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "DtypeMismatchError",
    "IncompleteCheckpointError",
    "KeyMismatchError",
    "PickleNotAllowedError",
    "RemoteError",
    "ShapeMismatchError",
    "UnsupportedStorageError",
    "UnsupportedValueError",
    "WrappedException",
]


class CheckpointError(Exception):
    """Base class of every error distcp raises.

    Constructed as DCP's ``CheckpointException(msg, failures)`` too, so code
    that raises DCP's exception itself keeps working with distcp's name.
    """

    def __init__(
        self, msg: object = "", failures: Mapping[int, WrappedException] | None = None
    ) -> None:
        super().__init__(msg)
        self._given_failures = dict(failures or {})

    @property
    def failures(self) -> Mapping[int, WrappedException]:
        """Per-rank ``(exception, stack)`` pairs, as in DCP's
        ``CheckpointException.failures``; empty for an error raised by this
        process alone. :attr:`causes` has the bare exceptions."""
        return getattr(self, "_given_failures", {})

    @property
    def causes(self) -> Mapping[int, BaseException]:
        """Per-rank causes: ``failures`` without the stacks."""
        return {rank: wrapped[0] for rank, wrapped in self.failures.items()}


CheckpointException = CheckpointError
"""The name torch DCP users catch; every distcp error is one."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the given path."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint directory exists but holds no committed metadata: a save
    into it never finished (or is still running)."""


class CheckpointFormatError(CheckpointError):
    """The metadata cannot be decoded, has an unknown version, or describes
    something impossible (a path outside the checkpoint, a chunk outside its
    tensor, overlapping chunks, a size that does not match dtype × shape)."""


class CorruptCheckpointError(CheckpointError):
    """Bytes on disk do not match what the metadata says: a checksum mismatch,
    a truncated file, a byte range past a file's end."""

    def __init__(self, message: str, *, file: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.file = file
        self.offset = offset

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_corrupt, (str(self), self.file, self.offset))


def _rebuild_corrupt(message: str, file: str | None, offset: int | None) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, file=file, offset=offset)


class KeyMismatchError(CheckpointError, KeyError):
    """Keys requested by the caller are missing from the checkpoint."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str] = (), *, hint: str = ""):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        parts = []
        if self.missing:
            # DCP's words, which its users and tests match on.
            parts.append(f"Missing key in checkpoint state_dict: {_key_list(self.missing)}")
        if self.unexpected:
            parts.append(f"not expected: {_key_list(self.unexpected)}")
        message = "; ".join(parts) or "key mismatch"
        if hint:
            message += f". {hint}"
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_key_mismatch, (self.missing, self.unexpected, self.message))


def _rebuild_key_mismatch(
    missing: list[str], unexpected: list[str], message: str
) -> KeyMismatchError:
    error = KeyMismatchError(missing, unexpected)
    error.message = message
    error.args = (message,)
    return error


def _key_list(keys: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = len(keys) - limit
    return shown + (f" and {more} more" if more > 0 else "")


class ShapeMismatchError(CheckpointError, ValueError):
    """A requested tensor's global shape differs from the saved one."""


class DtypeMismatchError(CheckpointError, TypeError):
    """A requested tensor's dtype cannot be filled from the saved dtype without
    loss, and the caller did not allow casting."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A state-dict value has a type the pickle-free format cannot represent."""


class PickleNotAllowedError(CheckpointError):
    """A value needs pickle to be saved or loaded, and the caller did not opt in."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint exists at the path and overwriting was refused."""


class RemoteError(CheckpointError):
    """Stands in for an exception raised on another rank that could not be sent
    as itself (it did not pickle). Keeps its type name, message and traceback."""

    def __init__(self, type_name: str, message: str, traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteError, (self.type_name, self.message, self.traceback))


class DistributedCheckpointError(CheckpointError):
    """One or more ranks failed in a collective step of save or load. Every rank
    raises this same error; ``failures`` maps each failing rank to its cause."""

    while_delivering = False
    """True when this rank lost contact while the coordinator was sending the
    step's outcome (after it ran its part, e.g. the commit)."""

    def __init__(self, step: str, failures: Mapping[int, BaseException]):
        self.step = step
        self._failures = dict(sorted(failures.items()))
        causes = "\n".join(
            f"  rank {rank}: {type(exc).__name__}: {exc}" for rank, exc in self._failures.items()
        )
        ranks = ", ".join(str(r) for r in self._failures)
        super().__init__(f"{step} failed on rank(s) {ranks}:\n{causes}")

    @property
    def failures(self) -> Mapping[int, WrappedException]:
        return {rank: (exc, _stack_of(exc)) for rank, exc in self._failures.items()}

    @property
    def causes(self) -> Mapping[int, BaseException]:
        return self._failures

    def __reduce__(self) -> tuple[object, ...]:
        return (DistributedCheckpointError, (self.step, self._failures))


def _stack_of(error: BaseException) -> traceback.StackSummary:
    """The stack ``error`` was raised from (empty for one received from
    another rank: tracebacks do not travel; a :class:`RemoteError` keeps its
    text in ``traceback``)."""
    return traceback.StackSummary.extract(traceback.walk_tb(error.__traceback__))


class UnsupportedStorageError(CheckpointError, ValueError):
    """The checkpoint location or storage option is one distcp's storage does
    not handle (yet); the message names the alternative."""


class CheckpointArgumentError(CheckpointError, ValueError):
    """An argument of ``save`` / ``load`` is missing or does not fit the
    others (no ``checkpoint_id`` and no storage, a process group without
    torch.distributed, ...)."""


class CommitOutcomeUnknownError(DistributedCheckpointError):
    """Raised on a rank that lost contact with the coordinator while it was
    committing: the checkpoint at the path is either the previous one or this
    save's, whole (never a mix), and this rank cannot tell which. Loading it
    tells: this save's metadata carries ``save_id`` (``storage_meta.save_id``
    after ``FileSystemReader(path).read_metadata()``). Every other error from
    a save means the previous checkpoint is in place."""

    def __init__(
        self, step: str, failures: Mapping[int, BaseException], save_id: str | None = None
    ):
        super().__init__(step, failures)
        self.save_id = save_id

    def __str__(self) -> str:
        which = f" (this save's id: {self.save_id})" if self.save_id else ""
        return (
            f"{super().__str__()}\nThe coordinator may or may not have committed{which}: "
            "the checkpoint at the path is the previous one or this save's, never a mix; "
            "read its metadata to know which."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (CommitOutcomeUnknownError, (self.step, self.causes, self.save_id))


class CollectiveTimeoutError(DistributedCheckpointError):
    """A collective step of a save or load did not complete within distcp's
    timeout (``timeout=`` of ``save``/``load``, or ``DISTCP_COLLECTIVE_TIMEOUT``):
    ``missing`` are the ranks that did not arrive, where this rank can tell."""

    def __init__(
        self, step: str, failures: Mapping[int, BaseException], missing: Sequence[int] = ()
    ):
        super().__init__(step, failures)
        self.missing = tuple(missing)

    def __reduce__(self) -> tuple[object, ...]:
        return (CollectiveTimeoutError, (self.step, self.causes, self.missing))


class ConcurrentSaveError(CheckpointError):
    """Another save into the same checkpoint directory is in progress (a job
    restarted while the old one still runs, two jobs given one path). Nothing
    was written; the checkpoint at the path is untouched."""


class CommitWarning(UserWarning):
    """A save committed (the checkpoint at the path is the new one) but
    something after the commit point failed: fsyncing the directory, writing
    the ``.metadata`` probe, removing superseded files, or telling the other
    ranks. The save returns normally; this warning says what failed."""
