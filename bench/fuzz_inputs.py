"""Fuzz the STAR, MRC and cryoSPARC .cs readers through the command line: N seeded cases, each in a fresh process.

    .venv/bin/python bench/fuzz_inputs.py [--n 1000] [--seed 0] [--jobs CPUS] [--runner fork|subprocess]
                                          [--confirm 40] [--out bench/results]

The cases, the mutations and the contract are tests/io/fuzz_cases.py's (tests/io/test_fuzz_inputs.py runs a few hundred
of them in its own process). Here every case runs in a process of its own: forked from this one after the imports
(--runner fork: `cryorefine.cli.main.main` with the process's stdout and stderr captured at the file descriptors, as a
fresh `python -m cryorefine.cli.main` would print them) or as a real `python -m cryorefine.cli.main` (--runner
subprocess, ~3 s of imports a case). --confirm K reruns K of the cases (every one with a problem, then a seeded sample)
as real subprocesses and compares exit code and stderr line count with the first run.

Writes OUT/<date>-fuzz-inputs.md and .json: cases per reader and mutation, exit codes, tracebacks, error messages of
more than one line or not naming the mutated file, damaged earlier outputs, bad results, bad inputs accepted, valid
inputs refused, timeouts, one message per mutation, wall time, machine, commit and command. Exit code 1 if any case
breaks the contract.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "io")]

import fuzz_cases as fc  # noqa: E402

CASE_TIMEOUT_S = 120.0


def run_capturing_fds(argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cryorefine ARGV` in this process, stdout and stderr captured at file descriptors
    1 and 2 (warnings, prints, anything a library writes); an uncaught exception prints its traceback, exit code 1,
    as the interpreter would."""
    from cryorefine.cli.main import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        out.seek(0), err.seek(0)
        return int(rc), out.read().decode(errors="replace"), err.read().decode(errors="replace")


RUNNERS = {"fork": run_capturing_fds, "subprocess": fc.run_in_subprocess}


def _child(case: fc.Case, base: Path, work: Path, runner: str) -> int:
    """In the forked process: run one case, write its result next to its project folder."""
    import torch

    torch.set_num_threads(1)  # one case per core
    folder = work / f"c{case.index:05d}"
    result = fc.run_case(case, base, folder, runner=RUNNERS[runner])
    (work / f"r{case.index:05d}.json").write_text(json.dumps(_clean(result, folder)))
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def _clean(result: dict, folder: Path) -> dict:
    """The result with the project folder shown as <project> in the messages."""
    out = dict(result)
    for key in ("message", "stderr", "result_error"):
        if isinstance(out.get(key), str):
            for f in {str(folder), os.path.realpath(folder)}:
                out[key] = out[key].replace(f, "<project>")
    return out


def run_cases(cases: list, base: Path, work: Path, jobs: int, runner: str, timeout: float) -> list[dict]:
    """Each case in a forked process, `jobs` at a time; a case over `timeout` seconds is killed and reported."""
    queue, running, results = list(cases), {}, []
    while queue or running:
        while queue and len(running) < jobs:
            case = queue.pop(0)
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 3
                try:
                    code = _child(case, base, work, runner)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            running[pid] = (case, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for p, (case, start) in list(running.items()):
                if now - start > timeout:
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.005)
            continue
        case, start = running.pop(pid)
        path = work / f"r{case.index:05d}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:  # killed (timeout) or the harness itself failed
            seconds = time.monotonic() - start
            results.append(
                {
                    **asdict(case),
                    "argv": fc.argv_for(case),
                    "detail": "",
                    "expect": "any",
                    "seconds": seconds,
                    "rc": -1,
                    "harness_failed": True,
                    "timed_out": seconds > timeout,
                    "message": f"no result (wait status {status}, {seconds:.0f} s)",
                }
            )
        done = len(results)
        if done % 100 == 0:
            print(f"{done}/{len(cases)} cases", flush=True)
    return sorted(results, key=lambda r: r["index"])


def problems(r: dict) -> list[str]:
    if r.get("harness_failed"):
        return ["timeout" if r.get("timed_out") else "harness failed"]
    return fc.problems(r)


def confirm(results: list, base: Path, work: Path, k: int, seed: int, jobs: int) -> dict:
    """Rerun k cases (those with a problem first, then a seeded sample) as real subprocesses; compare exit code and
    the number of stderr lines."""
    import numpy as np

    bad = [r["index"] for r in results if problems(r)]
    rest = [r["index"] for r in results if not problems(r)]
    rng = np.random.default_rng([seed, 99])
    pick = bad[:k] + [int(i) for i in rng.permutation(rest)[: max(0, k - len(bad))]]
    by_index = {r["index"]: r for r in results}
    cases = [fc.Case(**{f: by_index[i][f] for f in ("index", "seed", "reader", "kind", "command")}) for i in pick]
    again = run_cases(cases, base, work, jobs, "subprocess", CASE_TIMEOUT_S)
    lines = lambda r: len(str(r.get("stderr", "")).strip().splitlines())  # noqa: E731
    differ = []
    for r in again:
        first = by_index[r["index"]]
        if r["rc"] != first["rc"] or (r["rc"] == 2 and lines(r) != lines(first)):
            differ.append({"index": r["index"], "rc": [first["rc"], r["rc"]], "lines": [lines(first), lines(r)]})
    return {
        "cases": len(again),
        "agree": len(again) - len(differ),
        "differ": differ,
        "subprocess_problems": {r["index"]: problems(r) for r in again if problems(r)},
    }


def summarize(results: list) -> dict:
    count = lambda f: sum(1 for r in results if f(r))  # noqa: E731
    per_kind: dict = collections.defaultdict(lambda: collections.Counter())
    for r in results:
        c = per_kind[f"{r['reader']} / {r['kind']}"]
        c["cases"] += 1
        c[f"exit {r['rc']}"] += 1
        c["problems"] += bool(problems(r))
    return {
        "cases": len(results),
        "per_reader": dict(collections.Counter(r["reader"] for r in results)),
        "per_command": dict(collections.Counter(r["command"] for r in results)),
        "exit_codes": {str(k): v for k, v in sorted(collections.Counter(r["rc"] for r in results).items())},
        "tracebacks": count(lambda r: r.get("traceback")),
        "multi_line_messages": count(lambda r: r["rc"] == 2 and not r.get("one_line")),
        "messages_not_naming_the_file": count(lambda r: r["rc"] == 2 and not r.get("names_file")),
        "damaged_outputs": count(lambda r: r.get("outputs_kept") is False),
        "bad_results": count(lambda r: r["rc"] == 0 and r.get("result_error")),
        "bad_inputs_accepted": count(lambda r: r.get("accepted")),
        "valid_inputs_refused": count(lambda r: r.get("rejected_valid")),
        "other_exit_codes": count(lambda r: r["rc"] not in (0, 2)),
        "timeouts_or_harness_failures": count(lambda r: r.get("harness_failed")),
        "cases_with_problems": count(lambda r: bool(problems(r))),
        "per_mutation": {k: dict(v) for k, v in sorted(per_kind.items())},
        "seconds_per_case": {
            "median": sorted(r["seconds"] for r in results)[len(results) // 2] if results else 0.0,
            "max": max((r["seconds"] for r in results), default=0.0),
        },
    }


def _git(*args) -> str:
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def markdown(report: dict, results: list) -> str:
    s, m = report["summary"], report["machine"]
    t = s["seconds_per_case"]
    lines = [
        "# Fuzzed inputs through the command line",
        "",
        f"`{report['command']}` — {report['date']}, commit `{report['commit']}`"
        + (f" with {report['uncommitted_files']} uncommitted files" if report["uncommitted_files"] else "")
        + f", {m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}; {report['jobs']} processes, runner "
        f"`{report['runner']}`; wall time {report['wall_s']:.0f} s (the valid project built, every case run).",
        "",
        "Each case: a fresh copy of a tiny valid project (8 particles of 16² px from `cryorefine simulate`, its 16³",
        "map, the same particles as a cryoSPARC project), one seeded mutation of one input file, one command in a",
        "process of its own (`reconstruct --ctf --skip_gridding` for STAR files and stacks, `fsc` for maps, `convert`",
        "or `reconstruct` for .cs files; cases and contract in `tests/io/fuzz_cases.py`). Contract: no traceback;",
        "exit 0 with readable outputs, or exit 2 with one line on stderr naming the mutated file; earlier outputs in",
        "`out/` byte-identical unless the run succeeded.",
        "",
        "| | |",
        "|---|---|",
        f"| cases | {s['cases']} ({', '.join(f'{k} {v}' for k, v in s['per_reader'].items())}) |",
        f"| commands | {', '.join(f'{k} {v}' for k, v in s['per_command'].items())} |",
        f"| exit codes | {', '.join(f'{k}: {v}' for k, v in s['exit_codes'].items())} |",
        f"| tracebacks | {s['tracebacks']} |",
        f"| error messages of more than one line | {s['multi_line_messages']} |",
        f"| error messages not naming the file | {s['messages_not_naming_the_file']} |",
        f"| damaged earlier outputs | {s['damaged_outputs']} |",
        f"| exit 0 with unreadable or wrong outputs | {s['bad_results']} |",
        f"| bad inputs accepted (must be refused) | {s['bad_inputs_accepted']} |",
        f"| valid inputs refused | {s['valid_inputs_refused']} |",
        f"| other exit codes | {s['other_exit_codes']} |",
        f"| timeouts / harness failures | {s['timeouts_or_harness_failures']} |",
        f"| **cases breaking the contract** | **{s['cases_with_problems']}** |",
        f"| seconds per case (median, max) | {t['median']:.2f}, {t['max']:.2f} |",
    ]
    c = report.get("confirmation")
    if c:
        lines += [
            "",
            f"Rerun as real `python -m cryorefine.cli.main` subprocesses: {c['cases']} cases (every case with a "
            f"problem, then a seeded sample), {c['agree']} with the same exit code and stderr line count"
            + (f"; differing: {c['differ']}" if c["differ"] else "")
            + (f"; problems there: {c['subprocess_problems']}" if c["subprocess_problems"] else "")
            + f" ({c['wall_s']:.0f} s).",
        ]
    lines += [
        "",
        "## Per reader and mutation",
        "",
        "| reader / mutation | cases | exit 0 | exit 2 | other | problems |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    for kind, v in s["per_mutation"].items():
        other = v["cases"] - v.get("exit 0", 0) - v.get("exit 2", 0)
        lines.append(
            f"| {kind} | {v['cases']} | {v.get('exit 0', 0)} | {v.get('exit 2', 0)} | {other} | {v['problems']} |"
        )
    bad = [r for r in results if problems(r)]
    if bad:
        lines += [
            "",
            "## Cases breaking the contract",
            "",
            "| case | mutation | problems | stderr |",
            "|---|---|---|---|",
        ]
        for r in bad:
            text = str(r.get("stderr") or r.get("message", "")).strip().replace("\n", " // ").replace("|", "/")[-400:]
            lines.append(
                f"| {r['index']} | {r['reader']} / {r['kind']}: {r['detail']} | {', '.join(problems(r))} | `{text}` |"
            )
    lines += ["", "## One message per mutation (the first case of each that exits 2)", ""]
    first: dict = {}
    for r in results:
        if r["rc"] == 2:
            first.setdefault((r["reader"], r["kind"]), r)
    for (reader, kind), r in sorted(first.items()):
        lines.append(f"- {reader} / {kind} ({r['detail']}): `{r['message'].replace('|', '/')}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="number of cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases run at once")
    ap.add_argument("--runner", choices=sorted(RUNNERS), default="fork")
    ap.add_argument("--confirm", type=int, default=40, help="cases rerun as real subprocesses (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the .md and .json")
    ap.add_argument("--workdir", default=None, help="where the projects are made (default: a temporary folder)")
    ap.add_argument("--build-base", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.build_base:  # in a process of its own, so that this one forks before torch has run anything
        fc.build_base(a.build_base)
        return 0

    import cryorefine.cli.main  # noqa: F401  the imports each forked case would otherwise repeat
    import cryorefine.evaluation  # noqa: F401
    import cryorefine.io.cs_to_star  # noqa: F401
    import cryorefine.reconstruction.from_particles  # noqa: F401
    import cryorefine.validate  # noqa: F401

    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(["fuzz_inputs.py", *argv])
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fuzz-inputs-"))
    base = work / "base"
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "--build-base", str(base)], check=True, cwd=ROOT)
    cases = fc.make_cases(a.n, a.seed)
    results = run_cases(cases, base, work, a.jobs, a.runner, CASE_TIMEOUT_S)
    wall = time.time() - t0
    report = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_files": len([x for x in _git("status", "--porcelain").splitlines() if x.strip()]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "n": a.n,
        "seed": a.seed,
        "jobs": a.jobs,
        "runner": a.runner,
        "wall_s": wall,
        "summary": summarize(results),
    }
    if a.confirm > 0:
        t1 = time.time()
        (work / "confirm").mkdir()
        report["confirmation"] = confirm(results, base, work / "confirm", a.confirm, a.seed, a.jobs)
        report["confirmation"]["wall_s"] = time.time() - t1
    rows = [
        {k: r.get(k) for k in ("index", "reader", "kind", "command", "detail", "expect", "rc", "seconds", "message")}
        | {"seconds": round(r["seconds"], 3), "message": str(r.get("message", ""))[:300], "problems": problems(r)}
        for r in results
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today().isoformat()}-fuzz-inputs"
    head = json.dumps(report, indent=1, default=str)[:-2]  # the summary indented; the cases one a line
    body = ",\n".join(json.dumps(r, default=str) for r in rows)
    stem.with_suffix(".json").write_text(f'{head},\n "cases": [\n{body}\n ]\n}}\n')
    stem.with_suffix(".md").write_text(markdown(report, results))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    s = report["summary"]
    print(
        f"{s['cases']} cases in {wall:.0f} s: exit codes {s['exit_codes']}, {s['tracebacks']} tracebacks, "
        f"{s['cases_with_problems']} breaking the contract; wrote {stem}.md and .json"
    )
    return 1 if s["cases_with_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
