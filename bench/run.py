"""Benchmark: residuals_core against `residuals` 0.3.2, mergekit's task_arithmetic and the I/O floor.

    python bench/run.py                       # ~0.25B and ~1B Llama pairs, bf16, sharded
    python bench/run.py --sizes 0.05 --repeat 1

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


def measure(cmd: list[str]) -> dict[str, float]:
    """Wall time, peak RSS (VmHWM) and peak anonymous RSS (sampled every 20 ms) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"rss": 0, "anon": 0}

    def poll() -> None:
        while proc.poll() is None:
            peaks["rss"] = max(peaks["rss"], _status_kib(proc.pid, "VmHWM"))
            peaks["anon"] = max(peaks["anon"], _status_kib(proc.pid, "RssAnon"))
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output.decode()[-3000:]}")
    return {"wall_s": wall, "peak_rss_gib": peaks["rss"] / 2**20, "peak_anon_gib": peaks["anon"] / 2**20}


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

SHAPES = {0.05: (512, 8, 32000), 0.25: (1024, 16, 32000), 1.0: (2048, 16, 32000)}


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
import sys, shutil, pathlib
inputs, out = sys.argv[1:-1], pathlib.Path(sys.argv[-1])
out.mkdir()
for folder in inputs:                               # read every input byte
    for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.read(8 << 20):
                pass
for f in sorted(pathlib.Path(inputs[0]).glob("*.safetensors")):   # write an output of the same size
    shutil.copyfile(f, out / f.name)
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
    args = parser.parse_args(argv)
    if args.report_only:
        report = json.loads((RESULTS / "results.json").read_text())
        (RESULTS / "results.md").write_text(to_markdown(report))
        print(to_markdown(report))
        return

    upstream = venv("residuals", ["residuals==0.3.2"]) if "residuals" not in args.skip else None
    mergekit = venv("mergekit", ["mergekit==0.1.5"]) if "mergekit" not in args.skip else None
    mergekit_cli = str(Path(mergekit).parent / "mergekit-yaml") if mergekit else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="residuals-bench-"))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"{platform.machine()}, Python {platform.python_version()}",
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sizes": {},
    }
    for size in args.sizes:
        report["sizes"][str(size)] = bench_size(
            size, work / f"family-{size}", args.repeat, upstream, mergekit_cli
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "results.md").write_text(to_markdown(report))
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
