"""Generate the Python gRPC stubs from the repository's ``.proto`` files.

Three trees, each compiled with its own import root:

* ``proto/`` holds the public API and nothing else (package ``raftstate.v1``;
  ``proto/buf.yaml`` lints it): ``proto/raftstate/v1/<name>.proto`` becomes
  ``raftstate/v1/<name>_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py``;
* ``raftstate/internal/`` holds what nodes write to their log and snapshots
  (package ``raftstate.internal.v1``), compiled from the repository root so
  the stubs sit next to the ``.proto``;
* ``bench/etcdpb/`` holds the benchmark's subset of etcd's API, likewise.

A glob over ``proto/`` therefore sees only the public API, which is what a
client in another language is generated from.

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


#: Generated-stub directories (relative to the repository) and the
#: ``(import root, directory under it)`` their ``.proto`` files are taken from.
TREES: tuple[tuple[Path, Path], ...] = (
    (PROTO_ROOT, PROTO_ROOT / "raftstate"),
    (REPO_ROOT, REPO_ROOT / "raftstate" / "internal"),
    (REPO_ROOT, REPO_ROOT / "bench" / "etcdpb"),
)
#: Directories holding generated stubs, for the drift check.
STUB_DIRS = ("raftstate/v1", "raftstate/internal/v1", "bench/etcdpb")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Return every .proto file under ``root``, recursively, sorted by path."""
    return sorted(root.rglob("*.proto"))


def _well_known_include() -> str:
    """The directory of the well-known types (google/protobuf/any.proto)
    that grpcio-tools ships."""
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def generate(out_dir: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``
    for every tree in :data:`TREES`.

    Returns the generated files. Raises ``RuntimeError`` if protoc fails or a
    tree is empty and ``ImportError`` if grpcio-tools is not installed (it is
    in the test extra).
    """
    from grpc_tools import protoc

    written: list[Path] = []
    for root, tree in TREES:
        files = proto_files(tree)
        if not files:
            raise RuntimeError(f"no .proto files under {tree}")
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{_well_known_include()}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *[str(f.relative_to(root)) for f in files],
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        for proto in files:
            stem = out_dir / proto.relative_to(root).with_suffix("")
            written.extend(stem.with_name(stem.name + suffix) for suffix in SUFFIXES)
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
