"""Load test of `cm-diffusers serve` against the offline pipeline, measured in the same run.

Starts the server on the shipped model (its own process group, loopback only), then:
  unloaded     latency of single-image requests sent one at a time,
  saturation   closed loop, 2 x max_batch_size images in flight, as single-image requests (the primary number)
               and as 8-image requests -> images/s, in slices interleaved with
  offline      ConsistencyPipeline images/s at the server's max batch size, in this process, same torch threads as
               a replica, so that both see the same neighbours; throughput_ratio = server / offline images/s,
  load levels  open loop (Poisson arrivals) at 25/50/75 % of the saturation request rate -> p50/p95/p99 latency,
  fault run    (--engine ray) open loop at 50 %; the model replica's process is killed (SIGKILL) a few seconds in;
               Ray Serve restarts it. Reports failed requests (status, count), whether any hung, and the time to
               recovery. The embedded engine is one process: restarting it is the process manager's job.
  hops         where an unloaded request's time goes: the offline pipeline's 1-image call (PIL output), one forward
               pass at batch 1, PNG encoding and base64 of one image, measured in this process.
Batch sizes formed come from the server's /metrics (histogram deltas per phase). Errors must be 0 outside the
fault run. Targets: throughput_ratio >= 0.8 and p99 at 50 % load <= 3 x the unloaded p50.
Writes benchmarks/results/serve_load_ENGINE.{json,png}. The load generator (asyncio + aiohttp) shares the machine's
cores with the server: on a small machine, read the ratios more than the absolute numbers.

    python benchmarks/serve_load.py [--model fashion-mnist-cd] [--max_batch_size 32] [--phase_s 15] [--quick]
"""

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cm_diffusers import ConsistencyPipeline  # noqa: E402
from cm_diffusers.serving.local import LocalServer, ServerStartError  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
KEY = "benchmark-key-" + "x" * 24


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-mnist-cd", help="Model to serve (shipped name or folder).")
    parser.add_argument("--engine", choices=("embedded", "ray"), default="embedded", help="`serve --engine`.")
    parser.add_argument("--device", default="cpu", help="Device of the server's model and of the offline pipeline.")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="Dtype of both.")
    parser.add_argument("--max_batch_size", type=int, default=32, help="Server max batch size (images).")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0, help="Server batch wait.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica and of the offline run.")
    parser.add_argument("--phase_s", type=float, default=15.0, help="Seconds per load phase.")
    parser.add_argument("--fault_s", type=float, default=45.0, help="Seconds of the fault run.")
    parser.add_argument("--quick", action="store_true", help="Short phases (a smoke run, not for the README).")
    parser.add_argument("--output", default=None, help="Output path without suffix (default: "
                                                       "benchmarks/results/serve_load_ENGINE).")
    parser.add_argument("--table", default=None, metavar="JSON",
                        help="Only print the README table of an existing result file.")
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------------------------
# The server


def local_server(args, log_path) -> LocalServer:
    key_file = os.path.join(os.path.dirname(log_path), "keys.txt")
    with open(key_file, "w") as f:
        f.write(KEY + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE", CM_DIFFUSERS_API_KEYS="")
    ray = ["--ray_ports_beyond_loopback"] if args.engine == "ray" else []  # a loopback benchmark on a test machine
    command = ["serve", "--engine", args.engine, *ray, "--model", args.model, "--api_key_file", key_file,
               "--device", args.device, "--dtype", args.dtype,
               "--rate_limit", "0", "--auth_failures_per_minute", "0",
               "--max_batch_size", str(args.max_batch_size), "--batch_wait_ms", str(args.batch_wait_ms),
               "--num_cpus_per_replica", str(args.threads)]  # fmt: skip
    return LocalServer(command, log_path=log_path, env=env, timeout_s=600)


def replica_pids(server_pid: int) -> list:
    """PIDs of the model replica processes started under our server (descendants of its process only)."""
    import psutil

    return [p.pid for p in psutil.Process(server_pid).children(recursive=True)
            if "ServeReplica:cm-diffusers:ConsistencyModel" in " ".join(_cmdline(p))]


def _cmdline(process):
    try:
        return process.cmdline()
    except Exception:
        return []


# ----------------------------------------------------------------------------------------------------------------
# Load generation


async def one_request(session, url, seed, records, started_at, timeout_s, num_images=1):
    import aiohttp

    sent = time.perf_counter()
    status = None
    try:
        async with session.post(url + "/v1/generate", json={"num_images": num_images, "seed": seed},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            await response.read()
            status = response.status
    except asyncio.TimeoutError:
        status = "timeout"
    except Exception as error:  # connection reset etc.: recorded, never silent
        status = type(error).__name__
    done = time.perf_counter()
    records.append({"sent": sent - started_at, "done": done - started_at, "latency": done - sent, "status": status,
                    "images": num_images})


async def closed_loop(url, concurrency, duration_s, timeout_s=120, num_images=1):
    import aiohttp

    records, started = [], time.perf_counter()
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(i):
            seed = i * 1_000_000
            while time.perf_counter() - started < duration_s:
                await one_request(session, url, seed, records, started, timeout_s, num_images)
                seed += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return records, time.perf_counter() - started


async def open_loop(url, rate, duration_s, timeout_s=120, at=None):
    """Poisson arrivals at `rate` requests/s for `duration_s`; `at(t)` runs once when t seconds have passed."""
    import aiohttp

    records, tasks, started = [], [], time.perf_counter()
    rng = random.Random(0)
    headers = {"Authorization": f"Bearer {KEY}"}
    next_time, seed, fired = 0.0, 0, at is None
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        while next_time < duration_s:
            delay = next_time - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            if not fired and time.perf_counter() - started >= at[0]:
                at[1]()
                fired = True
            tasks.append(asyncio.create_task(one_request(session, url, seed, records, started, timeout_s)))
            seed += 1
            next_time += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return records, time.perf_counter() - started


def saturation(url, pipe, args) -> tuple:
    """Offline and server throughput in interleaved slices (offline, 1-image requests, 8-image requests, repeated),
    so that both see the same neighbours on a shared machine; returns (offline, 1-image phase, 8-image phase)."""
    rounds = 3
    slice_s = args.phase_s / rounds
    offline_images, offline_s, phases = 0, 0.0, {}
    for _ in range(rounds):
        started = time.perf_counter()
        offline_images += offline_images_count(pipe, args.max_batch_size, slice_s)
        offline_s += time.perf_counter() - started
        for num_images in (1, 8):
            concurrency = max(2, 2 * args.max_batch_size // num_images)
            before = scrape(url)
            records, elapsed = asyncio.run(closed_loop(url, concurrency, slice_s, num_images=num_images))
            phase = phases.setdefault(num_images, {"records": [], "elapsed": 0.0, "batches": []})
            phase["records"] += records
            phase["elapsed"] += elapsed
            phase["batches"].append(batch_delta(before, scrape(url)))
    offline = {"batch_size": args.max_batch_size, "images_per_s": round(offline_images / offline_s, 2)}
    results = []
    for num_images, phase in sorted(phases.items()):
        summary = {**summarize(phase["records"], phase["elapsed"]), "images_per_request": num_images,
                   "concurrency": max(2, 2 * args.max_batch_size // num_images),
                   "batches": merge_batches(phase["batches"])}
        summary["throughput_ratio"] = round(summary["images_per_s"] / offline["images_per_s"], 3)
        print(f"saturation ({num_images} image(s) per request)", summary, flush=True)
        results.append(summary)
    return offline, results[0], results[1]


def merge_batches(deltas) -> dict:
    batches = sum(d["batches"] for d in deltas)
    images = sum(d["batches"] * (d["mean_images"] or 0) for d in deltas)
    histogram = {}
    for d in deltas:
        for key, count in d["histogram"].items():
            histogram[key] = histogram.get(key, 0) + count
    order = sorted(histogram, key=lambda k: float(k[2:]) if k[2:] != "+Inf" else float("inf"))
    return {"batches": batches, "mean_images": round(images / batches, 2) if batches else None,
            "histogram": {k: histogram[k] for k in order}}


def scrape(url) -> dict:
    import requests

    text = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    values = {}
    for name in ("cm_batch_size_images", "cm_batch_size_requests"):
        values[name] = {
            "count": float(re.search(rf"^{name}_count (\S+)", text, re.M).group(1)),
            "sum": float(re.search(rf"^{name}_sum (\S+)", text, re.M).group(1)),
            "buckets": {le: float(v) for le, v in re.findall(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)', text, re.M)},
        }
    return values


def batch_delta(before, after) -> dict:
    b, a = before["cm_batch_size_images"], after["cm_batch_size_images"]
    count = a["count"] - b["count"]
    buckets = {le: a["buckets"][le] - b["buckets"].get(le, 0) for le in a["buckets"]}
    per_bucket, previous = {}, 0.0
    for le, cumulative in buckets.items():
        per_bucket[f"<={le}"] = int(cumulative - previous)
        previous = cumulative
    return {"batches": int(count), "mean_images": round((a["sum"] - b["sum"]) / count, 2) if count else None,
            "histogram": {k: v for k, v in per_bucket.items() if v}}


def summarize(records, elapsed) -> dict:
    """Counts, errors by status, throughput and latency percentiles of one phase (and the machine's load then)."""
    ok = [r["latency"] * 1000 for r in records if r["status"] == 200]
    errors = {}
    for r in records:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    pct = (lambda q: round(float(np.percentile(ok, q)), 1)) if ok else (lambda q: None)
    images = sum(r["images"] for r in records if r["status"] == 200)
    return {"requests": len(records), "ok": len(ok), "errors": errors, "requests_per_s": round(len(ok) / elapsed, 2),
            "images_per_s": round(images / elapsed, 2), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "load_average_1min": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------------------------------------------
# Offline baseline


def offline_images_count(pipe, batch_size, seconds) -> int:
    """Images the offline pipeline makes in `seconds` (whole batches; the clock is the caller's)."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(count))
        count += 1
    return count * batch_size


def markdown_table(result) -> str:
    """The README table of one result."""
    rows = ["| phase | offered req/s | req/s | images/s | p50 ms | p95 ms | p99 ms | batches formed: mean images "
            "(histogram) | errors |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name, phase, offered="closed loop"):
        batches = phase.get("batches")
        formed = f"{batches['mean_images']} ({', '.join(f'{k}: {v}' for k, v in batches['histogram'].items())})" \
            if batches and batches["batches"] else "-"
        errors = sum(phase["errors"].values())
        rows.append(f"| {name} | {offered} | {phase['requests_per_s']} | {phase['images_per_s']} | {phase['p50_ms']} "
                    f"| {phase['p95_ms']} | {phase['p99_ms']} | {formed} | {errors} |")

    row("unloaded (1 client)", result["unloaded"])
    row("saturation, 1 image/request (64 clients)", result["saturation"])
    eight = result["saturation_8_images_per_request"]
    row(f"saturation, 8 images/request ({eight['concurrency']} clients)", eight)
    for level in result["load_levels"]:
        row(f"{int(level['fraction'] * 100)} % of saturation", level, level["offered_requests_per_s"])
    fault = result.get("fault")
    if fault:
        row("fault run (50 %, replica killed)", fault, round(0.5 * result["saturation"]["requests_per_s"], 2))
    offline, hops = result["offline"], result["hops"]
    targets = result["targets"]
    lines = [
        "\n".join(rows), "",
        f"- Offline `ConsistencyPipeline` at batch {offline['batch_size']}: {offline['images_per_s']} images/s "
        f"(in slices interleaved with the saturation runs). Throughput ratio at saturation: "
        f"**{result['throughput_ratio']}** with single-image requests, **{eight['throughput_ratio']}** with 8-image "
        "requests (targets >= 0.8 and >= 0.9).",
        f"- p99 at 50 % load / unloaded p50: **{targets['p99_at_50%_over_unloaded_p50']}** (target <= 3; against the "
        f"unloaded p99: {targets['p99_at_50%_over_unloaded_p99']}).",
        (f"- Fault run: replica process killed at {fault['kill_at_s']} s; {fault['failed']} failed requests "
         f"({fault['errors'] or 'none'}), {fault['hung']} hung (client timeout 90 s), longest request "
         f"{fault['max_latency_ms'] / 1000:.1f} s; service back {fault['time_to_recovery_s']} s after the kill. "
         if fault else "- No fault run (the embedded engine is one process; its process manager restarts it). ")
        + f"Server start-up: {result['server_startup_s']} s.",
        f"- Hops of an unloaded 1-image 1-step request: offline 1-image call {hops['offline_call_ms']} ms (of which "
        f"forward pass {hops['forward_ms']} ms), PNG encode {hops['png_ms']} ms, base64 {hops['base64_ms']} ms; "
        f"server p50 {result['unloaded']['p50_ms']} ms, so HTTP, routing, validation and batching cost "
        f"{round(result['unloaded']['p50_ms'] - hops['offline_call_ms'], 1)} ms (target: p50 <= offline call + 10 "
        "ms).",
        f"- 1-minute load average: {result['load_average']['start']} at the start, {result['load_average']['end']} "
        "at the end.",
    ]
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return
    if args.quick:
        args.phase_s, args.fault_s = 5.0, 30.0
    args.output = args.output or os.path.join(RESULTS, f"serve_load_{args.engine}")
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="serve_load_")
    log_path = os.path.join(workdir, "server.log")
    result = {"config": {**vars(args), "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "request": {"num_images": 1, "num_inference_steps": 1}}}

    pipe = ConsistencyPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=args.max_batch_size)  # warm-up
    result["load_average"] = {"start": round(os.getloadavg()[0], 2)}
    result["hops"] = hops(pipe)
    print("hops", result["hops"], flush=True)

    started = time.perf_counter()
    server = local_server(args, log_path)
    try:
        try:
            server.start()
        except ServerStartError as error:
            raise SystemExit(str(error)) from None
        process, url = server.process, server.url
        result["server_startup_s"] = round(time.perf_counter() - started, 1)
        print(f"server ready in {result['server_startup_s']} s at {url}", flush=True)

        # Unloaded latency: one request at a time.
        records, elapsed = asyncio.run(closed_loop(url, 1, args.phase_s / 2))
        result["unloaded"] = summarize(records, elapsed)
        print("unloaded", result["unloaded"], flush=True)

        # Saturation: more images in flight than a batch holds, as single-image and as 8-image requests, in slices
        # interleaved with the offline pipeline.
        offline, result["saturation"], result["saturation_8_images_per_request"] = saturation(url, pipe, args)
        result["offline"] = offline
        result["throughput_ratio"] = result["saturation"]["throughput_ratio"]
        print("offline", result["offline"], "ratio", result["throughput_ratio"], flush=True)

        # Latency at fractions of the saturation rate.
        result["load_levels"] = []
        for fraction in (0.25, 0.5, 0.75):
            rate = fraction * result["saturation"]["requests_per_s"]
            before = scrape(url)
            records, elapsed = asyncio.run(open_loop(url, rate, args.phase_s))
            level = {"fraction": fraction, "offered_requests_per_s": round(rate, 2), **summarize(records, elapsed),
                     "batches": batch_delta(before, scrape(url))}
            result["load_levels"].append(level)
            print("load", level, flush=True)

        if args.engine == "ray":
            fault_run(result, process, url, args)
    finally:
        server.stop()
    finish(result, args)


def fault_run(result, process, url, args):
    """Kills the model replica under 50 % load (Ray Serve restarts it)."""
    rate = 0.5 * result["saturation"]["requests_per_s"]
    kill = {}

    def kill_replica():
        pids = replica_pids(process.pid)
        kill.update(time=time.perf_counter(), pids=pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    fault_started = time.perf_counter()
    records, elapsed = asyncio.run(open_loop(url, rate, args.fault_s, timeout_s=90, at=(5.0, kill_replica)))
    result["fault"] = fault_summary(records, elapsed, kill, fault_started)
    print("fault", {k: v for k, v in result["fault"].items() if k != "timeline"}, flush=True)


def hops(pipe, repeats: int = 200) -> dict:
    """Median times (ms) of what an unloaded 1-image 1-step request costs outside HTTP: the offline pipeline's call
    (PIL output), one forward pass at batch 1, PNG encoding and base64 of its image."""
    import base64
    import io

    def median_ms(fn):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(float(np.median(times)) * 1000, 2)

    latents = pipe.prepare_latents(1, torch.Generator().manual_seed(0))
    sigma = pipe.sampling_sigmas(1)
    image = pipe(batch_size=1, generator=torch.Generator().manual_seed(0)).images[0]
    png = io.BytesIO()
    image.save(png, format="PNG")
    with torch.no_grad():
        forward = median_ms(lambda: pipe.consistency_function(sigma[0] * latents, sigma[:1], clip_denoised=False))
    return {
        "offline_call_ms": median_ms(lambda: pipe(batch_size=1, generator=torch.Generator().manual_seed(0))),
        "forward_ms": forward,
        "png_ms": median_ms(lambda: image.save(io.BytesIO(), format="PNG")),
        "base64_ms": median_ms(lambda: base64.b64encode(png.getvalue())),
    }


def finish(result, args):
    result["load_average"]["end"] = round(os.getloadavg()[0], 2)
    unloaded_p50 = result["unloaded"]["p50_ms"]
    half = next(level for level in result["load_levels"] if level["fraction"] == 0.5)
    phases = [result["unloaded"], result["saturation"], result["saturation_8_images_per_request"],
              *result["load_levels"]]
    errors = sum(sum(p["errors"].values()) for p in phases)
    result["errors_outside_fault_run"] = errors
    result["targets"] = {
        "throughput_ratio>=0.8 (1 image per request)": result["throughput_ratio"] >= 0.8,
        "throughput_ratio>=0.9 (8 images per request)":
            result["saturation_8_images_per_request"]["throughput_ratio"] >= 0.9,
        "p99_at_50%<=3x_unloaded_p50": half["p99_ms"] <= 3 * unloaded_p50,
        "p99_at_50%_over_unloaded_p50": round(half["p99_ms"] / unloaded_p50, 2),
        "p99_at_50%_over_unloaded_p99": round(half["p99_ms"] / result["unloaded"]["p99_ms"], 2),
        "errors==0": errors == 0,
        "fault_run_none_hung": result["fault"]["hung"] == 0 if result.get("fault") else None,
        "unloaded_p50<=offline_call+10ms": unloaded_p50 <= result["hops"]["offline_call_ms"] + 10,
    }
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.output + ".png")
    print(json.dumps(result["targets"]), f"-> {args.output}.json/.png")


def fault_summary(records, elapsed, kill, fault_started) -> dict:
    kill_t = kill.get("time", fault_started) - fault_started
    failed = [r for r in records if r["status"] != 200]
    # Recovery: from the kill until service resumes, i.e. the first success of a request sent after the kill (and
    # after the last failure); requests that arrive meanwhile wait for the restarted replica.
    last_failed_sent = max([r["sent"] for r in failed] + [kill_t])
    after = [r["done"] for r in records if r["status"] == 200 and r["sent"] > last_failed_sent]
    recovery = (min(after) - kill_t) if after else None
    return {
        "killed_pids": kill.get("pids", []), "kill_at_s": round(kill_t, 2), **summarize(records, elapsed),
        "failed": len(failed), "hung": sum(1 for r in failed if r["status"] == "timeout"),
        "max_latency_ms": round(max(r["latency"] for r in records) * 1000, 1) if records else None,
        "time_to_recovery_s": None if recovery is None else round(recovery, 2),
        "timeline": [[round(r["sent"], 3), round(r["latency"] * 1000, 1), r["status"]] for r in records],
    }


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = result["load_levels"]
    fractions = [100 * level["fraction"] for level in levels]
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax1.plot(fractions, [level[key] for level in levels], style, label=key.replace("_ms", ""))
    unloaded = result["unloaded"]["p50_ms"]
    ax1.axhline(unloaded, color="gray", ls="--", label=f"unloaded p50 ({unloaded:.0f} ms)")
    ax1.axhline(3 * unloaded, color="red", ls=":", label="target: p99 at 50% <= 3x unloaded")
    ax1.set_xlabel("load (% of saturation request rate)")
    ax1.set_ylabel("latency (ms)")
    eight = result["saturation_8_images_per_request"]
    ax1.set_title(f"{result['config']['model']}: saturation {result['saturation']['images_per_s']:.0f} img/s "
                  f"({result['throughput_ratio']:.2f} x offline) with 1-image requests,\n{eight['images_per_s']:.0f} "
                  f"img/s ({eight['throughput_ratio']:.2f} x) with 8-image requests; offline "
                  f"{result['offline']['images_per_s']:.0f} img/s at batch {result['offline']['batch_size']}",
                  fontsize=9)
    ax1.legend(fontsize=8)

    fault = result.get("fault")
    if not fault:
        ax2.set_axis_off()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    ok = [(t, lat) for t, lat, status in fault["timeline"] if status == 200]
    bad = [(t, lat) for t, lat, status in fault["timeline"] if status != 200]
    ax2.scatter(*zip(*ok), s=6, label="200") if ok else None
    ax2.scatter(*zip(*bad), s=12, color="red", marker="x", label="failed (503 / reset)") if bad else None
    ax2.axvline(fault["kill_at_s"], color="black", ls="--", label="replica killed")
    ax2.set_yscale("log")
    ax2.set_xlabel("request sent at (s)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title(f"fault run at 50% load: {fault['failed']} failed, {fault['hung']} hung, service back "
                  f"{fault['time_to_recovery_s']} s after the kill", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
