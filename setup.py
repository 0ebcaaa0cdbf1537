"""Generates the gRPC code from proto/ at build time (generated code is built, never committed)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_protos() -> None:
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        rel = proto.relative_to(ROOT / "proto")
        args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
                f"--python_out={ROOT / 'proto'}", f"--pyi_out={ROOT / 'proto'}",
                f"--grpc_python_out={ROOT / 'proto'}", str(rel)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")


class BuildWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


if __name__ == "__main__":  # setuptools runs this file as __main__; `make proto` imports it
    setup(cmdclass={"build_py": BuildWithProtos})
