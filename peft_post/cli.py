"""`peft-post`: the POST pipeline from the command line. It parses arguments and calls the library, nothing else.

    peft-post run                     # every stage on the embedded default (SmolLM2 + TREC answer types), DP ε=8
    peft-post run --preset rotten_tomatoes   # the paper's sentiment task
    peft-post run --preset quick      # a first look in a few minutes (Rotten Tomatoes, tiny budgets)
    peft-post run --config run.yaml --dp false --transfer_alpha 0.5
    peft-post tune --run_dir runs/post  # one stage; earlier run-folder stages must be done
    peft-post audit --preset rotten_tomatoes --dp false --tune_max_steps 60   # LiRA audit of the tuning recipe
    peft-post audit-dp --trials 32                    # DP audit: an empirical lower bound on ε (canary runs)
    peft-post push --adapter runs/post/transferred_prompt --repo_id me/my-prompt --base_model org/model
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from .audit import AuditConfig
from .dp_audit import DPAuditConfig
from .pipeline import (STAGES, PipelineConfig, is_main_process, launched_world_size, rename_legacy_fields,
                       rename_legacy_flags, run_pipeline)

COMMANDS = ("run",) + STAGES + ("audit", "audit-dp", "push")
HELP = {
    "run": "Run every stage in order (skipping finished ones) and write the report.",
    "distill": "Stage 1 (provider): distil the student from the target, cached for later runs.",
    "tune": "Stage 2 (user): tune p_s on the student with the private training split (--dp for DP).",
    "transfer": "Stage 3 (provider): transfer p_s to the target with public data only.",
    "full_tuning": "Baseline: tune a prompt directly on the target (needs --full_baseline).",
    "evaluate": "Score every method on the private test split and write report.json/md/png.",
    "audit": "Membership-inference audit (LiRA) of p_s tuned on the student with this recipe: AUC, TPR at low FPR.",
    "audit-dp": "DP audit: train many prompts with and without a canary, bound ε from below (Clopper-Pearson).",
    "push": "Upload a transferred prompt with an honest model card to the Hub.",
}


@dataclass
class PushArguments:
    adapter: str = field(metadata={"help": "Folder of the prompt to upload (e.g. runs/post/transferred_prompt)."})
    repo_id: str = field(metadata={"help": "Hub repo to create or update, e.g. 'me/post-sst2-prompt'."})
    base_model: Optional[str] = field(
        default=None, metadata={"help": "Hub id of the base model, when the adapter was built on a local folder."}
    )
    report: Optional[str] = field(
        default=None, metadata={"help": "report.json of the run, to put its evaluation table in the card."}
    )
    private: bool = field(default=True, metadata={"help": "Create the repo private (default)."})
    token: Optional[str] = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN, else the one saved by `hf auth login`)."}
    )
    license: Optional[str] = field(default=None, metadata={"help": "License id for the card, e.g. 'apache-2.0'."})
    datasets: Optional[list[str]] = field(
        default=None, metadata={"help": "Hub ids of the public data sets to list in the card's metadata."}
    )


def _parse(dataclass_type, argv: list[str], prog: str):
    """Parse `argv` into `dataclass_type`, or into each of a tuple of dataclass types (returning a tuple)."""
    types = dataclass_type if isinstance(dataclass_type, tuple) else (dataclass_type,)
    if PipelineConfig in types:
        argv = rename_legacy_flags(argv)
    # No abbreviations: `--tune_max_step 3` must be an error, not a silent `--tune_max_steps 3`.
    parser = HfArgumentParser(types, prog=prog, description=HELP.get(prog.split()[-1]), allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML or JSON file of arguments; flags override it.")
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path.")
        config_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if config_path is not None:
        if not os.path.isfile(config_path):
            parser.error(f"--config file {config_path!r} does not exist.")
        values = _read_config_file(config_path, parser)
        if PipelineConfig in types:
            values = rename_legacy_fields(values)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {config_path} has unknown keys {unknown}.")
        parser.set_defaults(**values)
        for action in parser._actions:  # a required field given by the file is no longer required on the CLI
            if action.dest in values:
                action.required = False
    parsed = parser.parse_args_into_dataclasses(args=argv, args_filename=None, look_for_args_file=False)[:len(types)]
    return tuple(parsed) if isinstance(dataclass_type, tuple) else parsed[0]


def _read_config_file(path: str, parser) -> dict:
    """The flags a ``--config`` YAML or JSON file sets; a syntax error exits 2 naming the file and the line."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                values = yaml.safe_load(f)
            else:
                values = json.load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        parser.error(f"--config file {path!r}{where} is not valid YAML: {getattr(err, 'problem', None) or err}.")
    except json.JSONDecodeError as err:
        parser.error(f"--config file {path!r} line {err.lineno} is not valid JSON: {err.msg}.")
    except UnicodeDecodeError as err:
        parser.error(f"--config file {path!r} is not UTF-8 text ({err.reason}).")
    if values is None:
        return {}
    if not isinstance(values, dict):
        parser.error(f"--config file {path!r} must hold a mapping of flag names to values, not a "
                     f"{type(values).__name__}.")
    return values


def _check_run_dir(path: str) -> None:
    """A --run_dir this job can create and write, or a ValueError naming it (instead of an OSError's traceback)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--run_dir {path!r} is a file, not a folder; give a folder for the run.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest folder that exists: the run folder is created in it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--run_dir {path!r} cannot be created: {existing!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--run_dir {path!r} is not writable ({existing!r} is read-only for this user); give a "
                         "folder this job can write.")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: peft-post {" + ",".join(COMMANDS) + "} [--help] [--config FILE] [flags]\n")
        for name in COMMANDS:
            print(f"  {name:<12} {HELP[name]}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"peft-post: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    prog = f"peft-post {command}"
    _quiet_progress_bars()
    try:
        if command in ("push", "audit", "audit-dp") and launched_world_size() > 1:
            raise ValueError(f"`peft-post {command}` runs on one process: launch it with plain `python` or "
                             f"`peft-post`, not under `accelerate launch` or torchrun ({launched_world_size()} "
                             "processes); only `run` and the stage subcommands run as one job on several.")
        if command == "push":
            return _push(_parse(PushArguments, rest, prog))
        if command == "audit":
            parsed = _classification_only(_parse((PipelineConfig, AuditConfig), rest, prog), command)
            return _audit(*parsed, command=_command_line(command, rest))
        if command == "audit-dp":
            parsed = _classification_only(_parse((PipelineConfig, DPAuditConfig), rest, prog), command)
            return _audit_dp(*parsed, command=_command_line(command, rest))
        cfg = _parse(PipelineConfig, rest, prog)
        _check_run_dir(cfg.run_dir)
        results = run_pipeline(cfg, only=None if command == "run" else command,
                               command=_command_line(command, rest))
        prints_report = is_main_process()  # one report on the terminal, not one per process
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    if results is not None and prints_report:
        with open(os.path.join(cfg.run_dir, "report.md"), encoding="utf-8") as f:
            print(f.read())
    return 0


def _leave_process_group() -> None:
    """Under `accelerate launch`, leave the job's process group before exit: left to interpreter teardown, gloo's
    threads can abort a finished process (exit -6), failing a launch whose work is all done."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _quiet_progress_bars() -> None:
    """No progress bars of `datasets` and transformers (loading weights, downloads) in a log redirected to a file,
    where each redraw is another line; the stages' Trainer and evaluation bars follow the same rule
    (`evaluation.progress_bars_wanted`)."""
    from .evaluation import progress_bars_wanted

    if not progress_bars_wanted():
        import datasets
        from transformers.utils import logging

        datasets.disable_progress_bars()
        logging.disable_progress_bar()  # huggingface_hub's bars too


def _command_line(command: str, rest: list[str]) -> str:
    return " ".join(["peft-post", command, *map(shlex.quote, rest)])


def _classification_only(parsed: tuple, command: str) -> tuple:
    """The audits attack class scores: refuse a generation task before any work rather than fail inside one."""
    if parsed[0].task_kind != "classification":
        raise ValueError(f"`peft-post {command}` audits classification prompts (its attacks read class scores); "
                         "`--task_kind generation` is not supported by it yet.")
    return parsed


def _audit(cfg: PipelineConfig, audit: AuditConfig, command: str) -> int:
    from .audit import run_audit

    result = run_audit(cfg, audit, command=command)
    tpr = result["tpr_at_fpr"]["0.01"]
    print(f"LiRA membership inference on {'DP' if cfg.dp else 'non-private'} prompts "
          f"({result['num_shadows']} shadows x {result['num_examples']} examples = {result['num_pairs']} pairs)")
    tpr_text = "n/a (under 100 non-member pairs)" if tpr is None else f"{tpr:.3f}"
    interval = " (95%% interval %.3f-%.3f)" % tuple(result["auc_interval"]) if result["auc_interval"] else ""
    print(f"  AUC {result['auc']:.3f}{interval}   TPR@1%FPR {tpr_text}   loss-attack AUC {result['loss_attack']['auc']:.3f}")
    print(f"  shadow accuracy: train {result['shadow_train_accuracy']:.3f}, "
          f"held-out {result['shadow_test_accuracy']:.3f}")
    if result["privacy"]:
        print(f"  shadows' DP: epsilon {result['privacy']['epsilon']:.2f} at delta {result['privacy']['delta']:.2g}")
    return 0


def _audit_dp(cfg: PipelineConfig, audit: DPAuditConfig, command: str) -> int:
    from .dp_audit import run_dp_audit

    result = run_dp_audit(cfg, audit, command=command)
    claimed = result["claimed_epsilon"]
    print(f"DP audit ({audit.trials} runs per dataset and case, N = {result['num_examples']}, "
          f"{int(audit.confidence * 100)}% confidence); claimed epsilon {claimed}")
    for case, r in result["cases"].items():
        caught = isinstance(claimed, (int, float)) and r["epsilon_lb"] > claimed
        print(f"  {case:<12} epsilon_lb {r['epsilon_lb']:.3f} (at most {r['max_epsilon_lb']:.3f} with these runs) via "
              f"{r['bound']['statistic']}; ledger epsilon {r['claimed_epsilon']}"
              f"{'  -> REFUTES the claimed epsilon' if caught else ''}")
    print(f"  wrote {result['path']}")
    return 0


def _push(args: PushArguments) -> int:
    """Upload the adapter folder and its card: no model is loaded; no token exits 2 before any request."""
    from .hub import push_adapter_folder
    from .io import read_json_object

    evaluation = None
    if args.report is not None:
        if not os.path.isfile(args.report):
            raise ValueError(f"--report {args.report!r} is not a file; pass the report.json of the run.")
        report = read_json_object(args.report, "Pass the report.json of the run as --report.")
        accuracy = report.get("accuracy")
        if not isinstance(accuracy, dict):
            raise ValueError(f"--report {args.report!r} has no 'accuracy' table; pass the report.json of the run.")
        evaluation = {k: v for k, v in accuracy.items() if v is not None} or None
    try:
        info = push_adapter_folder(args.adapter, args.repo_id, private=args.private, token=args.token,
                                   evaluation=evaluation, base_model=args.base_model, license=args.license,
                                   datasets=args.datasets)
    except OSError as err:  # the Hub could not be reached or refused the upload (HfHubHTTPError is an OSError)
        print(f"peft-post push: error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {args.adapter} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
