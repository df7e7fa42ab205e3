"""Command line: a thin layer that parses arguments, calls the API and prints one clear error.

Heavy imports (torch, timm, mlflow) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
from importlib import resources
from pathlib import Path

from . import __version__
from .core.errors import ArtifactError, CompressPipeError, ConfigError

EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def quickstart_path() -> str:
    return str(resources.files("compresspipe") / "pipelines" / "quickstart.yaml")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    p = argparse.ArgumentParser(
        prog="compresspipe", parents=[common],
        description="Declarative compression pipelines for timm models, tracked in MLflow.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="PATH=VALUE",
                        help="override a value, e.g. --set stages.0.train.epochs=3 (repeatable)")

    r = sub.add_parser("run", parents=[common], help="validate and run a pipeline")
    r.add_argument("file", nargs="?", help="pipeline YAML (default: the embedded quickstart)")
    overrides(r)
    r.add_argument("--resume", action="store_true",
                   help="continue from the last completed stage / epoch checkpoint")

    v = sub.add_parser("validate", parents=[common],
                       help="check pipelines without running them")
    v.add_argument("file", nargs="+", help="pipeline YAML files (each checked on its own)")
    overrides(v)
    v.add_argument("--no-model-check", action="store_true",
                   help="skip the checks that build the model (faster)")

    s = sub.add_parser("schema", parents=[common], help="print the JSON Schema of pipeline files")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")

    sub.add_parser("stages", parents=[common], help="list stage types with their parameters")

    i = sub.add_parser("inspect", parents=[common], help="per-tensor table of a .cpz file")
    i.add_argument("file")
    d = sub.add_parser("decompress", parents=[common], help="decode a .cpz to fp32 safetensors "
                       "(an int8 .cpz to its ONNX file)")
    d.add_argument("file")
    d.add_argument("-o", "--output", required=True, help="the .safetensors file to write "
                   "(.onnx for an int8 .cpz)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"compresspipe {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        return {"run": _run, "validate": _validate, "schema": _schema, "stages": _stages,
                "inspect": _inspect, "decompress": _decompress}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # output piped into `head` and closed early: not an error of ours

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # one clear line for users, the traceback on request
        if args.debug:
            raise
        if isinstance(exc, CompressPipeError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _run(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .core.distributed import is_main
    from .pipeline.loader import load_pipeline
    from .pipeline.runner import run_pipeline
    from .tracking.report import summary_table

    pipeline = load_pipeline(args.file or quickstart_path(), args.overrides)
    if not args.debug:
        # MLflow narrates creating its sqlite tables at INFO; our own lines say what happens
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    summary = run_pipeline(pipeline, resume=args.resume)
    if not is_main():
        return 0  # under torchrun the table is rank 0's to print
    print()
    print(summary_table(summary))
    print(f"\nsummary: {pipeline.output_dir / 'summary.json'}")
    if summary.get("tracking_uri"):
        print(f"MLflow UI: mlflow ui --backend-store-uri {summary['tracking_uri']}"
              " --port 5000   (then open http://127.0.0.1:5000)")
    return 0


def _validate(args) -> int:
    """Each file checked on its own: 'valid' on stdout or its errors on stderr; the exit code
    is 0 only when every file is valid (2 when only pipeline files were at fault)."""
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .pipeline.loader import load_pipeline

    failures: list[int] = []
    for file in args.file:
        try:
            pipeline = load_pipeline(file, args.overrides, check_model=not args.no_model_check)
        except CompressPipeError as exc:
            if args.debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            failures.append(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR)
            continue
        except Exception as exc:  # noqa: BLE001 - one file's crash must not hide the others
            if args.debug:
                raise
            print(f"error: {file}: {type(exc).__name__}: {exc} (run with --debug for the "
                  "traceback)", file=sys.stderr)
            failures.append(EXIT_ERROR)
            continue
        names = ", ".join(f"{s.name} ({s.type})" for s in pipeline.stages)
        print(f"{file}: valid; {len(pipeline.stages)} stages: {names}", flush=True)
        for note in pipeline.notes:
            print(f"  {note}", flush=True)
    if not failures:
        return 0
    return EXIT_CONFIG if set(failures) == {EXIT_CONFIG} else EXIT_ERROR


def _schema(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .pipeline.schema import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def _stages(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .pipeline.docs import type_label, value_label
    from .stages.registry import list_stages

    width = 100
    for name, cls in list_stages().items():
        paragraphs = [re.sub(r"``([^`]+)``", r"`\1`", " ".join(line.strip()
                                                             for line in block.splitlines()))
                      for block in textwrap.dedent(cls.__doc__ or "").strip().split("\n\n")]
        print(textwrap.fill(f"{name}: {paragraphs[0]}", width, subsequent_indent="    "))
        for paragraph in paragraphs[1:]:
            print(textwrap.fill(paragraph, width, initial_indent="    ",
                                subsequent_indent="    "))
        for field, info in cls.Config.model_fields.items():
            default = ("required" if info.is_required() else
                       f"default {value_label(info.get_default(call_default_factory=True))}")
            desc = f" — {info.description}" if info.description else ""
            print(textwrap.fill(f"{field} ({type_label(info.annotation)}, {default}){desc}",
                                width, initial_indent="  - ", subsequent_indent="      ",
                                break_on_hyphens=False))
    return 0


def _inspect(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .formats import CpzFormatError, inspect_cpz

    try:
        rows = inspect_cpz(args.file)
    except (CpzFormatError, OSError) as exc:
        raise ArtifactError(f"{args.file}: {exc}") from exc
    print(f"{'tensor':<40} {'shape':<18} {'sparsity':>8} {'bits/w':>7} {'pos B':>8} "
          f"{'val B':>8} {'tab B':>6} {'bound B':>8}")
    for r in rows:
        bound = sum(r.get(k) or 0 for k in ("positions_entropy_bits", "values_entropy_bits")) / 8
        print(f"{r['name'][:40]:<40} {str(tuple(r['shape'])):<18} {r['sparsity']:>8.1%} "
              f"{r['bits_per_weight']:>7.3f} {r.get('positions_bytes', 0):>8,} "
              f"{r.get('values_bytes', 0):>8,} {r.get('table_bytes', 0):>6,} {bound:>8,.0f}")
    print(f"total: {os.path.getsize(args.file):,} bytes in {len(rows)} tensors")
    return 0


def _decompress(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from safetensors.torch import save_file

    from .formats.cpz_model import read_model_cpz, read_onnx_cpz

    out = Path(args.output)
    if out.is_dir() or not out.parent.is_dir():
        raise ArtifactError(f"-o {args.output}: " + ("is a directory; give a file name"
                            if out.is_dir() else f"directory {str(out.parent)!r} does not exist"))
    onnx = read_onnx_cpz(args.file)
    if onnx is not None:
        if out.suffix != ".onnx":
            raise ArtifactError(f"{args.file}: holds an int8 ONNX model ({onnx[1]}), not fp32 "
                                "weights: give an output file ending in .onnx")
        _write_atomically(out, lambda tmp: tmp.write_bytes(onnx[0]))
    else:
        state = {k: v.contiguous() for k, v in read_model_cpz(args.file).model.state_dict().items()}
        _write_atomically(out, lambda tmp: save_file(state, str(tmp)))
    print(f"wrote {args.output}")
    return 0


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` next to ``path``, then rename: a failure never leaves half a file."""

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever reads the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
