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
import time
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
    r.add_argument("--no-cache", action="store_true",
                   help="run every stage: neither reuse nor record outputs in the stage cache")
    r.add_argument("--cache-dir", help="stage cache and tensor store directory (default: "
                   "cache.dir, $COMPRESSPIPE_CACHE_DIR, or .compresspipe-cache beside the "
                   "output directory)")

    v = sub.add_parser("validate", parents=[common],
                       help="check pipelines without running them")
    v.add_argument("file", nargs="+", help="pipeline YAML files (each checked on its own)")
    overrides(v)
    v.add_argument("--no-model-check", action="store_true",
                   help="skip the checks that build the model (faster)")

    s = sub.add_parser("schema", parents=[common], help="print the JSON Schema of pipeline files")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")

    sub.add_parser("stages", parents=[common], help="list stage types with their parameters")

    se = sub.add_parser("sensitivity", parents=[common],
                        help="per-layer sensitivity scan of a pipeline's model on the validation "
                        "split")
    se.add_argument("file", help="pipeline YAML (its model, data and device)")
    overrides(se)
    se.add_argument("--stage", help="scan this stage's saved output in the pipeline's "
                    "output_dir (default: the pipeline's input model)")
    se.add_argument("--sparsities", help="comma-separated sparsities, e.g. 0.5,0.9 ('' skips)")
    se.add_argument("--bits", help="comma-separated codebook bits, e.g. 8,4,2 ('' skips)")
    se.add_argument("--int8", action="store_true", help="also scan each layer alone in int8")
    se.add_argument("--max-batches", type=int, default=8, help="validation batches per point")
    se.add_argument("-o", "--output", help="directory for sensitivity.json/.md and the plots "
                    "(default: OUTPUT_DIR/sensitivity-STAGE)")
    c = sub.add_parser("cache", parents=[common], help="list or prune the stage cache")
    c.add_argument("action", choices=["ls", "prune"])
    c.add_argument("file", nargs="?", help="a pipeline whose cache to use (default: the "
                   "quickstart's)")
    c.add_argument("--dir", help="the cache directory itself")
    c.add_argument("--max-gb", type=float, help="prune: evict least recently used entries "
                   "down to this size (default: the pipeline's cache.max_gb)")
    c.add_argument("--all", action="store_true", help="prune: evict every entry")

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
                "inspect": _inspect, "decompress": _decompress,
                "sensitivity": _sensitivity, "cache": _cache}[args.command](args)
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
    if args.no_cache:
        pipeline.config.cache.enabled = False
    if args.cache_dir:
        os.environ["COMPRESSPIPE_CACHE_DIR"] = args.cache_dir  # beats the file, as documented
    if not args.debug:
        # MLflow narrates creating its sqlite tables at INFO; our own lines say what happens
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    if pipeline.config.search is not None:
        return _search(pipeline, args.resume)
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


def _sensitivity(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .core.artifact import Artifact
    from .core.data import build_data
    from .core.models import build_model
    from .pipeline.loader import load_pipeline
    from .pipeline.runner import resolve_device
    from .stages.sensitivity import SensitivityConfig, standalone_scan

    pipeline = load_pipeline(args.file, args.overrides)
    cfg = pipeline.config
    options = {"int8": args.int8, "max_batches": args.max_batches}
    for key in ("sparsities", "bits"):
        text = getattr(args, key)
        if text is not None:
            try:
                options[key] = [float(v) if key == "sparsities" else int(v)
                                for v in text.split(",") if v.strip()]
            except ValueError:
                raise CompressPipeError(f"--{key}: expected comma-separated numbers, found "
                                        f"{text!r}") from None
    try:
        config = SensitivityConfig(**options)
    except ValueError as exc:
        raise CompressPipeError(f"sensitivity options: {exc}") from None
    if args.stage:
        directory = pipeline.output_dir / args.stage
        if not (directory / "artifact.json").is_file():
            raise CompressPipeError(f"--stage {args.stage}: no saved stage output in {directory}")
        artifact = Artifact.load(directory)
        model, masks = artifact.model, artifact.masks
    else:
        model, masks = build_model(cfg.model, cfg.data)[0], {}
    out = (Path(args.output) if args.output
           else pipeline.output_dir / f"sensitivity-{args.stage or 'input'}")
    record = standalone_scan(config, model, masks, build_data(cfg.data),
                             resolve_device(cfg.device), out)
    print(f"{len(record['layers'])} layers scanned on the {record['split']} split; "
          f"{out / 'sensitivity.md'}")
    print((out / "sensitivity.md").read_text())
    return 0


def _search(pipeline, resume: bool) -> int:
    # lazy: only the command that runs loads what it needs (Optuna, torch)
    from .pipeline.search import run_search

    result = run_search(pipeline, resume=resume)
    print()
    print(result["table"])
    print(f"\nbest pipeline: {result['best_yaml'] or 'none met the objective'}")
    print(f"Pareto report: {result['report_md']}  (plot {result['plot']})")
    return 0


def _cache(args) -> int:
    # lazy: only the command that runs loads what it needs; --help stays instant
    from .pipeline.cache import StageCache, cache_dir
    from .pipeline.loader import load_pipeline

    if args.dir:
        root, max_gb = Path(args.dir).resolve(), args.max_gb
        if not root.is_dir():
            raise CompressPipeError(f"--dir {args.dir}: no such directory (no stage cache there)")
    else:
        pipeline = load_pipeline(args.file or quickstart_path(), check_model=False)
        root = cache_dir(pipeline.config.cache, pipeline.output_dir)
        max_gb = args.max_gb if args.max_gb is not None else pipeline.config.cache.max_gb
    cache = StageCache(root)
    if args.action == "prune":
        limit = 0 if args.all else (None if max_gb is None else int(max_gb * 1e9))
        done = cache.prune(limit)
        print(f"{root}: evicted {done['evicted']} entries, freed {done['freed_bytes']:,} bytes "
              f"of unused tensors; {done['size']:,} bytes now")
        return 0
    entries = cache.entries()
    print(f"{root}: {len(entries)} entries, {cache.size():,} bytes in all")
    print(f"{'key':<17} {'pipeline':<20} {'stage':<16} {'top1':>7} {'bytes':>12} "
          f"{'last used':<19} first run")
    for e in reversed(entries):  # most recently used first
        used = time.strftime("%Y-%m-%d %H:%M:%S",
                             time.localtime((e.path / "entry.json").stat().st_mtime))
        top1 = e.record.get("metrics", {}).get("test_top1")
        print(f"{e.key:<17} {str(e.info.get('pipeline'))[:20]:<20} {str(e.info.get('stage'))[:16]:<16} "
              f"{top1 if top1 is None else f'{top1:.2f}':>7} {cache.entry_bytes(e):>12,} {used:<19} "
              f"{e.origin_run or '-'}")
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
    from .formats import CpzFormatError, container_parts, inspect_cpz

    try:
        rows = inspect_cpz(args.file)
        parts = container_parts(args.file, rows)
    except (CpzFormatError, OSError) as exc:
        raise ArtifactError(f"{args.file}: {exc}") from exc
    print(f"{'tensor':<40} {'shape':<18} {'sparsity':>8} {'bits/w':>7} {'pos B':>8} "
          f"{'val B':>8} {'tab B':>6} {'bound B':>8}  bits/symbol (order-0 bound) pos | val")
    for r in rows:
        bound = sum(r.get(k) or 0 for k in ("positions_entropy_bits", "values_entropy_bits")) / 8
        rates = " | ".join(
            f"{8 * r[f'{s}_bytes'] / r[f'{s}_symbols']:.3f} ({r[f'{s}_entropy_bits'] / r[f'{s}_symbols']:.3f})"
            if r.get(f"{s}_symbols") else "-" for s in ("positions", "values"))
        print(f"{r['name'][:40]:<40} {str(tuple(r['shape'])):<18} {r['sparsity']:>8.1%} "
              f"{r['bits_per_weight']:>7.3f} {r.get('positions_bytes', 0):>8,} "
              f"{r.get('values_bytes', 0):>8,} {r.get('table_bytes', 0):>6,} {bound:>8,.0f}  "
              f"{rates}")
    total = parts["file"]
    print(f"total: {total:,} bytes in {len(rows)} tensors (format version {parts['version']})")
    for key in ("positions", "values", "side_arrays", "raw_tensors", "code_tables",
                "container_header", "container_metadata", "container_section_table",
                "container_digest", "overhead"):
        print(f"  {key:<24} {parts[key]:>10,} B  {parts[key] / max(total, 1):>7.2%}")
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
