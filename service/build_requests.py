"""A build request -> the builder's BuildConfig: options, unpacked uploads, allowed folders.

Labels, templates and descriptions travel in the BuildConfig itself (in memory, through the
worker spec); only uploaded archives are unpacked into the job's work folder."""
from __future__ import annotations

from pathlib import Path

from kvclip.cache_builder.build import BuildConfig
from kvclip.cache_builder.sources import check_labels
from kvclip.errors import DataError
from kvclip.service.config import ServerConfig
from kvclip.service.errors import HttpError
from kvclip.service.schemas import BuildOptions


def check_mode(options: BuildOptions, has_data: bool, has_pool: bool) -> None:
    """Data (labelled images), labels only, or labels + an unlabelled pool; nothing else."""
    if has_data and has_pool:
        raise HttpError(422, "invalid_parameters", "give labelled data or an unlabelled pool, not both")
    if not has_data and not options.labels:
        raise HttpError(422, "invalid_parameters",
                        "a build needs labelled data (a 'data' archive or data_dir) or 'labels' "
                        "(alone for a zero-shot cache, or with a pool)")


def server_folder(path: str, config: ServerConfig, what: str) -> Path:
    """A server-side folder the request names, allowed only under --build-roots."""
    roots = config.build_root_paths
    if not roots:
        raise HttpError(403, "forbidden", f"{what}: server-side folders are disabled; start the server "
                        "with --build-roots to allow them, or upload an archive")
    resolved = Path(path).resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise HttpError(403, "forbidden", f"{what} {path!r} is not under a configured build root")
    if not resolved.is_dir():
        raise HttpError(422, "invalid_parameters", f"{what} {path!r} is not a folder on the server")
    return resolved


def model_folder(name: str, config: ServerConfig, what: str) -> Path:
    """A model the request names (schemas.model_folder_name checked its form): a folder under
    --models-dir. Over HTTP a model is never a hub id or a path of the caller's choosing: loading
    one reads (and may unpickle) whatever it names, so only what the operator put there loads."""
    if config.models_dir is None:
        raise HttpError(403, "forbidden", f"{what}: the server has no --models-dir, so builds over HTTP cannot "
                        "load Hugging Face models; start it with --models-dir DIR holding the model folders")
    root = Path(config.models_dir).resolve()
    resolved = (root / name).resolve()
    if resolved == root or not resolved.is_relative_to(root):  # a link out of the models folder
        raise HttpError(403, "forbidden", f"{what} {name!r} is not a folder under the server's --models-dir")
    if not resolved.is_dir():
        raise HttpError(422, "invalid_parameters", f"{what} {name!r}: no such model folder under the server's "
                        "--models-dir")
    return resolved


def captioner_for(options: BuildOptions, config: ServerConfig) -> str:
    """The builder's captioner name: hf:NAME becomes hf:FOLDER under --models-dir."""
    kind, _, target = options.captioner.partition(":")
    if kind == "hf":
        return f"hf:{model_folder(target, config, 'captioner')}"
    return options.captioner


def check_class_folders(data_root: Path) -> None:
    """The class folders' names are labels: the builder's label rules apply before the job is
    queued, so a bad name (a newline, a control character) is a 422, not a failed job."""
    names = [p.name for p in data_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    try:
        check_labels(names)
    except DataError as exc:
        raise DataError(f"class folder names: {exc}") from exc


def build_config(
    name: str,
    options: BuildOptions,
    data_root: Path | None,
    pool_root: Path | None,
    config: ServerConfig,
    source_name: str | None = None,
    owner: str | None = None,
) -> BuildConfig:
    """The builder's configuration, the option lists handed over as values; model names
    resolved under --models-dir (HttpError 403/422 when they cannot be)."""
    key = options.caption_api_key
    return BuildConfig(
        out=Path(config.caches) / name,
        data_dir=data_root,
        model=config.model,
        shots=None if options.shots == "all" else options.shots,
        views=options.views,
        captioner=captioner_for(options, config),
        captioner_model=options.captioner_model,
        caption_prompt=options.caption_prompt,
        caption_concurrency=options.caption_concurrency,
        caption_api_key=None if key is None else key.get_secret_value(),
        caption_key_from_env=False,  # the server's own key never goes to a URL a request chose
        synthesize=options.synthesize,
        sd_model=str(model_folder(options.sd_model, config, "sd_model")) if options.synthesize else options.sd_model,
        guidance=options.guidance,
        sd_steps=options.steps,
        support=options.support,
        templates=options.templates or None,
        descriptions=options.descriptions or None,
        labels=options.labels or None,
        seed=options.seed,
        device=config.device,
        model_cache_dir=config.model_cache_dir,
        activate=False,  # the server activates it when the job succeeds (service/jobs.py)
        owner=owner,  # and settles it then; the job records decide about it after a crash
        confine_links=True,  # a link inside a build root must not read files outside it
        progress=False,
        pool_dir=pool_root,
        pool_per_class=options.pool_per_class,
        keep_duplicates=options.keep_duplicates,
        source_name=source_name,
        target_precision=options.target_precision,
    )
