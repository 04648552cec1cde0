"""The whole POST pipeline: distil (provider, cached), tune (user, optionally DP), transfer (provider), evaluate.

Each stage writes one folder under the run directory. The provider's stages (distill, transfer) finish by writing
``stage.json`` into theirs atomically. The user's stages (tune, and the full-tuning baseline) read the private
training split: their folder is what the user hands over, so it holds exactly the adapter and its DP ledger
(`RELEASED_FILES`), and their record (losses, N, wall time, memory), their checkpoints and every private test score
stay in the run's private workspace, ``<run_dir>/private/``. A finished stage is skipped on the next run, and an
interrupted one resumes from its last complete Trainer checkpoint before the final step. The distilled student is the provider's one-time cost: it
lives in the shared cache (``$PEFT_POST_CACHE/students/<key>``), keyed by everything that determines it, and is
reused by later runs.

Data flow respects the actors: the tuning stage is the only one that reads the private training split; the
transfer stage reads the source prompt and public data only; the private test split is read once, by the final
evaluation, and nothing is ever selected on it. Before any stage, public or distillation data that is the private
data is refused: by name in `PipelineConfig`, by measured text overlap in `check_private_data_separation`.

The package, by job; a module imports only modules after it in this list (docs/architecture.md):

- `runner`: `run_pipeline`, the stage order (`STAGES`), the reuse check (settings keys, output digests,
  `--overwrite`) and the report;
- `preflight`: everything the tokenizers, model configs and data files can tell, checked before any model loads;
- `stages`: the stage functions on models and datasets (`distill_student`, `tune_prompt`, `transfer_prompt`,
  `score_methods`), and the stages by name and path above them (`distill_stage`, `tune_stage`, `transfer_stage`,
  `evaluate_stage`);
- `checkpoints`: which Trainer checkpoint a stage resumes from, and the check that it is intact;
- `loading`: models, tokenizers and prompted models by path (`load_model`, `load_tokenizer`, `load_prompted_model`,
  `new_prompted_model`);
- `store`: the run folder, the private workspace, the cache keys, the settings keys and output digests, the public
  splits and the private-data check;
- `data`: the private splits, read the same way by every stage (`private_split`);
- `config`: `PipelineConfig` (which builds every stage config) and its `PRESETS`;
- `processes`: the processes of one job under `accelerate launch`: the main one writes (`on_main_process`), the
  batch sizes are global (`per_process_batch`).
"""

from .config import (CONFIG_FILE, FULL_TUNING_FALLBACKS, PRESETS, PUBLIC_SPLITS_OF_PRIVATE_DATASETS, RENAMED_FIELDS,
                     PipelineConfig, parse_overrides, rename_legacy_fields, rename_legacy_flags)
from .data import private_examples, private_split, private_splits
from .preflight import preflight
from .loading import load_model, load_prompted_model, load_tokenizer, new_prompted_model, random_subset
from .runner import STAGES, StageMissing, run_pipeline
from .checkpoints import check_checkpoints, checkpoint_step, resumable_checkpoint, resume_checkpoint
from .stages import (distill_stage, distill_student, evaluate_stage, score_methods, transfer_prompt,
                     transfer_stage, tune_prompt, tune_stage)
from .processes import is_main_process, launched_world_size, on_main_process, per_process_batch
from .store import (ADAPTER_WEIGHTS, DISTILL_OVERLAP_SAMPLE, LOCK_FILE, NO_PROMPT, PRIVATE_DIR, RELEASED_FILES,
                    SCORES_FILE, STAGE_FILE, STAGE_FOLDERS, USER_STAGES, adapter_fingerprint,
                    check_private_data_separation, copy_stage, private_record_path, private_stage_done,
                    private_workspace, public_pool, public_splits, run_folder_lock, RunFolderBusy, stage_done,
                    stage_record, student_cache_key, student_cache_lock, student_folder)

__all__ = [
    "CONFIG_FILE",
    "FULL_TUNING_FALLBACKS",
    "distill_student",
    "check_checkpoints",
    "resumable_checkpoint",
    "checkpoint_step",
    "resume_checkpoint",
    "new_prompted_model",
    "parse_overrides",
    "RENAMED_FIELDS",
    "rename_legacy_fields",
    "rename_legacy_flags",
    "score_methods",
    "transfer_prompt",
    "tune_prompt",
    "LOCK_FILE",
    "RunFolderBusy",
    "run_folder_lock",
    "student_cache_lock",
    "ADAPTER_WEIGHTS",
    "adapter_fingerprint",
    "check_private_data_separation",
    "copy_stage",
    "DISTILL_OVERLAP_SAMPLE",
    "distill_stage",
    "evaluate_stage",
    "load_model",
    "load_prompted_model",
    "load_tokenizer",
    "NO_PROMPT",
    "PipelineConfig",
    "preflight",
    "private_examples",
    "private_split",
    "private_splits",
    "PRESETS",
    "PRIVATE_DIR",
    "private_record_path",
    "private_stage_done",
    "private_workspace",
    "public_pool",
    "public_splits",
    "PUBLIC_SPLITS_OF_PRIVATE_DATASETS",
    "random_subset",
    "RELEASED_FILES",
    "run_pipeline",
    "SCORES_FILE",
    "STAGE_FILE",
    "STAGE_FOLDERS",
    "stage_done",
    "stage_record",
    "StageMissing",
    "STAGES",
    "student_cache_key",
    "student_folder",
    "transfer_stage",
    "tune_stage",
    "USER_STAGES",
    "is_main_process",
    "launched_world_size",
    "on_main_process",
    "per_process_batch",
]
