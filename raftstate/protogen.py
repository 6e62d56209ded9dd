"""Generate the Python gRPC stubs under ``raftstate/`` from every ``.proto`` under ``proto/``.

A file ``proto/raftstate/<pkg>/<name>.proto`` becomes ``raftstate/<pkg>/<name>_pb2.py``,
``_pb2.pyi`` and ``_pb2_grpc.py``: the API in ``raftstate/v1`` and the benchmark's etcd
subset in ``raftstate/benchpb``.

The stubs are committed so that an install needs no code generator; the test
``tests/test_proto_stubs.py`` regenerates them into a temporary directory and
fails if they differ from the committed ones. Run after editing a ``.proto``::

    python -m raftstate.protogen
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Return every .proto file under ``proto_root``, recursively, sorted by path."""
    return sorted(proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``.

    Returns the generated files. Raises ``RuntimeError`` if protoc fails and
    ``ImportError`` if grpcio-tools is not installed (it is in the test extra).
    """
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        raise RuntimeError(f"no .proto files under {proto_root}")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f.relative_to(proto_root)) for f in files],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    written: list[Path] = []
    for proto in files:
        rel = proto.relative_to(proto_root).with_suffix("")
        stem = out_dir / rel
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            written.append(stem.with_name(stem.name + suffix))
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    written = generate(args.out)
    for path in written:
        print(path)
    print(f"generated {len(written)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
