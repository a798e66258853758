"""Benchmark: residuals_core against `residuals` 0.3.2, mergekit's task_arithmetic and the I/O floor.

    python bench/run.py                       # ~0.25B and ~1B Llama pairs, bf16, sharded
    python bench/run.py --sizes 0.05 --repeat 1
    python bench/run.py --sizes 2.0 --skip residuals mergekit   # ~2B: ours and the floor (the baselines'
                                              # in-memory compute does not fit 24 GiB there)
    python bench/run.py --hub --sizes 1.0 --link 200MB   # Hub ids in, --push-to out, over a limited link
    python bench/run.py --hub --jobs 1 2 4 8 --sizes 0.25 --link 20MB --max-shard-size 32MB
                                              # a merge split over N Jobs, each with a link of its own

For each size it generates a synthetic family outside the repo (random seeded weights: base,
instruct = base + noise, target = base + other noise), runs every tool as its own process while
polling /proc for peak RSS (mapped file pages included, as /usr/bin/time counts them) and peak
anonymous memory, checks that every tool's merge is numerically the same, and writes
bench/results/results.{md,json} with medians and ratios against the baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"


# ---- measuring a process ---------------------------------------------------------------------------------
def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _tree_bytes(folder: Path) -> int:
    """Bytes allocated on disk by the files under `folder` (what a disk quota would count)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


COLD = False  # --cold: every run starts with an empty page cache


def drop_page_cache() -> None:
    """Write back and drop the page cache (root only), so the next run reads its inputs from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(cmd: list[str], env: dict | None = None, disk: Path | None = None) -> dict[str, float]:
    """Wall time, peak RSS (VmHWM) and peak anonymous RSS (sampled every 20 ms) of one process;
    with `disk`, also the high-water mark of the bytes stored under that folder."""
    if COLD:
        drop_page_cache()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peaks = {"rss": 0, "anon": 0, "disk": 0}

    def poll() -> None:
        while proc.poll() is None:
            peaks["rss"] = max(peaks["rss"], _status_kib(proc.pid, "VmHWM"))
            peaks["anon"] = max(peaks["anon"], _status_kib(proc.pid, "RssAnon"))
            if disk is not None:
                peaks["disk"] = max(peaks["disk"], _tree_bytes(disk))
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output.decode()[-3000:]}")
    result = {"wall_s": wall, "peak_rss_gib": peaks["rss"] / 2**20, "peak_anon_gib": peaks["anon"] / 2**20}
    if disk is not None:
        result["disk_gib"] = peaks["disk"] / 2**30
    return result


# ---- the synthetic family ----------------------------------------------------------------------------------
GENERATE = r"""
import sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
out, hidden, layers, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                  tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("meta"):
    shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", bos_token="w2")
for role, seed, scale in (("base", 0, 0.0), ("instruct", 1, 1e-3), ("target", 2, 1e-3)):
    g = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        if scale:
            t += torch.randn(shape, generator=noise) * scale
        state[name] = t.to(torch.bfloat16)
    model.load_state_dict(state, assign=True)
    model.to(torch.bfloat16).save_pretrained(f"{out}/{role}", max_shard_size="500MB")
    tokenizer.save_pretrained(f"{out}/{role}")
    del state, model
print(sum(s.numel() for s in shapes.values()))
"""

SHAPES = {0.05: (512, 8, 32000), 0.25: (1024, 16, 32000), 1.0: (2048, 16, 32000), 2.0: (2560, 24, 32000)}


def make_family(folder: Path, size: float) -> int:
    hidden, layers, vocab = SHAPES[size]
    out = subprocess.run(
        [PYTHON, "-c", GENERATE, str(folder), str(hidden), str(layers), str(vocab)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


# ---- the baselines' environments -----------------------------------------------------------------------------
def venv(name: str, packages: list[str]) -> str:
    """A virtual environment of its own per baseline, created once under bench/.venvs."""
    folder = ROOT / "bench" / ".venvs" / name
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages, "torch==2.13.0"], check=True)
    return str(python)


UPSTREAM_COMPUTE = "import sys; from residuals import Residuals; Residuals.from_models(sys.argv[1], sys.argv[2]).save_pretrained(sys.argv[3])"
UPSTREAM_APPLY = (
    "import sys, torch; from residuals import Residuals; "
    "Residuals.from_pretrained(sys.argv[1]).apply(sys.argv[2], out_dir=sys.argv[3], model_dtype=torch.bfloat16)"
)
IO_FLOOR = r"""
import os, sys, shutil, pathlib
inputs, out = sys.argv[1:-1], pathlib.Path(sys.argv[-1])
out.mkdir()
files = [f for folder in inputs for f in sorted(pathlib.Path(folder).glob("*.safetensors"))]
for f in files:                                     # every read queued at once: the disk's full depth
    fd = os.open(f, os.O_RDONLY)
    for start in range(0, os.path.getsize(f), 8 << 20):
        os.posix_fadvise(fd, start, 8 << 20, os.POSIX_FADV_WILLNEED)
    os.close(fd)
for f in files:                                     # read every input byte
    with open(f, "rb") as h:
        while h.read(8 << 20):
            pass
for f in sorted(pathlib.Path(inputs[0]).glob("*.safetensors")):   # write an output of the same size,
    shutil.copyfile(f, out / f.name)                               # to the disk (ours writes with O_DIRECT)
    with open(out / f.name, "rb") as h:
        os.fsync(h.fileno())
"""


def mergekit_config(base: Path, instruct: Path, target: Path) -> str:
    """target + (instruct − base) as mergekit's task_arithmetic: base_model=base, weights 1."""
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {base}\n"
        "models:\n"
        f"  - model: {instruct}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {target}\n    parameters:\n      weight: 1.0\n"
        "parameters:\n  normalize: false\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )


# ---- checks ----------------------------------------------------------------------------------------------------
def max_difference(a: Path, b: Path) -> dict[str, float]:
    """Largest elementwise difference (in bf16 ulps of the value) between two model folders."""
    from safetensors import safe_open

    def tensors(folder: Path):
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield k, h.get_tensor(k)

    other = dict(tensors(b))
    worst, off, total = 0.0, 0, 0
    for name, x in tensors(a):
        y = other[name].to(x.dtype)
        diff = (x.float() - y.float()).abs()
        off += int((x != y).sum())
        total += x.numel()
        worst = max(worst, float(diff.max()))
    return {"max_abs_diff": worst, "elements_off": off, "fraction_off": off / max(total, 1)}


# ---- Hub mode: Hub ids in, a Hub repo out, over a bandwidth-limited link ---------------------------------------
HUB_TOKEN = "hf_bench_write"
HUB_USER = "bench"
SEED_HUB = r"""
import sys
from huggingface_hub import HfApi
api = HfApi()
for folder, repo in zip(sys.argv[1::2], sys.argv[2::2]):
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=folder)
"""
DOWNLOAD = r"""
import sys
from huggingface_hub import snapshot_download
for repo, folder in zip(sys.argv[1::2], sys.argv[2::2]):
    snapshot_download(repo, local_dir=folder)
"""
UPLOAD = r"""
import sys
from huggingface_hub import HfApi
HfApi().create_repo(sys.argv[2], exist_ok=True)
HfApi().upload_folder(repo_id=sys.argv[2], folder_path=sys.argv[1])
"""


class BenchHub:
    """The project's test Hub (tests/hub_server.py) in a process of its own, with a settable link."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HF_TOKEN": HUB_TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        self.proc = subprocess.Popen(  # its Jobs run here, in this checkout, with this environment
            [PYTHON, str(ROOT / "tests" / "hub_server.py"), str(root), "--token", f"{HUB_TOKEN}:{HUB_USER}"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**self.env, "TMPDIR": str(root / "jobs-tmp"), "HF_HOME": str(root / "jobs-hf")},
        )
        (root / "jobs-tmp").mkdir(exist_ok=True)
        self.url = self.proc.stdout.readline().strip()
        self.env["HF_ENDPOINT"] = self.url

    def _call(self, path: str, payload: dict | None = None):
        import urllib.request

        data = json.dumps(payload).encode() if payload is not None else None
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data)) as response:
            return json.loads(response.read())

    def seed(self, folder: Path) -> dict[str, str]:
        """Upload the family in `folder` (base, instruct, target); their repo ids by role."""
        repos = {role: f"{HUB_USER}/{role}" for role in ("base", "instruct", "target")}
        command = [PYTHON, "-c", SEED_HUB]
        for role, repo in repos.items():
            command += [str(folder / role), repo]
        subprocess.run(command, check=True, env=self.env, capture_output=True)
        return repos

    def set_link(self, bytes_per_s: float | None, per_job: bool = False) -> None:
        self._call("/_admin/link", {"bytes_per_s": bytes_per_s or 0, "per_job": per_job})

    def log(self) -> list[dict]:
        return self._call("/_admin/log")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _traffic(entries: list[dict]) -> dict[str, int]:
    down = sum(e["bytes"] for e in entries if e["method"] == "GET" and "/resolve/" in e["path"])
    up = sum(e["bytes"] for e in entries if e["method"] == "PUT")
    return {"bytes_down": down, "bytes_up": up}


def bench_hub(
    size: float, folder: Path, repeat: int, mergekit_cli: str | None, link: float, max_shard_size: str
) -> dict:
    """ours: Hub→Hub merge (--push-to) against download → merge → upload, on one simulated link."""
    params = None if (folder / "target" / "config.json").exists() else make_family(folder, size)
    hub = BenchHub(folder / "hub")
    try:
        repos = hub.seed(folder)
        hub.set_link(link)
        runs: dict[str, list[dict]] = {}
        traffic: dict[str, dict] = {}

        def timed(name: str, steps: list[tuple[list[str], Path | None]], scratch: Path) -> None:
            """One run of a path: its steps in turn (walls add up; peaks and disk are the maxima)."""
            for attempt in range(repeat):
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(parents=True)
                env = {**hub.env, "TMPDIR": str(scratch), "HF_HOME": str(scratch / "hf")}
                before = len(hub.log())
                parts = [
                    measure([c.replace("{n}", str(attempt)) for c in cmd], env, disk=scratch)
                    for cmd, _ in steps
                ]
                run = {
                    "wall_s": sum(p["wall_s"] for p in parts),
                    "peak_rss_gib": max(p["peak_rss_gib"] for p in parts),
                    "peak_anon_gib": max(p["peak_anon_gib"] for p in parts),
                    "disk_gib": max(p["disk_gib"] for p in parts),
                    "steps_s": [round(p["wall_s"], 2) for p in parts],
                }
                traffic[name] = _traffic(hub.log()[before:])
                runs.setdefault(name, []).append(run)
                print(f"  {size}B hub {name}: {run} {traffic[name]}", flush=True)
            shutil.rmtree(scratch, ignore_errors=True)

        cli = [PYTHON, "-m", "residuals_core"]
        scratch = folder / "scratch"
        timed(
            "ours merge, Hub ids → --push-to",
            [
                (
                    [*cli, "merge", "--base", repos["base"], "--instruct", repos["instruct"],
                     "--target", repos["target"], "--push-to", f"{HUB_USER}/ours-merged-{{n}}",
                     "--max-shard-size", max_shard_size, "--quiet"],
                    None,
                )
            ],
            scratch,
        )  # fmt: skip
        local = scratch / "models"
        download = [PYTHON, "-c", DOWNLOAD]
        for role, repo in repos.items():
            download += [repo, str(local / role)]
        if mergekit_cli:
            config = folder / "mergekit-hub.yml"
            config.write_text(mergekit_config(local / "base", local / "instruct", local / "target"))
            timed(
                "mergekit: download → merge → upload",
                [
                    (download, None),
                    (
                        [
                            mergekit_cli,
                            str(config),
                            str(scratch / "out"),
                            "--lazy-unpickle",
                            "--copy-tokenizer",
                        ],
                        None,
                    ),
                    ([PYTHON, "-c", UPLOAD, str(scratch / "out"), f"{HUB_USER}/mergekit-merged-{{n}}"], None),
                ],
                scratch,
            )
        timed(
            "ours: download → merge → upload",
            [
                (download, None),
                (
                    [*cli, "merge", "--base", str(local / "base"), "--instruct", str(local / "instruct"),
                     "--target", str(local / "target"), "--out", str(scratch / "out"),
                     "--max-shard-size", max_shard_size, "--quiet"],
                    None,
                ),
                ([PYTHON, "-c", UPLOAD, str(scratch / "out"), f"{HUB_USER}/local-merged-{{n}}"], None),
            ],
            scratch,
        )  # fmt: skip
        hub.set_link(None)
        checks = {}
        pulled = folder / "pulled"
        shutil.rmtree(pulled, ignore_errors=True)
        fetch = [PYTHON, "-c", DOWNLOAD, f"{HUB_USER}/ours-merged-0", str(pulled / "ours")]
        fetch += [f"{HUB_USER}/local-merged-0", str(pulled / "local")]
        if mergekit_cli:
            fetch += [f"{HUB_USER}/mergekit-merged-0", str(pulled / "mergekit")]
        subprocess.run(fetch, check=True, env=hub.env, capture_output=True)
        checks["Hub→Hub == local-folder merge"] = max_difference(pulled / "ours", pulled / "local")
        if mergekit_cli:
            checks["mergekit vs ours"] = max_difference(pulled / "mergekit", pulled / "ours")
        shutil.rmtree(pulled, ignore_errors=True)
    finally:
        hub.close()
    medians = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "steps_s"}
        for name, rs in runs.items()
    }
    for name, rs in runs.items():
        medians[name]["steps_s"] = rs[len(rs) // 2]["steps_s"]
    ours = traffic["ours merge, Hub ids → --push-to"]
    floor = max(ours["bytes_down"], ours["bytes_up"]) / link
    return {
        "parameters": params,
        "link_bytes_per_s": link,
        "max_shard_size": max_shard_size,
        "traffic": traffic,
        "link_floor_s": floor,
        "medians": medians,
        "runs": runs,
        "checks": checks,
    }


def bench_jobs(size: float, folder: Path, counts: list[int], link: float, max_shard_size: str) -> dict:
    """One merge split over N Jobs (the test Hub runs each as a process here), each job on a link of
    its own: wall from `jobs run --shards N --follow` to the published commit, against the busiest
    job's link floor (max(bytes down, bytes up) ÷ link)."""
    params = None if (folder / "target" / "config.json").exists() else make_family(folder, size)
    hub = BenchHub(folder / "hub-jobs")
    try:
        repos = hub.seed(folder)
        hub.set_link(link, per_job=True)
        results = {}
        for count in counts:
            before = len(hub.log())
            command = [PYTHON, "-m", "residuals_core", "jobs", "run", "--shards", str(count), "--follow",
                       "--image", f"hf.co/spaces/{HUB_USER}/residuals-studio", "merge",
                       "--base", repos["base"], "--instruct", repos["instruct"], "--target", repos["target"],
                       "--push-to", f"{HUB_USER}/split-{count}", "--max-shard-size", max_shard_size, "--quiet"]  # fmt: skip
            run = measure(command, hub.env)
            per_job: dict[str, dict[str, int]] = {}
            for entry in hub.log()[before:]:
                agent = entry.get("agent", "")
                if "origin/job-" not in agent:
                    continue
                job = per_job.setdefault(agent.split("origin/job-")[-1], {"down": 0, "up": 0})
                if entry["method"] == "GET" and (
                    "/resolve/" in entry["path"] or entry["path"].startswith("cdn:")
                ):
                    job["down"] += entry["bytes"]
                elif entry["method"] == "PUT":
                    job["up"] += entry["bytes"]
            floor = max(max(j["down"], j["up"]) for j in per_job.values()) / link
            results[str(count)] = {
                "wall_s": run["wall_s"],
                "jobs": len(per_job),
                "busiest_job_floor_s": floor,
                "bytes_down": sum(j["down"] for j in per_job.values()),
                "bytes_up": sum(j["up"] for j in per_job.values()),
            }
            print(f"  {size}B split over {count} job(s): {results[str(count)]}", flush=True)
        hub.set_link(None)
        pulled = folder / "pulled-jobs"
        shutil.rmtree(pulled, ignore_errors=True)
        fetch = [PYTHON, "-c", DOWNLOAD]
        for count in counts:
            fetch += [f"{HUB_USER}/split-{count}", str(pulled / str(count))]
        subprocess.run(fetch, check=True, env=hub.env, capture_output=True)
        checks = {
            f"{count} jobs == {counts[0]} job(s)": max_difference(
                pulled / str(counts[0]), pulled / str(count)
            )
            for count in counts[1:]
        }
        shutil.rmtree(pulled, ignore_errors=True)
    finally:
        hub.close()
    return {
        "parameters": params,
        "jobs_link_bytes_per_s": link,
        "max_shard_size": max_shard_size,
        "runs": results,
        "checks": checks,
    }


def jobs_markdown(size: str, data: dict) -> list[str]:
    link = data["jobs_link_bytes_per_s"]
    runs = data["runs"]
    one = runs[min(runs, key=int)]
    lines = [
        f"### Split over N Jobs, ~{size}B parameters, each job's link {link / 1e6:.0f} MB/s each way, "
        f"--max-shard-size {data['max_shard_size']}",
        "",
        "| jobs | wall (s) | busiest job's link floor (s) | × floor | wall − floor (s) | speed-up vs 1 job | GB down / up (all jobs) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, run in runs.items():
        lines.append(
            f"| {count} | {run['wall_s']:.1f} | {run['busiest_job_floor_s']:.1f} | "
            f"{run['wall_s'] / run['busiest_job_floor_s']:.2f} | {run['wall_s'] - run['busiest_job_floor_s']:.1f} | "
            f"{one['wall_s'] / run['wall_s']:.2f} | {run['bytes_down'] / 1e9:.2f} / {run['bytes_up'] / 1e9:.2f} |"
        )
    lines += ["", "- wall: from `jobs run --shards N --follow` to the published commit (planning, every job's "
              "start, the shards, the final commit); the floor is the busiest job's bytes over its own link"]  # fmt: skip
    lines += [
        f"- check {k}: {v['elements_off']} elements differ (max |Δ| {v['max_abs_diff']:.3g})"
        for k, v in data["checks"].items()
    ]
    return [*lines, ""]


def hub_markdown(size: str, data: dict) -> list[str]:
    m = data["medians"]
    link = data["link_bytes_per_s"]
    lines = [
        f"### Hub mode, ~{size}B parameters, link {link / 1e6:.0f} MB/s each way, --max-shard-size {data['max_shard_size']}",
        "",
        "| path | wall (s) | × link floor | peak RSS (GiB) | local disk high-water (GiB) | GB down / up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in m.items():
        t = data["traffic"][name]
        lines.append(
            f"| {name} | {v['wall_s']:.1f} | {v['wall_s'] / data['link_floor_s']:.2f} | {v['peak_rss_gib']:.2f} | "
            f"{v['disk_gib']:.2f} | {t['bytes_down'] / 1e9:.2f} / {t['bytes_up'] / 1e9:.2f} |"
        )
    ours = m["ours merge, Hub ids → --push-to"]
    lines += ["", f"- link floor (max(bytes down, bytes up) ÷ link): {data['link_floor_s']:.1f} s"]
    for other in ("mergekit: download → merge → upload", "ours: download → merge → upload"):
        if other in m:
            lines.append(
                f"- Hub→Hub is {m[other]['wall_s'] / ours['wall_s']:.2f}× faster than {other} "
                f"(its steps: {', '.join(f'{s:.1f} s' for s in m[other]['steps_s'])}) and needs "
                f"{m[other]['disk_gib'] / max(ours['disk_gib'], 1e-9):.0f}× less local disk"
            )
    lines += [
        f"- check {k}: {v['elements_off']} elements differ (max |Δ| {v['max_abs_diff']:.3g})"
        for k, v in data["checks"].items()
    ]
    return [*lines, ""]


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0], choices=sorted(SHAPES))
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (medians are reported)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the synthetic models go (default: a temp dir)"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="tools to leave out: residuals, mergekit")
    parser.add_argument("--report-only", action="store_true", help="re-render results.md from results.json")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every run (root only): inputs come from the disk, not memory",
    )
    parser.add_argument(
        "--hub",
        action="store_true",
        help="Hub mode: the family served by the test Hub over a limited link, Hub ids in and --push-to out, "
        "against download → merge → upload",
    )
    parser.add_argument("--link", default="200MB", help="Hub mode: link bandwidth each way, per second")
    parser.add_argument("--max-shard-size", default="500MB", help="Hub mode: output shard size")
    parser.add_argument(
        "--jobs",
        type=int,
        nargs="+",
        default=None,
        help="Hub mode: split the merge over each of these numbers of Jobs (each with a link of its own)",
    )
    args = parser.parse_args(argv)
    global COLD
    COLD = args.cold
    if args.report_only:
        report = json.loads((RESULTS / "results.json").read_text())
        (RESULTS / "results.md").write_text(to_markdown(report))
        print(to_markdown(report))
        return

    upstream = (
        venv("residuals", ["residuals==0.3.2"]) if "residuals" not in args.skip and not args.hub else None
    )
    mergekit = (
        venv("mergekit", ["mergekit==0.1.5"]) if "mergekit" not in args.skip and not args.jobs else None
    )
    mergekit_cli = str(Path(mergekit).parent / "mergekit-yaml") if mergekit else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="residuals-bench-"))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"{platform.machine()}, Python {platform.python_version()}",
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sizes": {},
    }
    name = "results"
    for size in args.sizes:
        if args.hub and args.jobs:
            from residuals_core.units import parse_size

            name = "jobs-results"
            report["sizes"][str(size)] = bench_jobs(
                size, work / f"family-{size}", args.jobs, parse_size(args.link), args.max_shard_size
            )
        elif args.hub:
            from residuals_core.units import parse_size

            name = "hub-results"
            report["sizes"][str(size)] = bench_hub(
                size,
                work / f"family-{size}",
                args.repeat,
                mergekit_cli,
                parse_size(args.link),
                args.max_shard_size,
            )
        else:
            name = "results-cold" if args.cold else "results"
            report["sizes"][str(size)] = bench_size(
                size, work / f"family-{size}", args.repeat, upstream, mergekit_cli
            )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(to_markdown(report))
    print(to_markdown(report))


def bench_size(
    size: float, folder: Path, repeat: int, upstream: str | None, mergekit_cli: str | None
) -> dict:
    params = None if (folder / "target" / "config.json").exists() else make_family(folder, size)
    base, inst, target = folder / "base", folder / "instruct", folder / "target"
    outs = folder / "outputs"
    runs: dict[str, list[dict]] = {}

    def run(name: str, cmd: list[str], out: Path) -> None:
        for _ in range(repeat):
            shutil.rmtree(out, ignore_errors=True)
            runs.setdefault(name, []).append(measure([str(out) if c == "{out}" else c for c in cmd]))
        print(f"  {size}B {name}: {runs[name][-1]}", flush=True)

    cli = [PYTHON, "-m", "residuals_core"]
    b, i, t, res = str(base), str(inst), str(target), str(outs / "res")
    run(
        "ours compute",
        [*cli, "compute", "--base", b, "--instruct", i, "--out", "{out}", "--quiet"],
        outs / "res",
    )
    run(
        "ours apply",
        [*cli, "apply", "--residuals", res, "--model", t, "--out", "{out}", "--quiet"],
        outs / "applied",
    )
    run(
        "ours merge",
        [*cli, "merge", "--base", b, "--instruct", i, "--target", t, "--out", "{out}", "--quiet"],
        outs / "merged",
    )
    run("I/O floor (merge)", [PYTHON, "-c", IO_FLOOR, b, i, t, "{out}"], outs / "floor")
    checks = {"ours apply == ours merge": max_difference(outs / "applied", outs / "merged")}
    if upstream:
        up_res = str(outs / "up-res")
        run("residuals 0.3.2 compute", [upstream, "-c", UPSTREAM_COMPUTE, b, i, "{out}"], outs / "up-res")
        run(
            "residuals 0.3.2 apply", [upstream, "-c", UPSTREAM_APPLY, up_res, t, "{out}"], outs / "up-applied"
        )
        checks["residuals 0.3.2 apply vs ours"] = max_difference(outs / "up-applied", outs / "merged")
    if mergekit_cli:
        config = folder / "mergekit.yml"
        config.write_text(mergekit_config(base, inst, target))
        run(
            "mergekit task_arithmetic",
            [mergekit_cli, str(config), "{out}", "--lazy-unpickle", "--copy-tokenizer"],
            outs / "mergekit",
        )
        checks["mergekit vs ours"] = max_difference(outs / "mergekit", outs / "merged")
    medians = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()
    }
    return {"parameters": params, "medians": medians, "runs": runs, "checks": checks}


def to_markdown(report: dict) -> str:
    lines = [f"Benchmark of {report['date']} on {report['machine']}: `{report['command']}`", ""]
    for size, data in report["sizes"].items():
        if "jobs_link_bytes_per_s" in data:
            lines += jobs_markdown(size, data)
            continue
        if "link_bytes_per_s" in data:
            lines += hub_markdown(size, data)
            continue
        m = data["medians"]
        lines += [
            f"### ~{size}B parameters",
            "",
            "| run | wall (s) | peak RSS (GiB) | peak anon (GiB) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {n} | {v['wall_s']:.1f} | {v['peak_rss_gib']:.2f} | {v['peak_anon_gib']:.2f} |"
            for n, v in m.items()
        ]
        ratios = []
        for ours, theirs in (
            ("ours compute", "residuals 0.3.2 compute"),
            ("ours apply", "residuals 0.3.2 apply"),
            ("ours merge", "mergekit task_arithmetic"),
        ):
            if ours in m and theirs in m:
                ratios.append(
                    f"- {ours} vs {theirs}: {m[theirs]['wall_s'] / m[ours]['wall_s']:.2f}× faster, "
                    f"{m[theirs]['peak_rss_gib'] / m[ours]['peak_rss_gib']:.1f}× less peak RSS"
                )
        if "ours merge" in m and "I/O floor (merge)" in m:
            ratios.append(
                f"- ours merge takes {m['ours merge']['wall_s'] / m['I/O floor (merge)']['wall_s']:.1f}× the time of "
                "the I/O floor (reading all inputs and writing one output with plain file copies)"
            )
        lines += ["", *ratios, ""]
        lines += [
            f"- check {k}: {v['elements_off']} elements differ (max |Δ| {v['max_abs_diff']:.3g})"
            for k, v in data["checks"].items()
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
