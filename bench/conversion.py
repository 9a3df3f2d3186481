"""Conversion: peak memory and throughput of distcp's streaming converters
next to torch's ``dcp_to_torch_save`` and safetensors' ``save_file``.

    python -m bench.conversion [--size-mib 1024] [--tensors 64] [--rounds 3]

The state is ``--tensors`` float32 tensors of equal size (1 GiB in 64 tensors
of 16 MiB by default), saved once as a distcp checkpoint and once as a torch
DCP checkpoint. Each conversion runs in a fresh process; its peak memory is
the process's high-water mark (VmHWM, reset before the work) minus its
resident size just before, so imports do not count. Rounds alternate ABBA.

- distcp → torch.save: ``distcp convert --to torch`` (streaming);
- torch DCP → torch.save: torch's ``format_utils.dcp_to_torch_save`` on the
  torch DCP copy (it loads the whole state, then ``torch.save``\\ s it);
- distcp → safetensors: ``distcp convert --to safetensors`` (streaming);
- safetensors ``save_file``: the state loaded whole with ``distcp.load``, then
  ``safetensors.torch.save_file`` (what a non-streaming export does).

Writes ``bench/results/conversion.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.measure import Summary, abba

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = [
    "distcp → torch.save",
    "torch dcp_to_torch_save",
    "distcp → safetensors",
    "safetensors save_file",
]

# Runs in a fresh process: argv = [peer, source, target, tensors]
_WORKER = r"""
import json, os, sys, time
import torch
import distcp
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
torch.set_num_threads(1)

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

peer, source, target, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
began = time.perf_counter()
if peer == "distcp → torch.save":
    distcp.convert.convert(source, target, to="torch")
elif peer == "torch dcp_to_torch_save":
    dcp_to_torch_save(source, target)
elif peer == "distcp → safetensors":
    distcp.convert.convert(source, target, to="safetensors", strip_prefix="model.")
else:
    reader = distcp.FileSystemReader(source)
    metadata = reader.read_metadata()
    state = {k: torch.empty(tuple(e.size), dtype=e.properties.dtype)
             for k, e in metadata.state_dict_metadata.items()}
    distcp.load(state, storage_reader=reader, no_dist=True)
    save_file({k.removeprefix("model."): v for k, v in state.items()}, target)
seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "peak_extra": status("VmHWM") - base}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.conversion", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch
    import torch.distributed.checkpoint as torch_dcp

    import distcp

    workdir = Path(tempfile.mkdtemp(prefix="distcp-conv-", dir=args.dir))
    per_tensor = args.size_mib * (1 << 20) // args.tensors
    try:
        state = {
            "model": {f"layer{n}.weight": torch.randn(per_tensor // 4) for n in range(args.tensors)}
        }
        nbytes = sum(t.nbytes for t in state["model"].values())
        distcp.save(state, checkpoint_id=workdir / "distcp", no_dist=True)
        torch_dcp.save(state, checkpoint_id=workdir / "torch_dcp", no_dist=True)
        del state
        sources = {
            "distcp → torch.save": (workdir / "distcp", "out.pt"),
            "torch dcp_to_torch_save": (workdir / "torch_dcp", "out.pt"),
            "distcp → safetensors": (workdir / "distcp", "hf"),
            "safetensors save_file": (workdir / "distcp", "out.safetensors"),
        }
        runs: dict[str, list[dict[str, float]]] = {peer: [] for peer in PEERS}
        for round_index in range(args.rounds):
            for peer in abba(PEERS, round_index):
                source, name = sources[peer]
                target = workdir / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(
                    missing_ok=True
                )
                done = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        _WORKER,
                        peer,
                        str(source),
                        str(target),
                        str(args.tensors),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[peer].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(
                    f"round {round_index} {peer:26} {runs[peer][-1]['seconds']:.2f} s",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for peer in PEERS:
        seconds = Summary.of([r["seconds"] for r in runs[peer]]).median
        peak = max(r["peak_extra"] for r in runs[peer])
        rows.append(
            {
                "peer": peer,
                "median_s": seconds,
                "mb_per_s": nbytes / seconds / 1e6,
                "peak_extra_bytes": peak,
            }
        )
    results = {
        "command": shlex.join(["python", "-m", "bench.conversion", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {
            "bytes": nbytes,
            "tensors": args.tensors,
            "largest_tensor": per_tensor,
            "rounds": args.rounds,
        },
        "machine": report.machine(workdir.parent),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversion.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "conversion.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


def _markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    mib = 1 << 20
    by_peer = {row["peer"]: row for row in results["rows"]}
    lines = [
        "# Conversion: streaming peak memory and throughput",
        "",
        f"`{results['command']}` on {results['date']}: {settings['bytes'] // mib} MiB in "
        f"{settings['tensors']} float32 tensors of {settings['largest_tensor'] // mib} MiB, median "
        f"of {settings['rounds']} ABBA rounds, each conversion a fresh process (peak = VmHWM minus"
        " the resident size before the work).",
        "",
        "| conversion | median s | MB/s | peak extra MiB | peak ÷ largest tensor "
        "| time ÷ distcp's |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    pairs = {
        "distcp → torch.save": "distcp → torch.save",
        "torch dcp_to_torch_save": "distcp → torch.save",
        "distcp → safetensors": "distcp → safetensors",
        "safetensors save_file": "distcp → safetensors",
    }
    for row in results["rows"]:
        ours = by_peer[pairs[row["peer"]]]
        lines.append(
            f"| {row['peer']} | {row['median_s']:.2f} | {row['mb_per_s']:.0f} | "
            f"{row['peak_extra_bytes'] / mib:.1f} | "
            f"{row['peak_extra_bytes'] / settings['largest_tensor']:.2f} | "
            f"{row['median_s'] / ours['median_s']:.2f}× |"
        )
    lines += [
        "",
        "- distcp's converters read each tensor through distcp's reader (every CRC-32C"
        " verified), write it, and fsync the output before renaming it into place;"
        " torch.save and save_file do neither.",
        "- torch's dcp_to_torch_save reads torch DCP's own format (the same state saved by"
        " torch DCP): it cannot read distcp's.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
