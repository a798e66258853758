"""Command line: `python -m residuals_core compute|apply|merge|inspect ...` over the same functions."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from tqdm.auto import tqdm

from . import __version__
from .errors import ResidualsError
from .options import OPTION_NAMES, Options
from .units import parse_size

EPILOG = """examples:
  # 1. residuals of an instruct model over its base (float32: exact reconstruction)
  python -m residuals_core compute --base meta-llama/Meta-Llama-3-8B \\
      --instruct meta-llama/Meta-Llama-3-8B-Instruct --out ./llama3-residuals
  # 2. add them to your continued-pre-trained base
  python -m residuals_core apply --residuals ./llama3-residuals --model ./my-cpt-base --out ./my-cpt-instruct
  # or both at once, without writing residuals
  python -m residuals_core merge --base B --instruct I --target ./my-cpt-base --out ./my-cpt-instruct
  # Hub ids in, a Hub repo out: nothing of the inputs is stored, local disk holds ~2 shards
  python -m residuals_core merge --base ORG/A --instruct ORG/B --target ORG/C --push-to ME/OUT --private
  # 3. look at per-layer norms
  python -m residuals_core inspect ./llama3-residuals
"""


class _TqdmProgress:
    """Adapts the engine's progress callback (done, total, tensor name) to a tqdm bar over tensors."""

    def __init__(self, desc: str, enabled: bool):
        self.bar = None
        self.desc = desc
        self.enabled = enabled

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="tensor")
        self.bar.n = done
        self.bar.set_postfix_str(name[-48:], refresh=True)
        if done >= total:
            self.bar.close()


def _size(text: str) -> str:
    """argparse type: a shard size refused at once, in the CLI's own `error:` form (exit 2)."""
    try:
        parse_size(text)
    except ResidualsError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem} {exc.fix}") from None
    return text


FOLLOW_POLL_S = 2.0  # how often `jobs run --shards --follow` asks the run for its jobs' stages


def _shard_numbers(text: str) -> tuple[int, ...]:
    from .split_run import parse_shard_numbers

    try:
        return parse_shard_numbers(text)
    except ResidualsError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem} {exc.fix}") from None


def _model(text: str) -> str:
    """A model argument: a folder, a Hub id (`hf://` for one that must not be read as a folder), or a
    bundled demo model by its name (`demo:base-v1`)."""
    from .demo import demo_model

    try:
        return demo_model(text)
    except ResidualsError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem} {exc.fix}") from None


def _common(p: argparse.ArgumentParser, *, out: bool = True) -> None:
    if out:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--out",
            help="output folder (written atomically; must not exist unless --overwrite)",
        )
        where.add_argument(
            "--push-to",
            metavar="REPO_ID",
            help="write straight into this Hub repo instead of a folder: each shard is uploaded as soon as "
            "it is written and deleted locally, one commit adds everything at the end (all or nothing). "
            "Local disk used: about two shards (see --max-shard-size) plus small files, whatever the model size",
        )
        p.add_argument("--private", action="store_true", help="with --push-to: create the repo private")
        p.add_argument(
            "--run-branch",
            metavar="BRANCH",
            help="with --push-to: write one share of a run split over several Jobs into this branch of the "
            "repo; the share that completes the set publishes it to main in one commit (jobs run --shards N "
            "sets this up)",
        )
        p.add_argument(
            "--only-shards",
            type=_shard_numbers,
            metavar="LIST",
            help="with --run-branch: the output shards this share writes, e.g. 3,7 or 2-5 (default: every one "
            "not on the branch yet); 'none' only publishes a run whose shards are all there",
        )
        p.add_argument(
            "--overwrite", action="store_true", help="replace --out once the new folder is complete"
        )
        p.add_argument(
            "--max-shard-size",
            default="5GB",
            type=_size,
            help="largest weight file, e.g. 5GB or 500MB (default 5GB); with --push-to the run needs about "
            "twice this much free local disk (TMPDIR)",
        )
        p.add_argument("--device", default="cpu", help="where to do the arithmetic: cpu (default) or cuda")
        p.add_argument(
            "--no-normalize-embeddings",
            dest="normalize_embeddings",
            action="store_false",
            help="fail on vocabulary-size differences instead of zero-padding the missing rows",
        )
        p.add_argument(
            "--allow-pickle",
            action="store_true",
            help="also read .bin/.pt checkpoints (pickle can run code: only for sources you trust)",
        )
        p.add_argument(
            "--fsync",
            action="store_true",
            help="flush the output to disk before renaming it into place (survives a power loss; slower)",
        )
        p.add_argument(
            "--no-direct-io",
            dest="direct_io",
            action="store_false",
            help="write weight files through the page cache instead of with O_DIRECT (e.g. on a network "
            "mount where direct writes are slow)",
        )
    p.add_argument(
        "--token", default=None, help="Hugging Face token for gated/private models (default: HF_TOKEN)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sparsity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dare", type=float, default=None, metavar="P",
        help="drop a share P of each tensor's elements at random (seeded) and scale the rest by 1/(1-P)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="with --dare: the random seed (default 0)")
    p.add_argument(
        "--trim", type=float, default=None, metavar="K",
        help="keep the share K of each tensor's largest magnitudes (TIES' trim step), e.g. 0.2; the rest are zero",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m residuals_core",
        description="Instruction residuals (task vectors): R = instruct − base, computed and applied one "
        "tensor at a time, so 8B models fit in a few hundred MB of RAM. Models are local folders, Hub ids (hf://org/name to never read a folder), or demo:NAME for the "
        "bundled demo family.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"residuals_core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser(
        "compute",
        help="residuals = instruct − base, saved as a residuals folder",
        description="Compute R = instruct − base and save it (weights, tokenizer, config, model card).",
    )
    p.add_argument("--base", required=True, type=_model, help="base model (folder or Hub id)")
    p.add_argument(
        "--instruct", required=True, type=_model, help="instruction-tuned model (folder or Hub id)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="storage dtype: float32 (default, exact) or bfloat16/float16 (half the size, error reported)",
    )
    p.add_argument(
        "--instruct-tokenizer", default=None, help="tokenizer to save, if not the instruct model's"
    )
    p.add_argument("--license", default=None, help="license for the model card, e.g. apache-2.0")
    _sparsity_options(p)
    _common(p)

    p = sub.add_parser(
        "sparsify",
        help="DARE and/or magnitude trimming of an existing residuals folder",
        description="Drop (DARE) or trim (TIES-style) the elements of residuals, into an ordinary residuals folder.",
    )
    p.add_argument(
        "--residuals", required=True, type=_model, help="residuals folder or Hub id (from compute)"
    )
    _sparsity_options(p)
    _common(p)

    p = sub.add_parser(
        "apply",
        help="model + scale × residuals, saved as a model folder",
        description="Add scale × residuals to a model (e.g. your continued-pre-trained base).",
    )
    p.add_argument(
        "--residuals", required=True, type=_model, help="residuals folder or Hub id (from compute)"
    )
    p.add_argument("--model", required=True, type=_model, help="model to apply them to (folder or Hub id)")
    p.add_argument("--scale", type=float, default=1.0, help="α in model + α·R (default 1.0)")
    p.add_argument("--dtype", default=None, help="output dtype (default: the model's own)")
    _common(p)

    p = sub.add_parser(
        "merge",
        help="target + scale × (instruct − base) in one pass",
        description="One pass: target + scale × (instruct − base); no residuals are written.",
    )
    p.add_argument("--base", required=True, type=_model, help="base model the instruct model was tuned from")
    p.add_argument("--instruct", required=True, type=_model, help="instruction-tuned model")
    p.add_argument(
        "--target", required=True, type=_model, help="model to add the difference to (e.g. your CPT'd base)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="α (default 1.0)")
    p.add_argument("--dtype", default=None, help="output dtype (default: the target's own)")
    _common(p)

    p = sub.add_parser(
        "lora",
        help="residuals as a PEFT LoRA adapter (truncated SVD per projection)",
        description="Export residuals (or instruct − base) as a LoRA adapter that peft loads on the CPT'd base: "
        "the truncated SVD of each attention/MLP projection's residual (and of the embedding and output head), "
        "in float32. Norms are left out (the card says how much of ‖R‖² they hold).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--residuals", type=_model, help="residuals folder or Hub id (from compute)")
    source.add_argument(
        "--base", type=_model, help="base model: export instruct − base without writing residuals"
    )
    p.add_argument("--instruct", type=_model, help="with --base: the instruction-tuned model")
    cut = p.add_mutually_exclusive_group(required=True)
    cut.add_argument("--rank", type=int, help="rank of every adapted matrix, e.g. 8")
    cut.add_argument(
        "--energy", type=float, help="per matrix, the smallest rank keeping this share of ‖R‖², e.g. 0.9"
    )
    p.add_argument(
        "--no-embeddings",
        dest="embeddings",
        action="store_false",
        help="leave the input embedding and output head out of the adapter (only the projections)",
    )
    _common(p)

    p = sub.add_parser(
        "jobs",
        help="run compute/apply/merge/lora as a Hugging Face Job on your account, and follow it",
        description="Hand a big job to Hugging Face Jobs: the same command, on hardware billed to your account. "
        "Your token travels as the job's secret HF_TOKEN only.",
    )
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="action")
    j = jobs.add_parser("run", help="submit a command (it must --push-to the Hub); prints the job id and URL")
    j.add_argument(
        "--image", default=None, help="image holding this project (default: this Space's, hf.co/spaces/ID)"
    )
    j.add_argument(
        "--flavor", default=None, help="hardware, e.g. cpu-upgrade or a10g-small (default cpu-basic)"
    )
    j.add_argument(
        "--timeout",
        default=None,
        help="e.g. 2h or 90m (default: twice the estimate from the inputs' sizes + 10 min; the Hub's own "
        "default, 30 min, stops large merges)",
    )
    j.add_argument("--namespace", default=None, help="user or org to run it under (default: yours)")
    j.add_argument("--token", default=None, help="your Hugging Face token (default: HF_TOKEN / your login)")
    j.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    j.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="N",
        help="split compute/apply/merge over N jobs by output shard (job k writes shards k, k+N, …, reading "
        "only their tensors' bytes); the last to finish publishes the whole result in one commit. Run the "
        "same command again to resume a run: shards already written are skipped",
    )
    j.add_argument(
        "--only-shards",
        type=_shard_numbers,
        default=None,
        metavar="LIST",
        help="with --shards: submit only these output shards, e.g. 3,7 (a failed job's, as jobs status shows)",
    )
    j.add_argument(
        "--plan",
        action="store_true",
        help="with --shards: print each job's shards, time and cost from the Hub's hardware list; submit nothing",
    )
    j.add_argument(
        "job_argv",
        nargs=argparse.REMAINDER,
        metavar="COMMAND ...",
        help="e.g. merge --base … --push-to ME/OUT",
    )
    for action, what in (
        ("status", "the job's stage (of a split run: every job's, and the shards written)"),
        ("logs", "stream its logs"),
        ("cancel", "stop it (a split run: all its jobs)"),
    ):
        j = jobs.add_parser(action, help=what)
        j.add_argument(
            "job_id", help="the job's id, OWNER/ID, the URL `jobs run` printed, or a split run's REPO@BRANCH"
        )
        j.add_argument("--namespace", default=None)
        j.add_argument("--token", default=None)

    p = sub.add_parser(
        "inspect",
        help="per-layer norms of a residuals (or merged) folder",
        description="Print per-layer ‖R‖ (and ‖R‖/‖θ_base‖ when recorded) of a residuals folder.",
    )
    p.add_argument("path", help="residuals folder or Hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(p, out=False)
    return parser


def _print_table(report: dict) -> None:
    print(f"residuals: {report['path']}")
    print(
        f"  {report['instruct_model']} − {report['base_model']}  ({report['dtype']}, {report['tensors']} tensors)"
    )
    rel = report.get("relative")
    print(f"  total ‖R‖ = {report['total_norm']:.6g}" + (f"   ‖R‖/‖θ_base‖ = {rel:.4g}" if rel else ""))
    claims = report["claims"]
    if claims["mismatched"]:
        print(
            f"  warning: its manifest records norms for {claims['claimed']} tensors, {claims['mismatched']} of "
            "which do not match the weights (every norm here is computed from the weights)"
        )
    print(f"\n  {'layer':>10}  {'‖R‖':>12}  {'‖R‖/‖θ‖':>10}")
    for row in report["layers"]:
        r = f"{row['relative']:.4g}" if row.get("relative") is not None else "–"
        print(f"  {row['layer']:>10}  {row['norm']:>12.6g}  {r:>10}")


# The run flags are Options fields by name (--max-shard-size -> max_shard_size): one way to pass options.
CLI_OPTIONS = (
    "device",
    "max_shard_size",
    "overwrite",
    "fsync",
    "direct_io",
    "token",
    "allow_pickle",
    "push_to",
    "private",
    "run_branch",
    "only_shards",
)
assert set(CLI_OPTIONS) <= OPTION_NAMES, set(CLI_OPTIONS) - OPTION_NAMES


def _options(args: argparse.Namespace, progress: _TqdmProgress) -> Options:
    """The Options a command's flags give (those it has), with the progress bar."""
    return Options(
        **{name: getattr(args, name) for name in CLI_OPTIONS if hasattr(args, name)}, progress=progress
    )


def _compute_sparsified(args: argparse.Namespace, common: dict):
    """compute --dare/--trim: the exact residuals into a temporary folder, then sparsified into --out."""
    import tempfile

    from . import operations
    from .options import work_dir

    options = common["options"]
    with tempfile.TemporaryDirectory(prefix="residuals-exact-", dir=work_dir(options)) as folder:
        exact = operations.compute_residuals(
            args.base,
            args.instruct,
            folder + "/residuals",
            dtype=args.dtype,
            instruct_tokenizer_name=args.instruct_tokenizer,
            license=args.license,
            normalize_embeddings=args.normalize_embeddings,
            options=options.with_(push_to=None, overwrite=False),
        )
        return operations.sparsify_residuals(
            exact.path, args.out, dare=args.dare, trim=args.trim, seed=args.seed, options=options
        )


def _jobs(args: argparse.Namespace) -> int:
    """jobs run / status / logs / cancel, over huggingface_hub's Jobs API."""
    import os

    from huggingface_hub import get_token

    from . import jobs

    token = args.token or get_token()
    if args.jobs_command == "run":
        image = args.image or (
            f"hf.co/spaces/{os.environ['SPACE_ID']}" if os.environ.get("SPACE_ID") else None
        )
        if args.shards is not None:
            return _split_run(args, token, image)
        if args.only_shards is not None or args.plan:
            raise ResidualsError("--only-shards and --plan go with --shards.", "Add --shards N.")
        if image is None:
            raise ResidualsError(
                "No image to run the job in.",
                "Give --image hf.co/spaces/OWNER/NAME (a Space of this project), or run it from such a Space.",
            )
        submitted = jobs.run_job(
            args.job_argv,
            token=token,
            image=image,
            flavor=args.flavor,
            timeout=args.timeout,
            namespace=args.namespace,
        )
        print(f"job {submitted.id} submitted: {submitted.url}")
        print(f"job {submitted.id}: {submitted.plan.describe()}")
        if not args.follow:
            return 0
        for line in jobs.job_logs(submitted.url, token=token, namespace=args.namespace):
            print(line, flush=True)
        final = jobs.wait_for_job(submitted.url, token=token, namespace=args.namespace)
        print(jobs.describe_end(final), flush=True)
        return 0 if final.status.stage == "COMPLETED" else 1  # as `hf jobs`: a failed job fails the command
    if jobs.parse_run_ref(args.job_id) is not None and args.jobs_command in ("status", "cancel"):
        if args.jobs_command == "status":
            status = jobs.split_run_status(args.job_id, token=token, namespace=args.namespace)
            print(status.describe())
            for job, line in zip(status.jobs, status.job_lines(), strict=True):
                print(f"  {line} ({job.url})")
        else:
            cancelled = jobs.cancel_split_run(args.job_id, token=token, namespace=args.namespace)
            print(f"run {args.job_id}: cancel requested for {len(cancelled)} job(s)")
        return 0
    if args.jobs_command == "status":
        info = jobs.job_status(args.job_id, token=token, namespace=args.namespace)
        message = f" — {info.status.message}" if info.status.message else ""
        print(f"job {info.id}: {info.status.stage}{message} ({info.url})")
    elif args.jobs_command == "logs":
        for line in jobs.job_logs(args.job_id, token=token, namespace=args.namespace):
            print(line, flush=True)
    else:
        jobs.cancel_job(args.job_id, token=token, namespace=args.namespace)
        print(f"job {args.job_id}: cancel requested")
    return 0


def _split_run(args: argparse.Namespace, token: str | None, image: str | None) -> int:
    """jobs run --shards N: plan, say the cost, submit the jobs; with --follow, watch them all."""
    import time

    from . import jobs

    plan = jobs.plan_split_run(
        args.job_argv,
        shards=args.shards,
        token=token,
        only_shards=args.only_shards,
        flavor=args.flavor,
        timeout=args.timeout,
        namespace=args.namespace,
    )
    print(plan.describe(), flush=True)
    if plan.published:
        print(f"run {plan.ref}: already published to {plan.repo_id}")
        return 0
    if args.plan:
        return 0
    if not plan.parts and not plan.busy:  # every shard is there: publish from here (small files only)
        print(f"run {plan.ref}: every shard is on the run branch; publishing it from here", flush=True)
        return run([*plan.argv, "--run-branch", plan.branch, "--only-shards", "none", "--quiet"])
    if image is None:
        raise ResidualsError(
            "No image to run the jobs in.",
            "Give --image hf.co/spaces/OWNER/NAME (a Space of this project), or run it from such a Space.",
        )
    for job in jobs.submit_split_run(plan, token=token, image=image, namespace=args.namespace):
        print(f"job {job.id} submitted: {job.url}", flush=True)
    print(
        f"run {plan.ref}: follow with `jobs status {plan.ref}`, stop with `jobs cancel {plan.ref}`",
        flush=True,
    )
    if not args.follow:
        return 0
    seen = ""
    while True:
        status = jobs.split_run_status(plan.ref, token=token, namespace=args.namespace)
        if status.describe() != seen:
            seen = status.describe()
            print(seen, flush=True)
        if status.finished:
            break
        time.sleep(FOLLOW_POLL_S)
    if status.published:
        return 0
    for line in status.job_lines([j for j in status.jobs if j.status.stage != "COMPLETED"]):
        print(f"  {line}")
    print(
        f"run {plan.ref} is not complete: run the same `jobs run --shards` command again to write the shards "
        "still missing (those on the branch are kept)",
        flush=True,
    )
    return 1


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with` block cleans up as on Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    """Parse and run one command; a user's mistake or a machine fault raises ResidualsError."""
    args = build_parser().parse_args(argv)
    _start_early(args)
    from . import operations  # the engine's modules: imported once the command is known

    progress = _TqdmProgress(args.command, enabled=not getattr(args, "quiet", True))
    if args.command == "inspect":
        report = operations.inspect_residuals(args.path, token=args.token)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_table(report)
        return 0
    if args.command == "jobs":
        return _jobs(args)
    if args.command == "lora":
        if (args.base is None) != (args.instruct is None):
            raise ResidualsError("--base and --instruct go together.", "Give both, or --residuals instead.")
        result = operations.export_lora(
            args.residuals,
            args.out,
            base=args.base,
            instruct=args.instruct,
            rank=args.rank,
            energy=args.energy,
            embeddings=args.embeddings,
            options=_options(args, progress),
        )
        summary = result.summary
        ranks = sorted({m["rank"] for m in summary["matrices"]})
        print(
            f"LoRA adapter written to {result.location}: {len(summary['matrices'])} matrices, ranks "
            f"{ranks[0]}–{ranks[-1]}, ‖R − R̂‖/‖R‖ = {summary['relative_error']:.4f}, "
            f"{summary['adapter_bytes'] / 1e6:.1f} MB (full residuals: {summary['residual_bytes'] / 1e6:.1f} MB)"
        )
        return 0
    result = _result(args, _options(args, progress))
    if "part" in result.summary:
        print(f"share of the run written: {result.summary['part']} ({result.location})")
        return 0
    if args.command in ("sparsify", "compute") and result.reconstruction is None:
        print(f"sparsified residuals written to {result.location}")
    elif args.command == "compute":
        recon = result.reconstruction or {}
        exact = "exact" if recon.get("exact") else f"{recon.get('mismatched_elements')} elements off"
        print(f"residuals written to {result.location} (reconstruction check: {exact})")
    elif args.command == "apply":
        print(f"model written to {result.location}")
    else:
        print(f"merged model written to {result.location}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"total ‖delta‖ = {result.summary.get('total_norm', 0.0):.6g}")
    return 0


def _start_early(args: argparse.Namespace) -> None:
    """Before the engine's modules load and the plan is made (time in which the disk and the second core
    would idle): the kernel starts reading the local inputs, and apply starts checking its residuals
    against their manifest."""
    if args.command not in ("compute", "apply", "merge", "sparsify"):
        return
    from .sources import prefetch_local_inputs

    inputs = ("base", "instruct", "target", "residuals", "model")
    prefetch_local_inputs([getattr(args, name, None) for name in inputs])
    if args.command == "apply":
        from .manifest import check_files_early

        check_files_early(args.residuals)


def _result(args: argparse.Namespace, options: Options):
    """Run compute / sparsify / apply / merge as the parsed arguments say."""
    from . import operations

    common = dict(normalize_embeddings=args.normalize_embeddings, options=options)
    if args.command == "sparsify":
        return operations.sparsify_residuals(
            args.residuals, args.out, dare=args.dare, trim=args.trim, seed=args.seed, options=options
        )
    if args.command == "compute" and (args.dare is not None or args.trim is not None):
        return _compute_sparsified(args, common)
    if args.command == "compute":
        return operations.compute_residuals(
            args.base,
            args.instruct,
            args.out,
            dtype=args.dtype,
            instruct_tokenizer_name=args.instruct_tokenizer,
            license=args.license,
            **common,
        )
    if args.command == "apply":
        return operations.apply_residuals(
            args.residuals, args.model, args.out, scale=args.scale, dtype=args.dtype, **common
        )
    return operations.merge_models(
        args.base, args.instruct, args.target, args.out, scale=args.scale, dtype=args.dtype, **common
    )


def plan_command(argv: list[str], *, token: str | None) -> dict:
    """What a compute / apply / merge command line would write, from the inputs' headers alone."""
    args = build_parser().parse_args(argv)
    options = _options(args, _TqdmProgress(args.command, enabled=False)).with_(
        plan_only=True, token=token, push_to=None, run_branch=None, only_shards=None
    )
    return _result(args, options).summary


def main(argv: list[str] | None = None) -> int:
    """The command line: every failure the user can cause or meet is `error: … what to do: …`, exit 2."""
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(argv)
    except ResidualsError as exc:
        print(f"error: {exc.problem}\n  what to do: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output folder was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): no output folder was left behind", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
