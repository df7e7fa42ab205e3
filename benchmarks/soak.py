"""Soak suite (issue 9): concurrency, kill-and-resume and fuzzing at volume. Not run in CI.

1. ``--pipelines N`` pipelines at once against one ``mlflow server`` (sqlite backend): every
   one must finish, with every run FINISHED and every measured metric present in MLflow.
2. ``--kills K`` rounds: a pipeline is SIGKILLed at a random moment, then ``--resume``d; its
   final metrics must equal an uninterrupted run's and no MLflow run may stay RUNNING.
3. ``--fuzz N`` seeded cases for each reader of untrusted files (pipeline YAML, the .cpz
   container, the .cpz model reader), run in a worker process under a per-case time limit and a
   resident-memory limit: any exception besides the reader's clear error, any hang, any death
   of the worker and any case past the memory limit is a failure.

Writes benchmarks/results/soak.json and soak.md (soak_quick.* for smaller counts, which
benchmarks/report.py shows as a quick run); exits 1 if anything failed.

Run: make soak   (full: 4 pipelines, 10 kills, 5000 cases per reader; roughly half an hour on 2 idle cores)
     .venv/bin/python benchmarks/soak.py --quick   (2 pipelines, 2 kills, 300 cases per reader)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the helpers shared with the tests; the fuzz workers (this file run again) import them too.
# Only tests/ is added: compresspipe itself must come from the snapshot in CODE (see main)
sys.path.insert(0, str(ROOT / "tests"))
from harness import (  # noqa: E402
    MlflowServer,
    cpz_assemble,
    cpz_blob_refs,
    cpz_reseal,
    cpz_split,
    yaml_paths,
)

CODE = ROOT  # where the runs import compresspipe from: a snapshot taken at start (see main)
RESULTS = Path(__file__).resolve().parent / "results"
IGNORED_METRICS = ("wall_time_s", "artifact_bytes")  # wall clock, and files holding it
FULL = (4, 10, 5000)  # the targets: pipelines at once, kill rounds, cases per reader
QUICK = (2, 2, 300)

PIPELINE = {
    "seed": 0,
    "model": {"name": "test_resnet"},
    "data": {"name": "digits", "image_size": 16, "batch_size": 64},
    "stages": [
        {"name": "dense", "train": {"epochs": 3, "lr": 0.05, "warmup_epochs": 0.5}},
        {"name": "gmp", "prune": {"method": "gmp", "sparsity": 0.8,
                                  "gmp": {"start_epoch": 0, "end_epoch": 1, "frequency": 5},
                                  "train": {"epochs": 2, "lr": 0.02}}},
        {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 4,
                                        "finetune": {"epochs": 1, "lr": 0.005}}},
        {"name": "huffman", "huffman": {}},
    ],
}


# -- processes ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(CODE), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _write_pipeline(path: Path, name: str, out: Path, uri: str) -> Path:
    import yaml

    cfg = copy.deepcopy(PIPELINE)
    cfg.update(name=name, output_dir=str(out), tracking={"uri": uri})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(path: Path, *extra: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        # cwd: `python -m` puts it first on sys.path, and it must not be the working tree
        return subprocess.Popen([sys.executable, "-m", "compresspipe", "run", str(path), *extra],
                                env=_env(), stdout=f, stderr=subprocess.STDOUT, cwd=CODE)


def _metrics(summary: dict) -> dict[str, dict[str, float]]:
    return {s["name"]: {k: v for k, v in s["metrics"].items() if k not in IGNORED_METRICS}
            for s in summary["stages"]}


def _tracking_problems(uri: str, experiment: str, summary: dict) -> list[str]:
    """Runs not FINISHED, runs missing, metrics missing: everything MLflow should hold."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [f"no experiment {experiment!r}"]
    runs = client.search_runs([exp.experiment_id])
    problems = [f"run {r.info.run_name} is {r.info.status}" for r in runs
                if r.info.status != "FINISHED"]
    by_name = {r.info.run_name: r for r in runs}
    stages = [s for s in summary["stages"] if s["name"] != "input"]
    if len(runs) != len(stages) + 1:
        problems.append(f"{len(runs)} runs for {len(stages)} stages + parent")
    for record in stages:
        run = by_name.get(record["name"])
        if run is None:
            problems.append(f"no run for stage {record['name']}")
            continue
        missing = sorted(set(record["metrics"]) - set(run.data.metrics))
        if missing:
            problems.append(f"stage {record['name']}: metrics missing {missing[:5]}")
    parent = by_name.get(summary["pipeline"])
    if parent is None or not any(k.startswith("final.") for k in parent.data.metrics):
        problems.append("parent run without final.* metrics")
    return problems


# -- 1. pipelines at once ---------------------------------------------------------------------


def soak_concurrent(n: int, server: MlflowServer, work: Path) -> dict[str, Any]:
    print(f"== {n} pipelines at once against {server.url}", flush=True)
    started = time.monotonic()
    procs = {}
    for i in range(n):
        name = f"soak-concurrent-{i}"
        path = _write_pipeline(work / f"{name}.yaml", name, work / name, server.url)
        procs[name] = _run(path, log=work / f"{name}.log")
    results = []
    for name, proc in procs.items():
        rc = proc.wait()
        summary_path = work / name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        problems = [] if rc == 0 else [f"exit code {rc}, see {work / f'{name}.log'}"]
        if summary.get("status") == "finished":
            problems += _tracking_problems(server.url, name, summary)
        results.append({"pipeline": name, "exit_code": rc, "problems": problems,
                        "final_top1": (summary.get("stages") or [{}])[-1].get("metrics", {})
                        .get("test_top1")})
        print(f"   {name}: exit {rc}, {len(problems)} problem(s) {problems[:2]}", flush=True)
    ok = sum(1 for r in results if not r["problems"])
    return {"pipelines": n, "completed": ok, "wall_s": round(time.monotonic() - started, 1),
            "runs": results}


# -- 2. kill at random moments, then resume ------------------------------------------------------


def soak_kills(k: int, server: MlflowServer, work: Path, rng: random.Random) -> dict[str, Any]:
    print(f"== {k} SIGKILL + --resume rounds", flush=True)
    ref_path = _write_pipeline(work / "ref.yaml", "soak-ref", work / "ref", server.url)
    started = time.monotonic()
    rc = _run(ref_path, log=work / "ref.log").wait()
    ref_wall = time.monotonic() - started
    if rc != 0:
        raise RuntimeError(f"reference run failed, see {work / 'ref.log'}")
    expected = _metrics(json.loads((work / "ref" / "summary.json").read_text()))
    print(f"   reference run: {ref_wall:.1f} s", flush=True)
    rounds = []
    for i in range(k):
        name = f"soak-kill-{i}"
        out = work / name
        path = _write_pipeline(work / f"{name}.yaml", name, out, server.url)
        delay = rng.uniform(0.05, 0.85) * ref_wall  # timings vary: leave room to land mid-run
        proc = _run(path, log=work / f"{name}.log")
        try:
            proc.wait(delay)
            killed = False  # finished before the kill: still a valid round, noted as such
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
        summary_path = out / "summary.json"
        at = "before any summary"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            at = f"in {s.get('running', {}).get('name') or 'between stages'}, " \
                 f"{len(s.get('stages', []))} stage(s) saved"
        resume_rc = _run(path, "--resume", log=work / f"{name}.log").wait()
        problems = [] if resume_rc == 0 else [f"resume exit code {resume_rc}"]
        if resume_rc == 0:
            final = json.loads(summary_path.read_text())
            if _metrics(final) != expected:
                diff = [s for s in expected if _metrics(final).get(s) != expected[s]]
                problems.append(f"metrics differ in stages {diff}")
            problems += _tracking_problems(server.url, name, final)
        rounds.append({"round": i, "kill_after_s": round(delay, 2), "killed": killed,
                       "killed_at": at, "problems": problems})
        print(f"   round {i}: kill after {delay:.1f} s ({at}): "
              f"{problems or 'identical'}", flush=True)
    identical = sum(1 for r in rounds if not r["problems"])
    return {"rounds": k, "identical": identical, "reference_wall_s": round(ref_wall, 1),
            "killed_mid_run": sum(r["killed"] for r in rounds), "details": rounds}


# -- 3. fuzzing: the worker ------------------------------------------------------------------------


TOKENS = ["\n", " ", "- ", ": ", "{", "}", "[", "]", ",", "'", '"', "#", "&a ", "*a", "<<: *a",
          "!!python/object/apply:os.system ['true']", "!!binary aGk=", "? ", "|", ">", "---\n",
          "~", "null", "1e999", ".nan", "-.inf", "0x1F", "\t", "\x00", "é", "../../etc",
          "/abs", "stage:dense", "stage:nope", "99999999999999999999", "-1", "0", "epochs",
          "factory: os:system", "pkg.mod:Stage", "prune", "cluster", "huffman", "sparsity"]
HOSTILE = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63, 10**100, 0.5, 1e308, float("inf"),
           float("nan"), "", "../../x", "/etc/passwd", "stage:dense", "stage:missing",
           "os:system", "a" * 5000, "\x00", [], {}, [[[]]], {"a": {"b": None}}, ["x"] * 20,
           "resnet18", "test_resnet", "global", "layer", "*", "fc.*"]
PLAUSIBLE = [0, 1, 2, 3, 0.0, 0.1, 0.5, 0.9, 0.99, 1.0, 4, 8, 16, True, False, None, "global",
             "layer", "cosine", "constant", "sgd", "adamw", "l1", "magnitude", "lth", "gmp",
             "stage:dense", "stage:ticket", "fc", "conv1", "layer1.*", "*.weight", {}, []]
JSON_HOSTILE = [None, True, 0, -1, 1, 3, 255, 256, 2**16, 2**24, 2**31, 2**32, 2**62, 2**64,
                0.5, "", "huffman", "raw", "relidx", "runs", "bitmap", "float32", "int64", "bool",
                "clustered", "int8", "../x", [], [0], [2**31, 2**31], {}, "os:system",
                {"source": "factory", "factory": "os:system", "kwargs": {"command": "true"}}]
FUZZ_YAML = """\
name: fuzz
output_dir: {out}
model: {{name: test_resnet}}
data: {{name: digits, image_size: 16, batch_size: 64}}
tracking: {{enabled: false}}
stages:
  - name: dense
    train: {{epochs: 2, lr: 0.05, warmup_epochs: 0.5, record_rewind: {{epoch: 0.5}}}}
  - name: ticket
    prune:
      method: lth
      sparsity: 0.9
      rounds: 2
      train: {{epochs: 1, lr: 0.05}}
      distill: {{teacher: "stage:dense", temperature: 4}}
  - name: gmp
    prune: {{method: gmp, sparsity: 0.95, gmp: {{end_epoch: 1}}, train: {{epochs: 2}}}}
  - name: cluster
    cluster: {{conv_bits: 4, linear_bits: 4, overrides: {{fc: 3}}, finetune: {{epochs: 1}}}}
  - huffman: {{}}
"""


def _node(root: Any, path: tuple) -> Any:
    for part in path:
        root = root[part]
    return root


def _mutate_structure(rng: random.Random, doc: Any, pool: list) -> Any:
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(yaml_paths(doc)[1:] or [()])
        if not path:
            break
        parent = _node(doc, path[:-1])
        op = rng.choice(["replace", "replace", "add", "drop"])
        if op == "add" and isinstance(parent, dict):
            parent[rng.choice(["extra", "name", "factory", "epochs", "uri", 0])] = \
                copy.deepcopy(rng.choice(pool))
        elif op == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(pool))
    return doc


def _mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(text))
        j = min(len(text), i + rng.randint(0, 20))
        op = rng.choice(["insert", "delete", "replace", "dup", "swap"])
        if op == "insert":
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "replace":
            text = text[:i] + rng.choice(TOKENS) + text[j:]
        else:
            lines = text.splitlines(keepends=True)
            if len(lines) > 1:
                k = rng.randrange(len(lines) - 1)
                if op == "dup":
                    lines.insert(k, lines[k])
                else:
                    lines[k], lines[k + 1] = lines[k + 1], lines[k]
                text = "".join(lines)
    return text


def _mutate_cpz(rng: random.Random, data: bytes) -> bytes:
    from compresspipe.formats import cpz

    kind = rng.choice(["bytes", "resealed", "json", "spec", "blob", "blob"])
    if kind in ("json", "spec", "blob"):
        meta, table, payload = cpz_split(data)
        if kind == "blob":
            ref = rng.choice([r for r in cpz_blob_refs(table) if r["length"]])
            blob = bytearray(payload[ref["offset"]: ref["offset"] + ref["length"]])
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(blob))
                blob[at] = rng.choice([blob[at] ^ (1 << rng.randrange(8)), 0, 0x80, 0xFF])
            ref["crc32"] = zlib.crc32(blob)
            payload = payload[: ref["offset"]] + bytes(blob) + payload[ref["offset"] + len(blob):]
        elif kind == "spec" and isinstance(meta.get("spec"), dict):
            meta["spec"] = _mutate_structure(rng, meta["spec"], JSON_HOSTILE)
        else:
            doc = _mutate_structure(rng, {"meta": meta, "table": table}, JSON_HOSTILE)
            meta, table = doc.get("meta"), doc.get("table")
        try:
            return cpz_assemble(meta, table, payload)
        except (TypeError, ValueError):
            return data
    buf = bytearray(data if kind == "bytes" else data[: -cpz._DIGEST_SIZE])
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(max(len(buf), 1))
        op = rng.choice(["flip", "byte", "u32", "insert", "delete", "truncate"])
        if op == "flip" and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == "byte" and buf:
            buf[at] = rng.randrange(256)
        elif op == "u32" and len(buf) >= 4:
            at = min(at, len(buf) - 4)
            buf[at: at + 4] = struct.pack("<I", rng.choice([0, 1, 2**31, 2**32 - 1,
                                                             rng.randrange(2**32)]))
        elif op == "insert":
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del buf[at: at + rng.randint(1, 16)]
        else:
            del buf[at:]
    return bytes(buf) if kind == "bytes" else cpz_reseal(bytes(buf))


class Reader:
    """One reader under test: builds its base input once, then runs case ``i`` of ``seed``."""

    def __init__(self, name: str, work: Path):
        import numpy as np
        import yaml

        self.name, self.work = name, work
        if name == "canary":
            return
        if name == "yaml":
            self.text = FUZZ_YAML.format(out=work / "never-written")
            self.doc = yaml.safe_load(self.text)
        elif name == "cpz":
            from compresspipe.formats import cpz, encode_clustered, encode_raw

            rng = np.random.default_rng(7)
            tensors = {}
            for tname, density in (("sparse", 0.05), ("mid", 0.4), ("dense", 1.0)):
                w = rng.normal(size=(6, 4, 3, 3))
                keep = np.abs(w) >= np.quantile(np.abs(w), 1 - density)
                idx = np.where(keep, rng.integers(1, 16, size=w.shape), 0).astype(np.uint8)
                book = np.concatenate([[0.0], np.linspace(-1, 1, 15)]).astype(np.float32)
                tensors[f"{tname}.weight"] = encode_clustered(idx, book)
            tensors["bias"] = encode_raw(rng.normal(size=6).astype(np.float16))
            self.data = cpz.pack_cpz(tensors, {"arch": "fuzz"})
        else:
            import timm
            import torch

            from compresspipe.core.artifact import Artifact
            from compresspipe.formats.cpz_model import write_model_cpz

            torch.manual_seed(0)
            spec = {"source": "timm", "name": "test_resnet",
                    "kwargs": {"in_chans": 1, "num_classes": 10}}
            model = timm.create_model("test_resnet", **spec["kwargs"]).eval()
            base = work / "base.cpz"
            write_model_cpz(Artifact(model=model, spec=spec, lineage=[{"name": "dense"}]), base,
                            float_dtype="float16")
            self.data = base.read_bytes()
        self.run_case(-1, 0)  # warm up: imports and the first model build are not a case

    def run_case(self, seed: int, i: int) -> str:
        """The outcome of case ``i``: 'ok', or the clear error's type; anything else raises."""
        from compresspipe.core.errors import ArtifactError, ConfigError
        from compresspipe.formats import CpzFormatError, unpack_cpz
        from compresspipe.pipeline.loader import load_pipeline

        rng = random.Random(f"{seed}:{self.name}:{i}")
        if self.name == "canary":  # misbehaves on purpose, to prove the harness sees it
            if i == 1:
                raise ValueError("canary crash")
            if i == 2:
                time.sleep(3600)
            if i == 3:
                hog = [bytearray(16 << 20) for _ in range(64)]  # 1 GB, touched
                time.sleep(60 + len(hog))
            if i == 4:
                os._exit(3)
            return "ok"
        if self.name == "yaml":
            import yaml

            kind = "base" if seed < 0 else rng.choice(["text", "structure", "plausible",
                                                       "plausible", "noise"])
            if kind == "text":
                source: Any = _mutate_text(rng, self.text)
            elif kind in ("structure", "plausible"):
                pool = HOSTILE if kind == "structure" else PLAUSIBLE  # plausible: more pass
                doc = _mutate_structure(rng, copy.deepcopy(self.doc), pool)
                source = yaml.safe_dump(doc, allow_unicode=True) if rng.random() < 0.5 else doc
            elif kind == "noise":
                source = rng.randbytes(rng.randint(0, 300)).decode("latin-1")
            else:
                source = self.text
            if isinstance(source, str):
                path = self.work / "case.yaml"
                path.write_text(source, encoding="utf-8", errors="surrogatepass")
                source = path
            try:
                load_pipeline(source)
                return "valid"
            except ConfigError:
                return "ConfigError"
        data = self.data if seed < 0 else _mutate_cpz(rng, self.data)
        if self.name == "cpz":
            try:
                for t in unpack_cpz(data, max_elements=1 << 24)[0].values():
                    t.to_dense()
                return "decoded"
            except CpzFormatError:
                return "CpzFormatError"
        from compresspipe.formats.cpz_model import read_model_cpz

        path = self.work / "case.cpz"
        path.write_bytes(data)
        try:
            read_model_cpz(path)
            return "decoded"
        except ArtifactError:
            return "ArtifactError"


def fuzz_worker(reader: str, seed: int, work: Path) -> None:
    """Reads case numbers from stdin, answers one JSON line each (the parent keeps time)."""
    r = Reader(reader, work)
    print(json.dumps({"ready": True}), flush=True)
    while line := sys.stdin.readline():
        i = int(line)
        try:
            outcome = r.run_case(seed, i)
        except BaseException as exc:  # noqa: BLE001 - the whole point: report, not die
            tb = traceback.format_exception(exc)
            outcome = f"CRASH {type(exc).__name__}: {str(exc)[:200]} | {tb[-2].strip()[:300]}"
        print(json.dumps({"i": i, "outcome": outcome}), flush=True)


# -- 3. fuzzing: the parent ----------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Worker:
    def __init__(self, reader: str, seed: int, work: Path):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", reader, "--seed", str(seed),
             "--workdir", str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=_env(), text=True, bufsize=1, cwd=CODE)
        self.peak_mb = 0.0
        if self.read(300.0, 1e9) is None:
            raise RuntimeError(f"fuzz worker for {reader} did not start")

    def read(self, timeout: float, memory_mb: float) -> dict | str | None:
        """The worker's next line; 'hang' / 'memory' / 'died' when it does not come."""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            rss = _rss_mb(self.proc.pid)
            self.peak_mb = max(self.peak_mb, rss)
            if ready:
                line = self.proc.stdout.readline()
                return json.loads(line) if line else "died"
            if rss > memory_mb:
                return "memory"
            if self.proc.poll() is not None:
                return "died"
            if time.monotonic() > deadline:
                return "hang"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def soak_fuzz(n: int, seed: int, work: Path, case_timeout: float, memory_mb: float,
              readers: tuple[str, ...] = ("yaml", "cpz", "cpz-model")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for reader in readers:
        print(f"== fuzzing the {reader} reader: {n} cases", flush=True)
        started = time.monotonic()
        outcomes: dict[str, int] = {}
        failures: list[dict[str, Any]] = []
        slowest = 0.0
        peak = 0.0
        worker = Worker(reader, seed, work)
        for i in range(n):
            t0 = time.monotonic()
            worker.proc.stdin.write(f"{i}\n")
            worker.proc.stdin.flush()
            reply = worker.read(case_timeout, memory_mb)
            slowest = max(slowest, time.monotonic() - t0)
            if isinstance(reply, dict) and not reply["outcome"].startswith("CRASH"):
                outcomes[reply["outcome"]] = outcomes.get(reply["outcome"], 0) + 1
                continue
            kind = reply if isinstance(reply, str) else "crash"
            detail = reply["outcome"] if isinstance(reply, dict) else kind
            failures.append({"case": i, "kind": kind, "detail": detail})
            print(f"   case {i}: {detail}", flush=True)
            if kind != "crash":  # the worker is stuck, dead or too big: start a fresh one
                peak = max(peak, worker.peak_mb)
                worker.close()
                worker = Worker(reader, seed, work)
        peak = max(peak, worker.peak_mb)
        worker.close()
        counts = {label: sum(f["kind"] == kind for f in failures) for kind, label in
                  (("crash", "crashes"), ("hang", "hangs"), ("memory", "over_memory"),
                   ("died", "worker_deaths"))}
        out[reader] = {"cases": n, "outcomes": outcomes, **counts, "failures": failures[:50],
                       "slowest_case_s": round(slowest, 3), "peak_rss_mb": round(peak, 1),
                       "wall_s": round(time.monotonic() - started, 1)}
        print(f"   {reader}: {outcomes}; {len(failures)} failure(s); slowest case "
              f"{slowest:.2f} s; peak RSS {peak:.0f} MB", flush=True)
    return out


# -- report ------------------------------------------------------------------------------------


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Soak suite", "", f"`{r['command']}` on {r['machine']}, {r['date']}", "",
             "| check | target | result |", "|---|---|---|"]
    if "concurrent" in r:
        c = r["concurrent"]
        lines.append(f"| {c['pipelines']} pipelines at once, one `mlflow server` | all complete, "
                     f"every metric in MLflow | {c['completed']}/{c['pipelines']} "
                     f"({c['wall_s']} s) |")
    if "kills" in r:
        k = r["kills"]
        lines.append(f"| SIGKILL at a random moment, then `--resume` | identical final metrics, "
                     f"no run left RUNNING | {k['identical']}/{k['rounds']} identical "
                     f"({k['killed_mid_run']} killed mid-run) |")
    if "harness_check" in r:
        h = r["harness_check"]
        lines.append(f"| fuzz harness on a canary that crashes, hangs, hogs memory and dies | "
                     f"each seen once | {h['crashes']}, {h['hangs']}, {h['over_memory']}, "
                     f"{h['worker_deaths']} |")
    for reader, f in r.get("fuzz", {}).items():
        outcomes = ", ".join(f"{v} {k}" for k, v in sorted(f["outcomes"].items()))
        lines.append(f"| fuzz `{reader}` reader, {f['cases']} cases | 0 crashes, 0 hangs "
                     f"(≤ {r['case_timeout_s']} s each), RSS ≤ {r['memory_mb']:.0f} MB | "
                     f"{f['crashes']} crashes, {f['hangs']} hangs, {f['over_memory']} over "
                     f"memory, {f['worker_deaths']} worker deaths; slowest "
                     f"{f['slowest_case_s']} s, peak RSS "
                     f"{f['peak_rss_mb']} MB; {outcomes} |")
    lines += ["", f"Overall: **{'PASS' if r['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"defaults of {QUICK} instead of {FULL} (pipelines, kills, fuzz)")
    p.add_argument("--pipelines", type=int, help="pipelines at once")
    p.add_argument("--kills", type=int, help="kill-and-resume rounds")
    p.add_argument("--fuzz", type=int, help="cases per reader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-timeout", type=float, default=10.0, help="seconds per fuzz case")
    p.add_argument("--memory-mb", type=float, default=3000.0, help="RSS limit of a fuzz worker")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fuzz_worker(args.worker, args.seed, args.workdir)
        return 0
    defaults = QUICK if args.quick else FULL
    for key, value in zip(("pipelines", "kills", "fuzz"), defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    # a run below the targets is reported as a quick one, never as the soak itself
    quick = any(getattr(args, k) < v for k, v in zip(("pipelines", "kills", "fuzz"), FULL,
                                                         strict=True))

    work = args.workdir or Path(tempfile.mkdtemp(prefix="compresspipe-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    # every run of the soak imports the code as it was at the start: the working tree may be
    # edited during an hour-long soak, and runs of two versions would never agree
    global CODE
    CODE = work / "code"
    shutil.rmtree(CODE, ignore_errors=True)
    shutil.copytree(ROOT / "compresspipe", CODE / "compresspipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    rng = random.Random(args.seed)
    report: dict[str, Any] = {
        "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M"), "seed": args.seed, "quick": quick,
        "case_timeout_s": args.case_timeout, "memory_mb": args.memory_mb}
    started = time.monotonic()
    if args.pipelines or args.kills:
        with MlflowServer(work, workers=2, start_timeout=180) as server:
            if args.pipelines:
                report["concurrent"] = soak_concurrent(args.pipelines, server, work)
            if args.kills:
                report["kills"] = soak_kills(args.kills, server, work, rng)
    if args.fuzz:
        # the harness must see each kind of failure, or its zeros below would mean nothing
        canary = soak_fuzz(6, 0, work, case_timeout=3.0, memory_mb=300.0,
                           readers=("canary",))["canary"]
        report["harness_check"] = {k: canary[k] for k in ("crashes", "hangs", "over_memory",
                                                          "worker_deaths")}
        report["harness_check"]["passed"] = all(v == 1 for v in report["harness_check"].values())
        report["fuzz"] = soak_fuzz(args.fuzz, args.seed, work, args.case_timeout,
                                   args.memory_mb)
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["passed"] = (
        ("concurrent" not in report
         or report["concurrent"]["completed"] == report["concurrent"]["pipelines"])
        and ("kills" not in report or report["kills"]["identical"] == report["kills"]["rounds"])
        and report.get("harness_check", {}).get("passed", True)
        and all(not (f["crashes"] or f["hangs"] or f["over_memory"] or f["worker_deaths"])
                for f in report.get("fuzz", {}).values()))
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "soak_quick" if quick else "soak"
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
