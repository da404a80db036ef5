"""Seeded damage to every sample format, read by `bnctl inspect` and `bnctl audit`: each run
must end in a clean result or one `error:` line (exit 0, 1 or 2), never a traceback or an
internal error, and a zip archive read with exit 0 must give exactly the original's values
(its CRC-32 catches changed bytes).

    python benchmarks/fuzz_readers.py --cases 2000          # the long run
    (tests/test_fuzz.py runs a few hundred of the same cases)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = [
    ROOT / "samples/checkpoints/sample.pt",
    ROOT / "samples/checkpoints/sample.ckpt",
    ROOT / "samples/checkpoints/sample.safetensors",
    ROOT / "samples/checkpoints/sample.onnx",
    ROOT / "samples/checkpoints/sample.torchscript.pt",
    ROOT / "samples/checkpoints/sample.pt2",
    ROOT / "samples/broken/nan_stats.pt",
]
MUTATIONS = ("truncate", "flip", "zero", "flip_member", "drop_member", "duplicate_member")


def mutate(data: bytes, source: Path, rng: random.Random, kind: str) -> bytes:
    """``data`` damaged in one seeded way."""
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[: rng.randrange(1, len(out))])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "zero":
        start = rng.randrange(len(out))
        end = min(len(out), start + rng.randint(1, 4096))
        out[start:end] = bytes(end - start)
        return bytes(out)
    if not zipfile.is_zipfile(source):
        return mutate(data, source, rng, rng.choice(("truncate", "flip", "zero")))
    with zipfile.ZipFile(source) as src:
        infos = src.infolist()
        victim = rng.choice(infos)
        import io

        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as dst:
            for info in infos:
                member = src.read(info.filename)
                if info.filename == victim.filename:
                    if kind == "drop_member":
                        continue
                    if kind == "flip_member" and member:
                        member = bytearray(member)
                        member[rng.randrange(len(member))] ^= 1 << rng.randrange(8)
                        # keep the stored CRC of the original bytes: what a damaged disk gives
                        dst.writestr(info, bytes(member))
                        continue
                    if kind == "duplicate_member":
                        dst.writestr(info, member)
                dst.writestr(info, member)
        result = buffer.getvalue()
    if kind == "flip_member":  # writestr recomputed the CRC: put the original's back
        result = restore_crcs(result, source)
    return result


def restore_crcs(data: bytes, source: Path) -> bytes:
    """Write the source archive's CRC-32 values back into ``data``'s headers (same names)."""
    import io
    import struct

    with zipfile.ZipFile(source) as src:
        crcs = {i.filename: i.CRC for i in src.infolist()}
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            crc = struct.pack("<L", crcs[info.filename])
            out[info.header_offset + 14 : info.header_offset + 18] = crc  # local header
    # central directory entries: signature PK\x01\x02, CRC at offset 16
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack("<H", out[pos + 28 : pos + 30])[0]
        name = bytes(out[pos + 46 : pos + 46 + name_len]).decode()
        if name in crcs:
            out[pos + 16 : pos + 20] = struct.pack("<L", crcs[name])
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def run_case(cli, seed: int, folder: Path, reference: dict) -> tuple[str, str]:
    """One seeded case: returns (outcome, detail); outcome is ok, error or a failure kind."""
    rng = random.Random(seed)
    source = rng.choice(SAMPLES)
    kind = rng.choice(MUTATIONS)
    path = folder / f"case{seed}{''.join(source.suffixes[-2:])}"
    path.write_bytes(mutate(source.read_bytes(), source, rng, kind))
    command = rng.choice(("inspect", "audit"))
    args = [command, str(path)] + (["-f", "json"] if command == "inspect" else [])
    result = cli(*args)
    text = result.stderr + result.stdout
    path.unlink()
    if "Traceback" in text:
        return "traceback", f"{seed} {source.name} {kind} {command}: {text[-300:]}"
    if "internal error" in text:
        return "internal", f"{seed} {source.name} {kind} {command}: {text.strip().splitlines()[-2:]}"
    if result.exit_code not in (0, 1, 2):
        return "exit", f"{seed} {source.name} {kind}: exit {result.exit_code}"
    clean = result.stderr.startswith("error: ") and result.stderr.count("\n") <= 2
    if command == "audit":  # an unreadable file is a line of the report, and the summary says so
        clean = clean or (": error: " in result.stdout and result.stderr == "")
    if result.exit_code == 2 and not clean:
        return "unclear", f"{seed} {source.name} {kind} {command}: {text[:300]}"
    if command == "inspect" and result.exit_code == 0 and zipfile.is_zipfile(source) and kind in ("flip_member",):
        layers = json.loads(result.stdout)["layers"]
        if layers != reference[source.name]:
            return "wrong", f"{seed} {source.name} {kind}: values differ from the original's"
    return ("ok" if result.exit_code in (0, 1) else "error"), ""


def references(cli) -> dict:
    return {s.name: json.loads(cli("inspect", str(s), "-f", "json").stdout)["layers"] for s in SAMPLES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from typer.testing import CliRunner

    from bnctl.cli import app

    runner = CliRunner()

    def cli(*argv):
        return runner.invoke(app, list(argv))

    ref = references(cli)
    counts: Counter = Counter()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seed, args.seed + args.cases):
            outcome, detail = run_case(cli, seed, Path(tmp), ref)
            counts[outcome] += 1
            if detail:
                failures.append(detail)
    print(f"{args.cases} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for line in failures[:40]:
        print("  " + line)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
