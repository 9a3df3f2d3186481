"""The ``distcp`` command line: inspect, verify, diff, ls and convert
checkpoints (distcp, torch DCP, ``torch.save``, safetensors).

Exit codes: 0 success (``diff``: the checkpoints match); 1 ``verify`` found
damage or ``diff`` found differences; 2 bad input (usage, no checkpoint there,
an incomplete or corrupt one, a glob matching nothing, an output that exists
without ``--overwrite``). ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import torch

from distcp.errors import CheckpointError

__all__ = ["main"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "f64": torch.float64,
    "float64": torch.float64,
}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def _fail(message: str) -> None:
    click.echo(f"distcp: error: {message}", err=True)
    raise SystemExit(2)


@contextmanager
def _errors() -> Iterator[None]:
    """A checkpoint error (or a missing file) is a clear message and exit 2."""
    try:
        yield
    except (CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        _fail(f"{type(error).__name__}: {error}")


def _emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=1, default=str))
    else:
        human()


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


@contextmanager
def _progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar over ``total`` bytes on a terminal; nothing otherwise."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        disable=not sys.stderr.isatty(),
        leave=False,
    )
    try:
        yield bar.update
    finally:
        bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distcp")
def main() -> None:
    """Inspect, verify, compare and convert checkpoints: distcp, torch DCP,
    torch.save files and Hugging Face safetensors.

    \b
    Exit codes: 0 success, 1 damage found (verify) or a difference (diff),
    2 bad input (not a checkpoint, incomplete, corrupt, bad option).
    """


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--keys", "keys", multiple=True, help="Only keys matching this glob (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(checkpoint: str, keys: tuple[str, ...], as_json: bool) -> None:
    """Show what CHECKPOINT holds without loading it: format, save time,
    world size, every key with dtype, shape, bytes and layout, values.

    \b
    Examples:
      distcp inspect ckpt/step-1000
      distcp inspect ckpt/step-1000 --keys 'model.layers.0.*' --json
    """
    from distcp.tools import inspect_checkpoint

    with _errors():
        report = inspect_checkpoint(checkpoint, list(keys) or None)

    def human() -> None:
        click.echo(f"{report['path']}: {report['format']}")
        for field in ("format_version", "saved", "world_size", "save_id"):
            if field in report:
                click.echo(f"  {field.replace('_', ' ')}: {report[field]}")
        rows = [
            (
                t["key"],
                t["dtype"],
                str(tuple(t["shape"])),
                _size(t["bytes"]),
                str(t["chunks"]),
                t["layout"],
            )
            for t in report["tensors"]
        ]
        if rows:
            header = ("key", "dtype", "shape", "bytes", "chunks", "layout")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for row in [header, *rows]:
                click.echo(
                    "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                )
        for value in report["values"]:
            click.echo(f"  {value['key']}: {value['type']} = {value['repr']}")
        totals = report["totals"]
        click.echo(
            f"  total: {totals['tensors']} tensors, {_size(totals['tensor_bytes'])}; "
            f"{totals['values']} values"
        )

    _emit(as_json, report, human)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--threads", default=4, show_default=True, help="Files verified in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(checkpoint: str, threads: int, as_json: bool) -> None:
    """Check every checksum of every file of CHECKPOINT, reading each byte
    once; report each damaged item (key, file, offset). Exit 1 on damage.

    \b
    Examples:
      distcp verify ckpt/step-1000 && echo intact
      distcp verify ckpt/step-1000 --json
    """
    from distcp.tools import verify_checkpoint

    with _errors():
        total = _stored_bytes(checkpoint)
        with _progress(total, "verify") as advance:
            report = verify_checkpoint(checkpoint, threads=threads, on_progress=advance)

    def human() -> None:
        for damage in report["damaged"]:
            where = f"key {damage['key']!r}" if damage["key"] is not None else "file"
            if damage.get("chunk"):
                where += f" chunk {damage['chunk']}"
            click.echo(
                f"DAMAGED {where} in {damage['file']} at offset {damage['offset']}: "
                f"{damage['problem']}"
            )
        state = "OK" if report["ok"] else "DAMAGED"
        click.echo(
            f"{state}: {checkpoint} ({report['format']}): {report['checked_items']} items, "
            f"{_size(report['checked_bytes'])} checked, {len(report['damaged'])} damaged"
        )
        if "unchecked" in report:
            click.echo(f"note: {report['unchecked']}")

    _emit(as_json, report, human)
    if not report["ok"]:
        raise SystemExit(1)


def _stored_bytes(checkpoint: str) -> int:
    from pathlib import Path

    path = Path(checkpoint)
    if path.is_dir():
        return sum(
            f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix == ".distcp"
        )
    return 0


@main.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--rtol", default=0.0, show_default=True, help="Relative tolerance.")
@click.option("--atol", default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(a: str, b: str, rtol: float, atol: float, as_json: bool) -> None:
    """Compare checkpoints A and B key by key (any formats). Exit 0 when
    they match (within --rtol/--atol), 1 when they differ, as diff does.

    \b
    Examples:
      distcp diff run1/step-100 run2/step-100
      distcp diff ckpt/step-100 model.safetensors --atol 1e-3 --json
    """
    from distcp.tools import diff_checkpoints

    with _errors():
        report = diff_checkpoints(a, b, rtol=rtol, atol=atol)

    def human() -> None:
        for key in report["only_in_a"]:
            click.echo(f"only in A: {key}")
        for key in report["only_in_b"]:
            click.echo(f"only in B: {key}")
        for change in report["changed"]:
            if change["change"] == "values":
                click.echo(
                    f"differs: {change['key']}: max abs {change['max_abs_diff']:.6g}, "
                    f"max rel {change['max_rel_diff']:.6g}, "
                    f"{change['elements_differing']}/{change['elements']} elements"
                )
            elif change["change"] == "dtype or shape":
                click.echo(f"differs: {change['key']}: {change['a']} vs {change['b']}")
            else:
                click.echo(f"differs: {change['key']}: {change['change']}")
        verdict = "same" if report["same"] else "different"
        click.echo(
            f"{verdict}: {report['identical']} identical keys "
            f"({report['identical_by_checksum']} proven by checksums without reading), "
            f"{len(report['changed'])} changed, {len(report['only_in_a'])} only in A, "
            f"{len(report['only_in_b'])} only in B"
        )

    _emit(as_json, report, human)
    if not report["same"]:
        raise SystemExit(1)


@main.command(name="ls")
@click.argument("root", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_command(root: str, as_json: bool) -> None:
    """List the step-N checkpoints under ROOT: committed or incomplete,
    size, age.

    \b
    Examples:
      distcp ls checkpoints/
      distcp ls checkpoints/ --json | jq '.[] | select(.state == "committed") | .step'
    """
    from distcp.tools import list_checkpoints

    with _errors():
        found = list_checkpoints(root)

    def human() -> None:
        if not found:
            click.echo(f"no step-N checkpoints under {root}")
        for item in found:
            click.echo(
                f"step-{item['step']:<10} {item['state']:<11} {_size(item['bytes']):>10}  "
                f"{_age(item['age_s'])} ago"
            )

    _emit(as_json, found, human)


def _dtype(_: Any, __: Any, value: str | None) -> torch.dtype | None:
    if value is None:
        return None
    dtype = _DTYPES.get(value.lower())
    if dtype is None:
        raise click.BadParameter(f"one of {', '.join(sorted(_DTYPES))}")
    return dtype


def _byte_size(_: Any, __: Any, value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size like 5GB or 512MiB") from None
    if unit not in _UNITS or amount <= 0:
        raise click.BadParameter(f"{value!r} is not a size like 5GB or 512MiB")
    return int(amount * _UNITS[unit])


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(["distcp", "torch", "safetensors", "dcp"]),
    help="Output format: distcp, torch (one torch.save file), safetensors, dcp (torch DCP).",
)
@click.option("--keys", "keys", multiple=True, help="Only keys matching this glob (repeatable).")
@click.option("--dtype", callback=_dtype, help="Cast floating-point tensors (bf16, fp16, fp32).")
@click.option(
    "--max-shard-size",
    callback=_byte_size,
    help="safetensors: largest file (5GB, 512MiB); with it, an index is written.",
)
@click.option("--strip-prefix", help="Remove this prefix from keys (e.g. 'model.').")
@click.option("--add-prefix", help="Add this prefix to keys.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def convert(
    src: str,
    dst: str,
    target: str,
    keys: tuple[str, ...],
    dtype: torch.dtype | None,
    max_shard_size: int | None,
    strip_prefix: str | None,
    add_prefix: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Convert SRC (distcp, torch DCP, a torch.save file, safetensors: detected)
    into DST, one tensor in memory at a time.

    \b
    Examples:
      distcp convert ckpt/step-1000 model.pt --to torch --keys 'model.*'
      distcp convert ckpt/step-1000 hf/ --to safetensors --dtype bf16 \\
          --strip-prefix model. --max-shard-size 5GB
      distcp convert hf/ ckpt/init --to distcp
      distcp convert old_dcp_ckpt/ ckpt/step-0 --to distcp
    """
    from distcp.convert.export import convert as run

    with _errors(), _progress(0, "convert") as advance:
        result = run(
            src,
            dst,
            to=target,
            keys=list(keys) or None,
            dtype=dtype,
            max_shard_size=max_shard_size,
            strip_prefix=strip_prefix,
            add_prefix=add_prefix,
            overwrite=overwrite,
            on_progress=advance,
        )
    report = {
        "source_format": result.source_format,
        "target": result.target,
        "written": [str(p) for p in result.written],
        "tensors": result.tensors,
        "values": result.values,
        "tensor_bytes": result.tensor_bytes,
        "skipped_values": result.skipped_values,
    }

    def human() -> None:
        click.echo(
            f"wrote {result.tensors} tensors ({_size(result.tensor_bytes)}) and "
            f"{result.values} values from {result.source_format} to {dst} as {target}"
        )
        if result.skipped_values:
            click.echo(f"note: safetensors holds tensors only; left out {result.skipped_values}")

    _emit(as_json, report, human)
