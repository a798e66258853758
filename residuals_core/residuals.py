"""`Residuals`: the public API of the `residuals` package (0.3.x), on a streaming engine.

Given model instances it works in memory as that package does. Given paths or Hub ids it never
loads a model: `from_models` only checks headers and computes lazily (straight into the folder
passed to `save_pretrained`, or into a temporary folder when tensors are needed), and
`from_pretrained` reads tensors from the files on demand.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import arithmetic, hub, operations
from .artifacts import TokenizerChoice, instruct_tokenizer_choice, write_residuals_files
from .checkpoint import Checkpoint, StateDictSource, TensorSource
from .config import ResidualsConfig, build_config
from .dtypes import FLOAT32, DType, dtype_from_name, dtype_name, to_torch
from .errors import ResidualsError, reports_os_errors
from .options import DEFAULT_MAX_SHARD_SIZE, Options, make_options
from .sinks import FolderSink
from .tokenizer import (
    align_tokenizer_and_embeddings,
    copy_tokenizer,
    grow_embeddings,
    has_tokenizer,
    load_tokenizer,
    resize_model_to_tokenizer,
)

ModelLike = Any  # a transformers PreTrainedModel, a local path or a Hub id


class LazyStateDict(Mapping):
    """name -> tensor, read from the residuals files only when asked (one tensor at a time)."""

    def __init__(self, source: TensorSource, device=None, dtype: DType | None = None):
        self._source = source
        self._device = device
        self._dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._source.tensors.get(name)
        if info is None:
            raise KeyError(name)
        tensor = to_torch(self._source.read(name), info.dtype).clone()  # a tensor of its own
        cast = self._dtype if (self._dtype is not None and info.dtype.is_floating_point) else info.dtype
        return tensor.to(device=self._device or "cpu", dtype=cast.torch)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.tensors)

    def __len__(self) -> int:
        return len(self._source.tensors)


def _is_path_like(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike))


def _model_name(model: Any) -> str | None:
    if _is_path_like(model):
        return str(model)
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _open_input(model: Any, role: str, options: Options) -> TensorSource:
    if isinstance(model, Checkpoint) or _is_path_like(model):
        return operations.open_model(model, role=role, options=options)
    if isinstance(model, torch.nn.Module):
        return StateDictSource(
            model.state_dict(),
            label=_model_name(model) or f"{role} model instance",
            vocab_size=_vocab_size(model),
        )
    raise ResidualsError(
        f"{role}_model must be a model instance, a local folder or a Hub id; got {type(model).__name__}.",
        "Pass e.g. 'meta-llama/Meta-Llama-3-8B' or an AutoModelForCausalLM instance.",
    )


def _vocab_size(model: torch.nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and hasattr(model, "get_input_embeddings"):
        size = model.get_input_embeddings().weight.shape[0]
    return size


class Residuals:
    """Instruction residuals R = θ_instruct − θ_base with load / save / apply ergonomics."""

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        config: ResidualsConfig | None = None,
        instruct_tokenizer: Any = None,
    ):
        self._memory: dict[str, torch.Tensor] | None = dict(state_dict) if state_dict is not None else None
        self.config = (
            config
            if config is not None
            else build_config([], tokenizer_name=None, base_model_name=None, instruct_model_name=None)
        )
        self._tokenizer = instruct_tokenizer
        self._folder: Path | None = None  # file-backed residuals
        self._pending: dict[str, Any] | None = None  # lazy compute from two checkpoints
        self._cast: tuple[Any, DType | None] = (None, None)
        self._stats: dict[str, Any] = {}
        self._temp_holder: Any = None  # keeps a temporary folder alive while this object lives
        self._checkpoint: Checkpoint | None = None  # file-backed residuals, local or on the Hub
        self._read_token: str | None = None  # the token they were opened with (a private Hub repo)
        self._verified = False  # a Hub checkpoint's files checked whole (for out-of-order reads)

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    @reports_os_errors
    def from_models(
        base_model: ModelLike = None,
        instruct_model: ModelLike = None,
        instruct_tokenizer: Any = None,
        instruct_tokenizer_name: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = "cpu",
        normalize_embeddings: bool = True,
        *,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
    ) -> Residuals:
        """Residuals of instruct − base; each model a path, a Hub id or an instance.

        With paths or ids nothing is loaded: headers are checked now (so incompatible pairs fail in
        seconds) and tensors are streamed later, straight into `save_pretrained`'s folder.
        """
        if base_model is None:
            raise ResidualsError(
                "base_model is missing.", "Pass the base model as an instance, a folder or a Hub id."
            )
        if instruct_model is None:
            raise ResidualsError(
                "instruct_model is missing.", "Pass the instruct model as an instance, a folder or a Hub id."
            )
        storage = dtype_from_name(dtype)
        opts = Options(token=token, cache_dir=cache_dir, allow_pickle=allow_pickle, device=device or "cpu")
        base_src = _open_input(base_model, "base", opts)
        inst_src = _open_input(instruct_model, "instruct", opts)
        tokenizer = instruct_tokenizer
        if tokenizer is None and instruct_tokenizer_name is not None:
            tokenizer = load_tokenizer(instruct_tokenizer_name)
        if tokenizer is None and not isinstance(inst_src, Checkpoint):
            inferred = _model_name(instruct_model)
            if inferred:
                try:
                    tokenizer = load_tokenizer(inferred)
                    instruct_tokenizer_name = instruct_tokenizer_name or inferred
                except ResidualsError:
                    tokenizer = None
        tokenizer_name = instruct_tokenizer_name or (
            getattr(tokenizer, "name_or_path", None) if tokenizer else None
        )

        if isinstance(base_src, Checkpoint) and isinstance(inst_src, Checkpoint):
            # validate now from headers alone; compute lazily
            choice = instruct_tokenizer_choice(inst_src, tokenizer, instruct_tokenizer_name)
            plan = operations.plan_difference(
                base_src,
                inst_src,
                out_dtype=storage,
                normalize_embeddings=normalize_embeddings,
                tokenizer_length=choice.length,
            )
            res = Residuals(
                config=build_config(
                    [o.info for o in plan.outputs],
                    tokenizer_name=choice.name,
                    base_model_name=base_src.label,
                    instruct_model_name=inst_src.label,
                ),
                instruct_tokenizer=tokenizer,
            )
            res._pending = {
                "base": base_src,
                "instruct": inst_src,
                "dtype": storage,
                "normalize_embeddings": normalize_embeddings,
                "instruct_tokenizer": tokenizer,
                "instruct_tokenizer_name": instruct_tokenizer_name,
                "options": opts,
            }
            return res

        # at least one instance: compute in memory, as the residuals package does
        tok_len = len(tokenizer) if tokenizer is not None else None
        if not normalize_embeddings and tokenizer is not None:
            sizes = {base_src.vocab_size, inst_src.vocab_size}
            if any(size is not None and size != len(tokenizer) for size in sizes):
                raise ResidualsError(
                    f"Tokenizer vocab length ({len(tokenizer)}) does not match model embedding sizes ({sorted(sizes)}).",
                    "Set normalize_embeddings=True to auto-resize.",
                )
        plan = operations.plan_difference(
            base_src,
            inst_src,
            out_dtype=storage,
            normalize_embeddings=normalize_embeddings,
            tokenizer_length=tok_len,
        )
        sink = arithmetic.DictSink(plan)
        stats = arithmetic.execute(
            plan,
            arithmetic.residual_of,
            sink,
            reference_operand=0,
            check_reconstruction=arithmetic.reconstruction_check,
            device=device or "cpu",
            piece_bytes=1 << 62,
        )
        state = sink.tensors()
        config = build_config(
            [o.info for o in plan.outputs],
            tokenizer_name=tokenizer_name,
            base_model_name=_model_name(base_model),
            instruct_model_name=_model_name(instruct_model),
        )
        res = Residuals(state, config, instruct_tokenizer=tokenizer)
        res._stats = {
            "tensors": {n: s.as_dict() for n, s in stats.items()},
            "reconstruction": arithmetic.describe_stats(stats),
        }
        if device not in (None, "cpu"):
            res._memory = {k: v.to(device) for k, v in state.items()}
        return res

    @staticmethod
    @reports_os_errors
    def from_pretrained(
        path: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        token: str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = True,
    ) -> Residuals:
        """Open a residuals folder or Hub repo; tensors stay in the files until read. Hashes are verified.

        A Hub repo is read where it is (streamed, sha256 checked), never downloaded.
        """
        opened = operations.open_residuals(
            path, options=Options(token=token, cache_dir=cache_dir), revision=revision, verify=verify
        )
        opened.close()
        ck, config = opened.checkpoint, opened.config
        res = Residuals(config=config)
        res._read_token = token
        res._checkpoint = ck
        res._folder = ck.folder
        res._cast = (map_location, None)
        manifest = opened.manifest or {}
        res._stats = {k: manifest.get(k) for k in ("tensors", "reconstruction") if manifest.get(k)}
        return res

    # ---- views -------------------------------------------------------------------------------
    def _source(self) -> TensorSource:
        if self._memory is not None:
            return StateDictSource(self._memory, label="residuals")
        self._materialize()
        return self._checkpoint if self._checkpoint is not None else Checkpoint.open(self._folder)

    def _materialize(self) -> None:
        """Run a pending lazy compute into a temporary folder (removed with this object)."""
        if self._pending is None:
            return
        holder = tempfile.TemporaryDirectory(prefix="residuals-")
        out = Path(holder.name) / "residuals"
        self._run_pending(out)
        self._temp_holder = holder
        weakref.finalize(self, shutil.rmtree, holder.name, True)

    def _run_pending(
        self, out_dir: Path | None, card_name: str | None = None, **overrides
    ) -> operations.Result:
        """Compute the pending job into `out_dir` (or the Hub repo `push_to`); afterwards this object
        reads from that folder (a push leaves it lazy: nothing local to read)."""
        job = self._pending
        dtype = self._cast[1] or job["dtype"]
        result = operations.compute_residuals(
            job["base"],
            job["instruct"],
            out_dir,
            dtype=dtype,
            normalize_embeddings=job["normalize_embeddings"],
            instruct_tokenizer=job["instruct_tokenizer"],
            instruct_tokenizer_name=job["instruct_tokenizer_name"],
            config=copy.deepcopy(self.config),
            card_name=card_name,
            options=job["options"].with_(**overrides),
        )
        if result.path is not None:
            self.config = result.config
            self._stats = {"tensors": result.tensors, "reconstruction": result.reconstruction}
            self._pending = None
            self._cast = (self._cast[0], None)
            self._folder = result.path
        return result

    @property
    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """name -> residual tensor. File-backed residuals are read one tensor per access."""
        if self._memory is not None:
            return self._memory
        self._materialize()
        device, dtype = self._cast
        source = self._source()
        if isinstance(source, Checkpoint) and source.remote and not self._verified:
            # tensors are read out of file order here: check each Hub file whole first (sha256)
            for reader in source.readers.values():
                reader.verify()
            self._verified = True
        return LazyStateDict(source, device=device, dtype=dtype)

    @property
    def instruct_tokenizer(self):
        if self._tokenizer is None and self._folder is not None and has_tokenizer(self._folder):
            self._tokenizer = load_tokenizer(self._folder)
        return self._tokenizer

    @instruct_tokenizer.setter
    def instruct_tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def stats(self) -> dict[str, Any]:
        """Per-tensor norms and the reconstruction check, when they were measured."""
        return self._stats

    # ---- saving ------------------------------------------------------------------------------
    @reports_os_errors
    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        *,
        options: Options | None = None,
        _card_name: str | None = None,
        **option_overrides: Any,
    ) -> Path:
        """Write weights, tokenizer, config.json, manifest and README.md; atomically. Further keywords
        are `Options` fields (max_shard_size, overwrite, progress, fsync, ...)."""
        out_dir = Path(out_dir)
        options = make_options(options, option_overrides)
        if options.push_to is not None:
            raise ResidualsError(
                "save_pretrained writes a folder.", "Use push_to_hub(repo_id) to write to the Hub."
            )
        self._save(out_dir, options, card_name=_card_name or out_dir.name)
        return out_dir.absolute()

    def _save(self, out_dir: Path | None, options: Options, *, card_name: str | None) -> operations.Result:
        """Stream these residuals into a folder, or into the Hub repo `options.push_to`."""
        if self._pending is not None:
            return self._run_pending(
                out_dir,
                card_name=card_name,
                **{
                    k: getattr(options, k)
                    for k in ("max_shard_size", "overwrite", "progress", "push_to", "private")
                },
                **({"token": options.token} if options.token is not None else {}),
            )
        if self._tokenizer is None and not (self._folder is not None and has_tokenizer(self._folder)):
            raise ResidualsError(
                "No instruct tokenizer to save with the residuals.",
                "Set it via from_models(..., instruct_tokenizer=... or instruct_tokenizer_name=...).",
            )
        source = self._source()
        _, dtype = self._cast
        plan = arithmetic.plan_tensors(
            [("residuals", source)],
            out_dtype=lambda info: (
                dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            ),
            normalize_embeddings=False,
        )
        tokenizer, folder = self._tokenizer, self._folder
        choice = TokenizerChoice(
            self.config.tokenizer_name,
            None,
            (lambda target: tokenizer.save_pretrained(str(target)))
            if tokenizer is not None
            else (lambda target: copy_tokenizer(folder, target)),
        )
        recorded = self._stats.get("tensors")

        def write(sink) -> operations.Result:
            weights, measured = operations.stream_into(
                sink, plan, lambda pieces, o, into: (pieces[0], pieces[0]), options, inputs=[source],
                reference_operand=None,
            )  # fmt: skip
            same_dtype = dtype is None or dtype_name(dtype) == self.config.dtype
            return write_residuals_files(
                sink.path,
                weights,
                infos=[o.info for o in plan.outputs],
                plan=None,
                tensor_stats=recorded or {n: s.as_dict() for n, s in measured.items()},
                reconstruction=self._stats.get("reconstruction") if same_dtype else None,
                base_name=self.config.base_model_name,
                instruct_name=self.config.instruct_model_name,
                tokenizer=choice,
                generation_config=(folder / "generation_config.json") if folder else None,
                config=copy.deepcopy(self.config),
                card_name=card_name or operations.sink_name(sink),
            )

        try:
            return operations.write_result(
                out_dir,
                options,
                inputs=[source],
                shard_bytes=operations.plan_shards(plan, options),
                write=write,
            )
        finally:
            source.close()

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> Residuals:
        """A new Residuals with tensors moved/cast; every piece of metadata is kept. The original is untouched."""
        dtype = dtype_from_name(dtype) if dtype is not None else None
        new = Residuals(config=copy.deepcopy(self.config), instruct_tokenizer=self._tokenizer)
        new._stats = copy.deepcopy(self._stats)
        if self._memory is not None:
            new._memory = {
                k: v.to(
                    device=device if device is not None else v.device,
                    dtype=dtype.torch if (dtype is not None and v.dtype.is_floating_point) else v.dtype,
                )
                for k, v in self._memory.items()
            }
        else:
            new._folder = self._folder
            new._checkpoint, new._read_token = self._checkpoint, self._read_token
            new._pending = dict(self._pending) if self._pending else None
            new._temp_holder = self._temp_holder
            new._cast = (device if device is not None else self._cast[0], dtype or self._cast[1])
        if dtype is not None:
            new.config.dtype = dtype_name(dtype)
            if new._stats.get("reconstruction") and dtype != FLOAT32:
                new._stats.pop("reconstruction")
        return new

    # ---- applying ----------------------------------------------------------------------------
    @reports_os_errors
    def apply(
        self,
        base_model: ModelLike = None,
        base_tokenizer: Any = None,
        instruct_tokenizer: Any = None,
        base_tokenizer_name: str | None = None,
        instruct_tokenizer_name: str | None = None,
        out_dir: str | os.PathLike | None = None,
        scale: float = 1.0,
        normalize_embeddings: bool = True,
        model_dtype: torch.dtype | str | None = None,
        base_model_device: str | torch.device | None = "cpu",
        *,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        token: str | None = None,
        progress: arithmetic.Progress | None = None,
    ):
        """Add scale·R to a model.

        - A model instance is updated in place (as in the `residuals` package) and returned;
          with `out_dir` it is also saved there.
        - A path or Hub id with `out_dir` is streamed tensor by tensor into `out_dir` (no model is
          loaded; output dtype `model_dtype`, default the checkpoint's) and the folder's Path is
          returned: load it with `AutoModelForCausalLM.from_pretrained(out_dir)`.
        - A path or Hub id without `out_dir` is loaded (float32 unless `model_dtype`), updated, returned.
        """
        if base_model is None:
            raise ResidualsError(
                "base_model is missing.",
                "Pass the model to apply the residuals to (an instance, a folder or a Hub id).",
            )
        if _is_path_like(base_model) and out_dir is not None:
            return self._apply_streaming(
                base_model,
                out_dir,
                scale=scale,
                normalize_embeddings=normalize_embeddings,
                dtype=model_dtype,
                overwrite=overwrite,
                max_shard_size=max_shard_size,
                token=token,
                device=base_model_device or "cpu",
                progress=progress,
            )
        if _is_path_like(base_model):
            from transformers import AutoModelForCausalLM

            folder = hub.resolve_model_folder(base_model, token=token)
            operations.open_model(str(folder), role="base").close()  # the same early checks as streaming
            base_model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype_from_name(model_dtype).torch if model_dtype else torch.float32
            )
            if base_model_device not in (None, "cpu"):
                base_model = base_model.to(base_model_device)
        self._materialize()  # a lazy job's tokenizer and tensors live in its folder
        tokenizer = instruct_tokenizer
        if tokenizer is None and instruct_tokenizer_name is not None:
            tokenizer = load_tokenizer(instruct_tokenizer_name)
        if tokenizer is None:
            tokenizer = self.instruct_tokenizer
        self._apply_in_place(
            base_model,
            scale=scale,
            normalize_embeddings=normalize_embeddings,
            tokenizer=tokenizer,
            base_tokenizer=base_tokenizer
            or (load_tokenizer(base_tokenizer_name) if base_tokenizer_name else None),
        )
        if out_dir is not None:
            with FolderSink(
                out_dir, overwrite=overwrite, inputs=[self._folder] if self._folder else []
            ) as out:
                base_model.save_pretrained(str(out.path))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(out.path))
        return base_model

    def _apply_streaming(self, target: Any, out_dir: Any, **kwargs) -> Path:
        """One apply path for paths and ids: the very folder compute-then-apply would give."""
        job = self._pending
        if job is not None and (self._cast[1] or job["dtype"]) == FLOAT32:
            # float32 residuals need not be stored: the one-pass merge computes the very same numbers,
            # with the same instruct tokenizer deciding the vocabulary rows and the tokenizer shipped
            return operations.merge_models(
                job["base"],
                job["instruct"],
                target,
                out_dir,
                instruct_tokenizer=job["instruct_tokenizer"],
                instruct_tokenizer_name=job["instruct_tokenizer_name"],
                **kwargs,
            ).path
        if self._memory is not None or self._cast[1] is not None:
            holder = tempfile.TemporaryDirectory(prefix="residuals-")
            try:
                folder = self.save_pretrained(Path(holder.name) / "residuals")
                return operations.apply_residuals(folder, target, out_dir, **kwargs).path
            finally:
                holder.cleanup()
        self._materialize()
        if kwargs.get("token") is None:
            kwargs["token"] = self._read_token
        return operations.apply_residuals(self._source_name(), target, out_dir, **kwargs).path

    def _source_name(self) -> str:
        """What to open these file-backed residuals by again: the Hub id or the folder."""
        if self._checkpoint is not None and self._checkpoint.remote:
            return self._checkpoint.label
        return str(self._folder)

    def _apply_in_place(
        self, model: torch.nn.Module, *, scale: float, normalize_embeddings: bool, tokenizer, base_tokenizer
    ) -> None:
        scale = arithmetic.check_scale(scale)
        residuals = self.state_dict
        params = dict(model.named_parameters())  # tied weights appear once
        embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        embed_name = next((n for n, p in params.items() if embed is not None and p is embed), None)
        if normalize_embeddings and tokenizer is not None:
            resize_model_to_tokenizer(model, tokenizer)
        elif (
            base_tokenizer is not None
            and tokenizer is not None
            and base_tokenizer.pad_token is None
            and tokenizer.pad_token is not None
        ):
            align_tokenizer_and_embeddings(model, base_tokenizer)
        if normalize_embeddings and embed_name and embed_name in residuals:
            grow_embeddings(model, residuals[embed_name].shape[0])
        params = dict(model.named_parameters())
        missing = [n for n in params if n not in residuals]
        if missing:
            raise ResidualsError(
                f"Residuals missing key: {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ".",
                "The residuals were computed for another architecture; apply them to a model of the family and size "
                f"they came from ({self.config.base_model_name}). If the model has LoRA adapters, merge_and_unload() first.",
            )
        tensors = list(params.items()) + [(n, b) for n, b in model.named_buffers() if n in residuals]
        with torch.no_grad():
            for name, tensor in tensors:
                delta = residuals[name]
                if delta.shape != tensor.shape:
                    rows_only = delta.dim() == tensor.dim() >= 1 and delta.shape[1:] == tensor.shape[1:]
                    if normalize_embeddings and rows_only and delta.shape[0] < tensor.shape[0]:
                        padded = torch.zeros(tensor.shape, dtype=delta.dtype, device=delta.device)
                        padded[: delta.shape[0]] = delta
                        delta = padded
                    else:
                        raise ResidualsError(
                            f"Shape mismatch for {name}: param {tuple(tensor.shape)} vs delta {tuple(delta.shape)}.",
                            "If tokenizers differ (e.g., added tokens), set normalize_embeddings=True or provide "
                            "instruct_tokenizer/instruct_tokenizer_name to enable resizing.",
                        )
                delta = delta.to(tensor.device)
                if tensor.dtype.is_floating_point:
                    updated = tensor.float() + (delta.float() * scale if scale != 1.0 else delta.float())
                    rounded = updated.to(tensor.dtype)  # checked as it will be stored: float16 overflows here
                    if not torch.isfinite(rounded).all():
                        raise ResidualsError(
                            f"Applying the residuals at scale α = {scale:g} gives NaN or Inf in {name} "
                            f"({str(tensor.dtype).removeprefix('torch.')}).",
                            "Check the model and residuals for corrupt values, use a smaller scale, or load the "
                            "model in float32.",
                        )
                    tensor.copy_(rounded)
                else:
                    tensor.add_(delta.to(tensor.dtype))

    @staticmethod
    @reports_os_errors
    def apply_to_pretrained(
        model: ModelLike,
        residuals: str | os.PathLike,
        *,
        out_dir: str | os.PathLike | None = None,
        scale: float = 1.0,
        normalize_embeddings: bool = True,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = "cpu",
        map_location: str | torch.device = "cpu",
        token: str | None = None,
        base_tokenizer_name: str | None = None,
        instruct_tokenizer_name: str | None = None,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        progress: arithmetic.Progress | None = None,
    ):
        """Apply saved residuals (folder or Hub id) to a model; streams when both are on disk and out_dir is set."""
        if _is_path_like(model) and out_dir is not None:
            return operations.apply_residuals(
                residuals,
                model,
                out_dir,
                scale=scale,
                dtype=dtype,
                normalize_embeddings=normalize_embeddings,
                overwrite=overwrite,
                max_shard_size=max_shard_size,
                token=token,
                device=device or "cpu",
                progress=progress,
            ).path
        res = Residuals.from_pretrained(residuals, map_location=map_location, token=token)
        return res.apply(
            model,
            base_tokenizer_name=base_tokenizer_name,
            instruct_tokenizer_name=instruct_tokenizer_name,
            out_dir=out_dir,
            scale=scale,
            normalize_embeddings=normalize_embeddings,
            model_dtype=dtype,
            base_model_device=device,
            overwrite=overwrite,
            token=token,
        )

    @staticmethod
    @reports_os_errors
    def merge(
        base_model: str | os.PathLike,
        instruct_model: str | os.PathLike,
        target_model: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        scale: float = 1.0,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> Path:
        """One pass: target + scale·(instruct − base) into `out_dir`, no residuals written."""
        return operations.merge_models(
            base_model, instruct_model, target_model, out_dir, scale=scale, dtype=dtype, **kwargs
        ).path

    # ---- hub ---------------------------------------------------------------------------------
    @reports_os_errors
    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        exist_ok: bool = True,
        token: str | None = None,
        *,
        options: Options | None = None,
        **option_overrides: Any,
    ) -> str:
        """Stream the residuals straight into a Hub repo (card written for it); returns the repo URL.

        Each shard is uploaded as soon as it is written and deleted locally, and one commit adds
        everything: no full copy is saved first. A lazy object stays lazy.
        """
        if not exist_ok:
            from huggingface_hub import HfApi

            if HfApi(token=token).repo_exists(repo_id):
                raise ResidualsError(
                    f"{repo_id} already exists.", "Choose another name or pass exist_ok=True."
                )
        options = make_options(options, option_overrides).with_(push_to=repo_id, private=private, token=token)
        return self._save(None, options, card_name=None).url
