"""The run folder and the shared cache: where each stage's output, record and private data lives.

A provider stage (distill, transfer) is finished when its folder holds ``stage.json`` (`finish_stage` renames the
folder into place with it). A user stage (tune, full_tuning) releases exactly `RELEASED_FILES` into its folder and
keeps its record, checkpoints and every private test score in the run's private workspace, ``<run_dir>/private/``
(`release_user_stage`, `private_stage_done`). Also here: the cache keys of the distilled student and of the private
test scores, the public splits the provider's stages use, and the preflight check that public or distillation data
is not the private data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Optional

from ..assets import DEFAULT_DISTILLATION_DATASET, DISTILLATION_SPLITS_WITHOUT, EMBEDDED_PREFIX
from ..config import POST_CONFIG_NAME
from ..io import atomic_write_json, read_json_object
from .config import FULL_TUNING_FALLBACKS, PUBLIC_SPLITS_OF_PRIVATE_DATASETS, STAGE_DEPENDANTS, PipelineConfig
from .data import private_splits

STAGE_FILE = "stage.json"
# The user's own part of a run folder: records and scores computed from private data, and the checkpoints of the
# stages that read it. Nothing in it is handed to anyone.
PRIVATE_DIR = "private"
# The folder of a user stage's workspace that becomes its released folder (`release_user_stage`).
RELEASE_DIR = "release"
# Stages that train on the private training split. Their folder is what the user hands over, so it holds
# `RELEASED_FILES` only, and their record (losses, N, wall time, memory) lives in the private workspace.
USER_STAGES = ("tune", "full_tuning")
STAGE_FOLDERS = {"tune": "source_prompt", "transfer": "transferred_prompt", "full_tuning": "full_prompt"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Exactly what a user stage releases: the adapter PEFT writes (config, weights, its README card), the POST fields
# (`post_config.json`, with the DP ledger) and the DP accountant's history (`tuning.privacy.ACCOUNTANT_STATE_NAME`,
# which holds the accountant's steps and the ledger only). An allow-list, not a deny-list: whatever else a trainer
# saves (`training_args.bin` with the seed, the tokenizer, a future log) stays out unless someone decides it may go.
RELEASED_FILES = frozenset({"adapter_config.json", ADAPTER_WEIGHTS, POST_CONFIG_NAME, "README.md",
                            "dp_accountant.json"})
SCORES_FILE = "test_scores.json"
# The private test split's scores are cached per prompt under this fingerprint for the bare target (zero-shot).
NO_PROMPT = "no_prompt"
# Distillation corpora can be large: the preflight checks a uniform sample of this many texts (a 1% overlap shows
# as about 50 of them), so the check costs the same on every run.
DISTILL_OVERLAP_SAMPLE = 5000
# Held by the job that uses a run folder (`run_folder_lock`).
LOCK_FILE = ".lock"


class RunFolderBusy(ValueError):
    """Another job holds the run folder (two jobs on one folder used to leave it holding a stage record without
    its outputs, for good)."""


@contextlib.contextmanager
def run_folder_lock(run_dir: str):
    """Hold `run_dir` for this job: a second job on the same folder fails at once with `RunFolderBusy`, naming it.

    A file lock (`filelock`, as huggingface_hub uses for its cache), so it holds across processes and is released
    when the holder exits, even when it is killed.
    """
    from filelock import FileLock, Timeout

    os.makedirs(run_dir, exist_ok=True)
    lock = FileLock(os.path.join(run_dir, LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(
            f"Another job is using the run folder {run_dir!r} (it holds {lock.lock_file}). Wait for it to finish, "
            "or give this run its own --run_dir.") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def student_cache_lock(folder: str):
    """Hold the student-cache entry `folder` while distilling it. A second job that needs the same student waits for
    the first and then reuses its student, instead of distilling it again into the same folder."""
    from filelock import FileLock, Timeout

    os.makedirs(os.path.dirname(folder), exist_ok=True)
    lock = FileLock(folder + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Another job is distilling the student at {folder}; waiting for it to finish ...", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def stage_done(folder: str) -> Optional[dict]:
    """The stage record of a finished provider stage folder (distill, transfer), or None. A user stage keeps its
    record in the private workspace: see `private_stage_done` and `stage_record`."""
    path = os.path.join(folder, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    return read_record(path)


def read_record(path: str) -> dict:
    """A stage record (or any JSON object the pipeline wrote), with a damaged file named in a ValueError."""
    return read_json_object(path, "The stage record is damaged: delete the stage's folder, or pass --overwrite "
                            "<stage>, to run the stage again.")


def finish_stage(partial: str, final: str, record: dict) -> dict:
    """Publish a provider stage (distill, transfer): write its record into the partial folder, then rename it into
    place (atomic).

    The record carries the stage's peak resident memory (`track_stage` reset the high-water mark on entry), so a
    later run that reuses the stage still reports what it cost.
    """
    from ..profiling import peak_rss_mb

    record = {**record, "peak_memory_mb": round(peak_rss_mb(), 1), "outputs": output_digests(partial)}
    atomic_write_json(os.path.join(partial, STAGE_FILE), record)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    return record


def private_workspace(folder: str) -> str:
    """The private workspace beside a stage folder: ``<run_dir>/private`` for ``<run_dir>/source_prompt``."""
    return os.path.join(os.path.dirname(os.path.abspath(folder)), PRIVATE_DIR)


def user_stage_workspace(folder: str, stage: str) -> str:
    """Where user stage `stage`, released as `folder`, runs: ``<run_dir>/private/<stage>.partial`` (its checkpoints
    and, while it publishes, its release folder)."""
    return os.path.join(private_workspace(folder), stage + ".partial")


def private_record_path(folder: str, stage: str) -> str:
    """Where the record of user stage `stage`, whose released folder is `folder`, lives: ``private/<stage>.json``."""
    return os.path.join(private_workspace(folder), f"{stage}.json")


def adapter_fingerprint(folder: str) -> Optional[str]:
    """sha256 of the adapter weights in `folder` (None without them): what ties a private record, or a cached
    test score, to the exact prompt it describes, wherever the folder was copied."""
    from ..assets import sha256_file

    path = os.path.join(folder, ADAPTER_WEIGHTS)
    return sha256_file(path) if os.path.isfile(path) else None


def private_stage_done(folder: str, stage: str) -> Optional[dict]:
    """The private record of a finished user stage (`USER_STAGES`, or the audit's shadows) released as `folder`,
    or None.

    Finished means the record exists *and* names the adapter the folder holds: a released folder without its record
    (a crash between publishing and recording, a folder copied in without `private/`) counts as unfinished, and so
    does a record whose folder was replaced since.
    """
    path = private_record_path(folder, stage)
    if not os.path.isfile(path):
        return None
    record = read_record(path)
    fingerprint = adapter_fingerprint(folder)
    if fingerprint is None or record.get("adapter_sha256") != fingerprint:
        return None
    return record


def stage_record(run_dir: str, name: str) -> Optional[dict]:
    """The record of finished run-folder stage `name` ('tune', 'transfer', 'full_tuning') of `run_dir`, or None;
    for the user stages it is read from the private workspace."""
    if name not in STAGE_FOLDERS:
        raise ValueError(f"`name` must be one of {sorted(STAGE_FOLDERS)}, got {name!r}.")
    folder = os.path.join(run_dir, STAGE_FOLDERS[name])
    return private_stage_done(folder, name) if name in USER_STAGES else stage_done(folder)


def release_user_stage(saved: str, folder: str, stage: str, record: dict, workspace: str) -> dict:
    """Publish a user stage. `folder` receives exactly the `RELEASED_FILES` the trainer saved in `saved` (renamed
    into place, atomic) after the record (with the released adapter's fingerprint and the stage's peak memory) is
    written to the private workspace; the workspace (checkpoints: optimizer and RNG state) is removed last. So a
    released prompt always has its record: a crash before the rename leaves the record and the release folder in the
    workspace, and `complete_release` finishes the rename (a rerun never trains a second prompt to hand over)."""
    from ..profiling import peak_rss_mb

    release = os.path.join(workspace, RELEASE_DIR)
    shutil.rmtree(release, ignore_errors=True)
    os.makedirs(release)
    names = sorted(os.listdir(saved))
    for name in names:
        if name in RELEASED_FILES:
            os.replace(os.path.join(saved, name), os.path.join(release, name))
    fingerprint = adapter_fingerprint(release)
    if fingerprint is None:
        raise RuntimeError(f"The trainer saved no {ADAPTER_WEIGHTS} in {saved} (it saved {names}).")
    record = {**record, "peak_memory_mb": round(peak_rss_mb(), 1), "adapter_sha256": fingerprint,
              "outputs": output_digests(release),
              "released_files": sorted(set(names) & RELEASED_FILES),
              "withheld_files": sorted(set(names) - RELEASED_FILES)}
    atomic_write_json(private_record_path(folder, stage), record)
    _move_release_into_place(release, folder, workspace)
    return record


def _move_release_into_place(release: str, folder: str, workspace: str) -> None:
    """The last step of publishing a user stage whose record is written: the release folder becomes `folder`
    (atomic rename), then the workspace with its checkpoints goes."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(release, folder)
    shutil.rmtree(workspace, ignore_errors=True)


def complete_release(folder: str, stage: str) -> bool:
    """Finish a user stage interrupted between writing its record and renaming its release folder into place (see
    `release_user_stage`): the rename, when the workspace's release folder holds the adapter the record names.
    Returns whether it did."""
    workspace = user_stage_workspace(folder, stage)
    release, path = os.path.join(workspace, RELEASE_DIR), private_record_path(folder, stage)
    if not (os.path.isfile(path) and os.path.isdir(release)):
        return False
    if adapter_fingerprint(release) != read_record(path).get("adapter_sha256"):
        return False
    _move_release_into_place(release, folder, workspace)
    return True


def migrate_legacy_user_stage(folder: str, stage: str) -> None:
    """A user stage published before the private workspace existed kept its record (losses, N) and its private test
    scores inside the released folder. Move the record into the workspace and delete every file that is not
    released, so such a run is reused, not retrained, and its folder becomes safe to hand over. Idempotent: the
    legacy record goes last, so an interrupted migration is finished by the next run."""
    legacy = os.path.join(folder, STAGE_FILE)
    if not os.path.isfile(legacy):
        return
    with open(legacy, encoding="utf-8") as f:
        record = json.load(f)
    withheld = sorted(set(os.listdir(folder)) - RELEASED_FILES - {STAGE_FILE})
    for name in withheld:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    fingerprint = adapter_fingerprint(folder)
    if fingerprint is not None:  # without weights the stage is unfinished anyway, and tuned again
        released = sorted(set(os.listdir(folder)) - {STAGE_FILE})
        atomic_write_json(private_record_path(folder, stage), {**record, "adapter_sha256": fingerprint,
                                                               "released_files": released, "withheld_files": withheld})
    os.remove(legacy)


def _spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _model_id(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path


def target_num_layers(target_path: str) -> int:
    """The number of transformer layers of the model at `target_path` (a folder or Hub id), read from its text
    config (`text_models.text_config`: a multimodal wrapper's language model): no weights are read. Cached per
    process by the path and, for a folder, its config file's size and modification time."""
    stamp = None
    config_file = os.path.join(target_path, "config.json")
    if os.path.isfile(config_file):
        stat = os.stat(config_file)
        stamp = (stat.st_size, stat.st_mtime_ns)
    return _target_num_layers(target_path, stamp)


@functools.lru_cache(maxsize=16)
def _target_num_layers(target_path: str, stamp) -> int:
    from ..text_models import text_config

    try:
        n = text_config(target_path).num_hidden_layers
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"`--target_model` {target_path!r}: could not read its number of layers from its config "
                         f"({type(err).__name__}: {err}); `--student_layers` counted from the top need it.") from None
    return int(n)


def resolved_student_layers(cfg: PipelineConfig, target_path: Optional[str] = None) -> list[int]:
    """`cfg.keep_layers()` with the layers counted from the top (negative) resolved against the target's layer
    count (`target_num_layers`; `target_path` defaults to `cfg.target_model` resolved), so ``0,1,-2,-1`` and
    ``0,1,28,29`` name the same student of a 30-layer target, and students keyed before the presets counted from
    the top keep their keys. A list without negative indices is returned as written, and no config is read.
    Raises `ValueError` for a list that does not fit the target (`preflight.check_student_layers` refused it
    before any work)."""
    from ..distill.student import normalize_layer_indices

    layers = cfg.keep_layers()
    if all(i >= 0 for i in layers):
        return layers
    if target_path is None:
        from ..assets import resolve_model

        target_path = resolve_model(cfg.target_model)
    return normalize_layer_indices(layers, target_num_layers(target_path))


def student_cache_key(cfg: PipelineConfig, target_path: str) -> str:
    """Everything that determines the distilled student, hashed: same key, same student. The layers are hashed as
    absolute indices (`resolved_student_layers`): the same layers written from the top give the same key."""
    return _student_key(cfg, target_path, resolved_student_layers(cfg, target_path))


def _student_key(cfg: PipelineConfig, target_path: str, layers: list) -> str:
    spec = {
        "target": _model_id(target_path),
        "layers": layers, "data": cfg.distill_dataset, "steps": cfg.distill_max_steps,
        "lr": cfg.distill_learning_rate, "batch": cfg.distill_batch_size, "block": cfg.distill_block_size,
        "templated": cfg.distill_templated_fraction, "template": cfg.template, "seed": cfg.seed,
        # float(): `5` and `5.0` are the same student, and json writes them differently.
        "label_slot_weight": float(cfg.distill_label_slot_weight), "freeze_embeddings": cfg.distill_freeze_embeddings,
    }
    if cfg.distill_split != "train":  # keeps the keys of students distilled before the field existed
        spec["split"] = cfg.distill_split
    spec.update(precision_settings(cfg, "distill"))
    return _spec_key(spec)


def student_folder(cfg: PipelineConfig, target_path: str) -> str:
    """The folder of `cfg`'s distilled student in the shared cache (there or not yet).

    A student distilled from layers written from the top before keys resolved them was keyed by the layers as
    written (``[0, -1]``); while no student is finished under the resolved key, that finished one is reused rather
    than distilled again.
    """
    from ..assets import cache_dir

    students = os.path.join(cache_dir(), "students")
    folder = os.path.join(students, student_cache_key(cfg, target_path))
    written = written_layers_student_key(cfg, target_path)
    if written is None or stage_done(folder) is not None:
        return folder
    legacy = os.path.join(students, written)
    return legacy if stage_done(legacy) is not None else folder


def written_layers_student_key(cfg: PipelineConfig, target_path: str) -> Optional[str]:
    """The key a student of layers counted from the top had before keys resolved them (the layers as written,
    ``[0, -1]``); None when every layer is written as an absolute index (those keys never changed)."""
    layers = cfg.keep_layers()
    return None if all(i >= 0 for i in layers) else _student_key(cfg, target_path, layers)


def public_pool(cfg: PipelineConfig):
    """The public dataset in the pipeline's order: the transfer's training examples, then its held-out ones, then
    the rest, which no stage sees."""
    from ..assets import load_text_dataset

    return load_text_dataset(cfg.public_dataset, split=cfg.public_split).shuffle(seed=cfg.seed)


def public_splits(cfg: PipelineConfig):
    public = public_pool(cfg)
    n_train, n_eval = cfg.num_public_examples, cfg.num_public_eval_examples
    if len(public) < n_train + n_eval:
        raise ValueError(f"The public dataset has {len(public)} examples, fewer than num_public_examples + "
                         f"num_public_eval_examples = {n_train + n_eval}; lower them.")
    return public.select(range(n_train)), public.select(range(n_train, n_train + n_eval))


def _texts(dataset, column: str) -> list:
    # One slice, not row by row: iterating a `datasets` column formats each row separately (10x slower here).
    return dataset.select_columns([column])[:][column]


def check_private_data_separation(cfg: PipelineConfig) -> dict:
    """Refuse public transfer or distillation texts that are texts of the private dataset; returns the overlaps.

    Measured after `assets.normalize_text`, against every split of the private dataset (all of them are the user's;
    a split `PUBLIC_SPLITS_OF_PRIVATE_DATASETS` designates as public excepted): the share of the public transfer
    texts (the ``num_public_examples + num_public_eval_examples`` the transfer trains and picks α on) and of a
    uniform sample of up to `DISTILL_OVERLAP_SAMPLE` distillation texts (when the student is distilled here). A
    share above ``cfg.max_private_overlap`` raises a ValueError naming both datasets. `PipelineConfig` already
    refused the same dataset by name; this catches the same sentences under another name.

    It reads the private data, so only the user runs it: in a deployment the provider never holds that data, and the
    user checks the public sets the provider names before handing a prompt over. `run_pipeline` plays every actor
    in one process and runs it before any stage.
    """
    from ..assets import load_text_dataset
    from ..data_overlap import measure_overlap, sample_indices, text_keys

    start = time.perf_counter()
    result: dict = {"max_private_overlap": cfg.max_private_overlap, "private_dataset": cfg.private_dataset}
    if cfg.max_private_overlap >= 1:
        return {**result, "checked": False}
    exempt = PUBLIC_SPLITS_OF_PRIVATE_DATASETS.get(cfg.private_dataset)
    private = private_splits(cfg)
    splits = [name for name, ds in private.items() if name != exempt and cfg.text_column in ds.column_names]
    if not splits:
        raise ValueError(f"`private_dataset` {cfg.private_dataset!r} has no split with the text column "
                         f"{cfg.text_column!r}; set `text_column`.")
    keys = text_keys(t for name in splits for t in _texts(private[name], cfg.text_column))
    result["private_splits"] = splits
    fix = ("Use public data the private data is not drawn from, or drop the private texts from it first "
           "(`peft_post.assets.remove_overlap`); raise `max_private_overlap` only for texts that are public anyway.")

    public_train, public_eval = public_splits(cfg)
    public = measure_overlap(_texts(public_train, cfg.text_column) + _texts(public_eval, cfg.text_column), keys)
    result["public"] = {"dataset": cfg.public_dataset, "split": cfg.public_split, **public.to_dict()}
    if public.fraction > cfg.max_private_overlap:
        raise ValueError(
            f"{public.fraction:.1%} of the public transfer texts ({public.num_private} of {public.num_texts}: the "
            f"examples the transfer trains and picks α on) of `public_dataset` {cfg.public_dataset!r} (split "
            f"{cfg.public_split!r}) are texts of `private_dataset` {cfg.private_dataset!r}, above "
            f"`max_private_overlap` = {cfg.max_private_overlap:g}. The provider would train on private data without "
            f"any privacy protection. {fix}")
    if cfg.student_model is None:
        distill = load_text_dataset(cfg.distill_dataset, split=cfg.distill_split)
        sample = distill.select(sample_indices(len(distill), DISTILL_OVERLAP_SAMPLE, cfg.seed))
        measured = measure_overlap(_texts(sample, cfg.text_column), keys)
        result["distill"] = {"dataset": cfg.distill_dataset, "split": cfg.distill_split, "size": len(distill),
                             **measured.to_dict()}
        if measured.fraction > cfg.max_private_overlap:
            embedded = cfg.private_dataset.startswith(EMBEDDED_PREFIX)
            split = DISTILLATION_SPLITS_WITHOUT.get(cfg.private_dataset[len(EMBEDDED_PREFIX):]) if embedded else None
            hint = (f" (its {split!r} split leaves the texts of {cfg.private_dataset} out)"
                    if cfg.distill_dataset == DEFAULT_DISTILLATION_DATASET and split and cfg.distill_split != split
                    else "")
            raise ValueError(
                f"{measured.fraction:.1%} of a sample of the distillation texts ({measured.num_private} of "
                f"{measured.num_texts}) of `distill_dataset` {cfg.distill_dataset!r} (split {cfg.distill_split!r})"
                f"{hint} are texts of `private_dataset` {cfg.private_dataset!r}, above `max_private_overlap` = "
                f"{cfg.max_private_overlap:g}. The student would be distilled on private data without any privacy "
                f"protection and handed to every user. {fix}")
    return {**result, "checked": True, "seconds": time.perf_counter() - start}


def evaluation_key(cfg: PipelineConfig, target_path: str, method: str, student_path: Optional[str] = None,
                   test_sha256: Optional[str] = None) -> str:
    """Everything a test-split score depends on besides the prompt it scores (`adapter_fingerprint`), hashed:
    `test_sha256` is the `labelled_data_digest` of the examples scored, so data rebuilt in place is scored again."""
    spec = {"method": method, "target": _model_id(target_path), "data": cfg.private_dataset,
            "split": cfg.private_test_split, "n": cfg.max_test_examples, "seed": cfg.seed,
            "template": cfg.template, "labels": cfg.label_word_lists(), "columns": [cfg.text_column, cfg.label_column]}
    if test_sha256 is not None:
        spec["test_data"] = test_sha256
    if cfg.task_kind != "classification":  # a generation score: what is generated, and how long it may be
        spec.update(task_kind=cfg.task_kind, answer_column=cfg.answer_column,
                    max_answer_tokens=cfg.max_answer_tokens)
    if cfg.private_test_size is not None:  # a test split cut from the training split (keeps the other keys)
        spec["test_size"] = cfg.private_test_size
    if student_path is not None:  # methods that run the student
        spec["student"] = _model_id(student_path)
    spec.update(precision_settings(cfg, "evaluate"))
    return _spec_key(spec)


# What a cached test score must hold to be reused: the per-example results feed the report's paired bootstrap.
EVALUATION_REQUIRED_KEYS = ("accuracy", "per_example_correct")


def _scores_path(run_dir: str) -> str:
    return os.path.join(run_dir, PRIVATE_DIR, SCORES_FILE)


def _read_scores(run_dir: str) -> dict:
    path = _scores_path(run_dir)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cached_evaluation(run_dir: str, prompt: Optional[str], key: str, compute,
                      required: tuple = EVALUATION_REQUIRED_KEYS) -> dict:
    """``compute()``, cached in the run's private workspace under the fingerprint of the prompt it scores (`prompt`,
    its folder; None for the bare target) and `key`.

    Private test scores are the user's: they never go into a prompt folder, which is handed to the provider. Keyed
    by the prompt's content, a stage reused in this run folder, or copied in with `copy_stage`, is not scored twice,
    and a score never outlives the prompt it was measured on. A cached score without one of the `required` keys was
    written by an older version and is computed again (a score without per-example results would give the report
    no interval).
    """
    fingerprint = NO_PROMPT if prompt is None else adapter_fingerprint(prompt)
    cached = _read_scores(run_dir)
    entry = cached.get(fingerprint, {}).get(key)
    if not isinstance(entry, dict) or any(k not in entry for k in required):
        cached.setdefault(fingerprint, {})[key] = compute()
        atomic_write_json(_scores_path(run_dir), cached)
    return cached[fingerprint][key]


def copy_stage(source_run: str, run_dir: str, name: str) -> bool:
    """Copy finished stage `name` ('tune', 'transfer', 'full_tuning') of run folder `source_run` into `run_dir`:
    its folder, its private record (user stages) and the cached private test scores of its prompt, so `run_dir`
    reuses the stage and its scores (an α sweep over one source prompt). Returns False, copying nothing, when
    `source_run` has not finished the stage. Both run folders must be the user's: this copies private files.
    """
    if stage_record(source_run, name) is None:
        return False
    folder = os.path.join(run_dir, STAGE_FOLDERS[name])
    source = os.path.join(source_run, STAGE_FOLDERS[name])
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    shutil.copytree(source, folder)
    if name in USER_STAGES:  # last: until the record is there, the copied folder counts as unfinished
        os.makedirs(private_workspace(folder), exist_ok=True)
        shutil.copyfile(private_record_path(source, name), private_record_path(folder, name))
    fingerprint = adapter_fingerprint(folder)
    theirs = _read_scores(source_run).get(fingerprint)
    if theirs:
        ours = _read_scores(run_dir)
        ours[fingerprint] = {**ours.get(fingerprint, {}), **theirs}
        atomic_write_json(_scores_path(run_dir), ours)
    return True


# ------------------------------------------------------------------------- reuse: the settings and outputs of a stage
# A finished stage is reused only when it was made with this run's settings and its outputs are the bytes it wrote.
# Its record holds the settings that shape it (`stage_settings`: PipelineConfig fields by name, and digests of the
# data or prompt it was made from), their hash (`settings_key`) and the sha256 of each output file (`outputs`).
# Records written before these existed hold neither and are reused as they are.

# Written into a running stage's checkpoint folder: the settings its checkpoints were made with.
SETTINGS_FILE = "settings.json"
# Outputs up to this size are hashed on every reuse (an adapter: a few kB). Larger ones (the student's weights: 170 MB
# for the default student, 0.27 s to hash on 2 cores; 540 MB for the whole 135M model, 0.7-0.9 s) are checked by
# size and modification time, and hashed only when the modification time changed since they were written.
FULL_HASH_MAX_BYTES = 16 << 20
# Fields that shape no stage's output: changing them never refuses a finished stage.
UNKEYED_FIELDS = frozenset({"run_dir", "preset", "full_baseline", "max_private_overlap", "eval_batch_size",
                            "save_steps", "overwrite", "threads", "gradient_checkpointing",
                            "dp_max_physical_batch_size"})
# `device`, `dtype`, `device_map` and `quantization` are keyed as resolved (`precision_settings`), not as given:
# "auto" means another dtype on another machine. Settings added after records were first keyed are left out at their
# default (the value every older record was made with), so those records keep their keys.
OMITTED_AT_DEFAULT = {"dtype": "float32", "quantization": None, "transfer_alpha_method": "heuristic",
                      "transfer_eval_steps": None, "transfer_early_stopping_patience": None,
                      "task_kind": "classification", "answer_column": "answer", "max_answer_tokens": 16,
                      "transfer_continuation": "source_greedy", "dp_class_weights": None}
_TASK = ("template", "label_words", "num_virtual_tokens", "prompt_init_text", "text_column", "label_column",
         "task_kind", "answer_column", "max_answer_tokens")
_STUDENT = ("target_model", "student_layers", "distill_dataset", "distill_split", "distill_max_steps",
            "distill_learning_rate", "distill_batch_size", "distill_block_size", "distill_templated_fraction",
            "distill_label_slot_weight", "distill_freeze_embeddings", "template", "text_column", "seed")
_TUNE = ("private_dataset", "private_train_split", "private_test_size", "max_train_examples", "tune_max_steps",
         "tune_learning_rate", "tune_batch_size", "seed")
# Settings a stage once keyed under another name: a full_tuning record made before the baseline had its own recipe
# holds it as `tune_*` (the values it was tuned with), read as the `full_tuning_*` entries now keyed.
LEGACY_SETTING_NAMES = {"full_tuning": {tune: full for full, tune in FULL_TUNING_FALLBACKS.items()}}
_DP = ("dp_target_epsilon", "dp_target_delta", "dp_max_grad_norm", "dp_accountant", "dp_class_weights")
_TRANSFER = ("public_dataset", "public_split", "num_public_examples", "num_public_eval_examples", "transfer_max_steps",
             "transfer_learning_rate", "transfer_batch_size", "transfer_alpha", "transfer_temperature",
             "transfer_cache_top_k", "transfer_alpha_method", "transfer_eval_steps", "transfer_continuation",
             "transfer_early_stopping_patience", "target_model", "seed")
_EVALUATE = ("private_dataset", "private_test_split", "private_test_size", "max_test_examples", "target_model", "seed")
# Settings entries that are digests, not fields, and what they digest (for the refusal's wording).
DIGESTS = {"private_train_data_sha256": "the private training data (its texts and labels)",
           "private_test_data_sha256": "the private test data (its texts and labels)",
           "source_prompt_sha256": "the source prompt it was transferred from (source_prompt/)"}


class SettingsChanged(ValueError):
    """A finished (or interrupted) stage was made with other settings than this run's."""


class OutputChanged(ValueError):
    """A finished stage's output file is missing, truncated or altered."""


def _field_values(cfg: PipelineConfig, names) -> dict:
    import dataclasses

    types = {f.name: str(f.type) for f in dataclasses.fields(cfg)}
    values = {}
    for name in names:
        if name == "student_layers":
            value = resolved_student_layers(cfg)  # as `student_cache_key` hashes them: absolute indices
        elif name == "label_words":
            value = cfg.label_word_lists()
        elif name == "dp_class_weights":
            value = cfg.dp_config().class_weights  # parsed: '1|0.5' and '1.0|0.50' are the same mechanism
        else:
            value = cfg.full_tuning_value(name) if name in FULL_TUNING_FALLBACKS else getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and "float" in types.get(name, ""):
                value = float(value)  # `8` and `8.0` make the same stage
        values[name] = value
    return values


def labelled_data_digest(dataset, text_column: str, label_column: str) -> str:
    """sha256 of a dataset's texts and labels (or answers), in order: what a stage trained or was scored on, without
    the data."""
    columns = [c for c in (text_column, label_column) if c in dataset.column_names]
    rows = dataset.select_columns(columns)[:]
    return hashlib.sha256(json.dumps([rows[c] for c in columns], default=str).encode()).hexdigest()


def precision_settings(cfg: PipelineConfig, stage: str) -> dict:
    """The precision entries of `stage`'s settings: the compute dtype when it is not float32, and the target's
    quantization for the stages that run the target. A bf16 forward rounds, so a stage made in one precision is not
    reused in another. Nothing for float32 without quantization, so keys written before precision was an option
    stay valid; the device is not keyed (one dtype computes the same recipe on a CPU and a GPU)."""
    precision = cfg.precision()
    settings = {}
    if precision.dtype != "float32":
        settings["dtype"] = precision.dtype
    if precision.quantization is not None and stage in ("transfer", "full_tuning", "evaluate"):
        settings["quantization"] = precision.quantization
    return settings


def stage_settings(cfg: PipelineConfig, stage: str, data_sha256: Optional[str] = None,
                   source_prompt_sha256: Optional[str] = None) -> dict:
    """The settings that shape `stage`'s output, by PipelineConfig field name (`UNKEYED_FIELDS` never count), and
    the resolved precision (`precision_settings`).

    distill: the student's fields (what `student_cache_key` hashes). tune: the private training data (its name,
    split, cap, and `data_sha256`, the digest of the examples it trains on), the task, the prompt, `tune_*`, `dp`
    and, under DP, `dp_*`, the seed and the student. full_tuning: the same on the target, without DP, with
    `full_tuning_*` (resolved: `tune_*` where unset) in place of `tune_*`. transfer: the
    public data, `transfer_*`, the task, the target, the student and the source prompt's fingerprint (what the
    provider is handed: it stands for every setting of tune, whose private data digest the provider never sees).
    evaluate: the private test data (`data_sha256` of the examples scored), the task, the target and the student.

    A distilled student is its recipe (`student_cache_key`'s fields: distillation is seeded); a ready
    `student_model` is its name and, for a local folder, the digest of its files (`model_files_sha256`), so a folder
    replaced in place by another model is not taken for the one a prompt was tuned on.
    """
    settings = _recipe_settings(cfg, stage, data_sha256, source_prompt_sha256)
    # A field added after settings were first keyed is left out at its default (see `OMITTED_AT_DEFAULT`).
    settings = {name: value for name, value in settings.items()
                if name not in OMITTED_AT_DEFAULT or value != OMITTED_AT_DEFAULT[name]}
    return {**settings, **precision_settings(cfg, stage)}


def _recipe_settings(cfg: PipelineConfig, stage: str, data_sha256: Optional[str],
                     source_prompt_sha256: Optional[str]) -> dict:
    if cfg.student_model is not None:
        from ..assets import resolve_model

        student = {**_field_values(cfg, ("student_model", "target_model")),
                   "student_model_sha256": model_files_sha256(resolve_model(cfg.student_model))}
    else:
        student = _field_values(cfg, _STUDENT)
    if stage == "distill":
        return _field_values(cfg, _STUDENT)
    if stage == "full_tuning":
        # Its own recipe, resolved (`full_tuning_value`), in place of the user's `tune_*` steps, rate and batch.
        shared = tuple(name for name in _TUNE if name not in FULL_TUNING_FALLBACKS.values())
        return {**_field_values(cfg, shared + tuple(FULL_TUNING_FALLBACKS) + _TASK),
                "private_train_data_sha256": data_sha256, "target_model": cfg.target_model}
    if stage == "tune":
        settings = {**_field_values(cfg, _TUNE + _TASK), "private_train_data_sha256": data_sha256}
        settings.update(student, dp=cfg.dp)
        return {**settings, **(_field_values(cfg, _DP) if cfg.dp else {})}
    if stage == "transfer":
        return {**_field_values(cfg, _TRANSFER + _TASK), **student, "source_prompt_sha256": source_prompt_sha256}
    if stage == "evaluate":
        return {**_field_values(cfg, _EVALUATE + _TASK), **student, "private_test_data_sha256": data_sha256}
    raise ValueError(f"`stage` must be one of {sorted(STAGE_DEPENDANTS)}, got {stage!r}.")


def model_files_sha256(path: str) -> Optional[str]:
    """A digest of a local model folder's config and weight files (None for a Hub id). Cached per process by the
    files' sizes and modification times: hashing a 135M-parameter model takes about a second."""
    if not os.path.isdir(path):
        return None
    files = tuple((name, os.stat(os.path.join(path, name)).st_size, os.stat(os.path.join(path, name)).st_mtime_ns)
                  for name in sorted(os.listdir(path))
                  if name == "config.json" or name.endswith((".safetensors", ".bin")))
    return _model_files_sha256(path, files)


@functools.lru_cache(maxsize=8)
def _model_files_sha256(path: str, files: tuple) -> str:
    from ..assets import sha256_file

    return _spec_key({name: sha256_file(os.path.join(path, name)) for name, _, _ in files})


def settings_key(settings: dict) -> str:
    return _spec_key(settings)


def settings_record(settings: Optional[dict]) -> dict:
    """The entries a stage record gets for `settings` (none when the caller gave none)."""
    return {} if settings is None else {"settings": settings, "settings_key": settings_key(settings)}


def _shown(value) -> str:
    return "(not set)" if value is _ABSENT else repr(value)


_ABSENT = object()


def overwrite_hint(stage: str) -> str:
    after = STAGE_DEPENDANTS.get(stage, ())
    also = f" (and what depends on it: {', '.join(after)})" if after else ""
    return f"--overwrite {stage} to discard it{also} and run it again"


def check_settings(stage: str, record: dict, settings: dict, where: str) -> None:
    """Refuse, with a `SettingsChanged` naming the fields that differ, a record made with other settings. A record
    without a settings key (made before keys existed) is accepted."""
    key = record.get("settings_key")
    if key is None or key == settings_key(settings) or _same_layers_written_from_the_top(record, settings):
        return
    old = _renamed_legacy_settings(stage, record.get("settings") or {})
    if old != record.get("settings") and settings_key(old) == settings_key(settings):
        return
    changes = []
    for name in sorted(set(old) | set(settings)):
        # Entries left out at their defaults (`OMITTED_AT_DEFAULT`): show what that meant.
        default = OMITTED_AT_DEFAULT.get(name, _ABSENT)
        before, now = old.get(name, default), settings.get(name, default)
        if before == now:
            continue
        if name in DIGESTS:
            changes.append(f"{DIGESTS[name]} changed")
        else:
            changes.append(f"--{name} {_shown(before)} then, {_shown(now)} now")
    raise SettingsChanged(
        f"The {stage} stage in {where} was made with other settings than this run's: "
        f"{'; '.join(changes) or 'its settings key differs'}. Reusing it would mix two configurations in one "
        f"report. Give this run a new --run_dir, or pass {overwrite_hint(stage)}.")


def _renamed_legacy_settings(stage: str, settings: dict) -> dict:
    """`settings` of a `stage` record with the entries it keyed under an older name (`LEGACY_SETTING_NAMES`) renamed,
    where the record has no entry of the new name."""
    renames = {old: new for old, new in LEGACY_SETTING_NAMES.get(stage, {}).items()
               if old in settings and new not in settings}
    return {renames.get(name, name): value for name, value in settings.items()}


def _same_layers_written_from_the_top(record: dict, settings: dict) -> bool:
    """A record written before settings held `student_layers` resolved holds them as written (``[0, -1]``): it is
    this run's when they resolve to this run's layers on this run's target and nothing else differs."""
    from ..assets import resolve_model
    from ..distill.student import normalize_layer_indices

    old = (record.get("settings") or {}).get("student_layers")
    now = settings.get("student_layers")
    if not isinstance(old, list) or not old or all(isinstance(i, int) and i >= 0 for i in old) or \
            "target_model" not in settings or old == now:
        return False
    if settings_key({**record["settings"], "student_layers": now}) != settings_key(settings):
        return False
    try:
        return normalize_layer_indices(old, target_num_layers(resolve_model(settings["target_model"]))) == now
    except ValueError:
        return False


def check_partial_settings(checkpoints: str, stage: str, settings: Optional[dict], claim: bool = False) -> None:
    """An interrupted stage resumes from `checkpoints` only under the settings they were made with: refuse others
    (`check_settings`). With `claim`, record `settings` there when nothing is recorded yet (a stage starting)."""
    if settings is None:
        return
    path = os.path.join(checkpoints, SETTINGS_FILE)
    if os.path.isfile(path):
        check_settings(stage, read_record(path), settings, f"{checkpoints} (its checkpoints)")
    elif claim:
        os.makedirs(checkpoints, exist_ok=True)
        atomic_write_json(path, settings_record(settings))


def output_digests(folder: str) -> dict:
    """{file name: sha256, size and modification time} of every file directly in `folder` but `STAGE_FILE`."""
    from ..assets import sha256_file

    digests = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == STAGE_FILE or not os.path.isfile(path):
            continue
        stat = os.stat(path)
        digests[name] = {"sha256": sha256_file(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return digests


def verify_outputs(folder: str, record: dict, stage: str, fix: Optional[str] = None) -> None:
    """Refuse, with an `OutputChanged` naming the file, a stage whose outputs are not the bytes its record lists
    (`FULL_HASH_MAX_BYTES` says which files are hashed again). A record without digests is accepted."""
    from ..assets import sha256_file

    # A user stage's record lives in the private workspace, so deleting its folder alone would not make it again.
    fix = fix or (f"Pass {overwrite_hint(stage)}." if stage in USER_STAGES else
                  f"Pass {overwrite_hint(stage)}, or delete {folder} to make it again.")
    for name, want in sorted((record.get("outputs") or {}).items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problem = "is missing"
        else:
            stat = os.stat(path)
            if stat.st_size != want["size"]:
                problem = f"has {stat.st_size} bytes where the stage wrote {want['size']} (truncated or altered)"
            elif stat.st_size > FULL_HASH_MAX_BYTES and stat.st_mtime_ns == want["mtime_ns"]:
                continue
            elif sha256_file(path) != want["sha256"]:
                problem = "is not the file the stage wrote (its sha256 differs)"
            else:
                continue
        raise OutputChanged(f"{path} {problem}: the {stage} stage's output is damaged. {fix}")


def discard_stage(run_dir: str, stage: str, student: Optional[str] = None, scores: bool = False) -> None:
    """Delete what `stage` made in `run_dir` (its folder, record and checkpoints; for 'evaluate' the evaluation,
    and with `scores` the cached private test scores), so the next run makes it again. 'distill' deletes the student
    at `student` (the shared cache entry, under its lock)."""
    paths = []
    if stage == "distill":
        if student is not None:
            with student_cache_lock(student):
                for path in (student, student + ".partial"):
                    shutil.rmtree(path, ignore_errors=True)
        return
    if stage == "evaluate":
        paths = [os.path.join(run_dir, "evaluation.json")] + ([_scores_path(run_dir)] if scores else [])
    else:
        folder = os.path.join(run_dir, STAGE_FOLDERS[stage])
        paths = [folder, folder + ".partial"]
        if stage in USER_STAGES:
            paths += [private_record_path(folder, stage), user_stage_workspace(folder, stage)]
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
