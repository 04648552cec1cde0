"""Worker of tests/test_multiprocess.py's FSDP2 test: `DistillationTrainer` with the student sharded by FSDP2.

``accelerate launch --use_fsdp --fsdp_version 2 ... tests/_fsdp_worker.py WORKDIR OUT`` distils the tiny teacher that
`test_multiprocess.py` prepared into a 2-layer student, global batch 4, saves it with ``trainer.save_model(OUT/
saved)`` on every process (the gathering collective) and writes ``OUT/info-<rank>.json``: the distributed type, whether
the student's weights were sharded, the logged loss terms.

accelerate (1.16) runs FSDP on accelerator devices only: on a CPU launch it drops the FSDP plugin and runs DDP. So
that the FSDP2 path of our trainer runs here, on gloo, `_force_fsdp2_on_cpu` re-applies the plugin the way accelerate
does on a GPU (state.py); torch's FSDP2 (`fully_shard`) itself runs on CPU tensors. A test harness only: the library
never does this, it warns instead (`modeling.require_data_parallel`). With ``FSDP_WORKER_DEVICE=cuda`` it trains on the
GPUs through accelerate's own FSDP2 path, untouched (`benchmarks/gpu_check.sh`).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset


def _force_fsdp2_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does for a GPU: a later AcceleratorState() reads the type from the shared PartialState.
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def main(workdir: str, out: str) -> None:
    on_cpu = os.environ.get("FSDP_WORKER_DEVICE", "cpu") == "cpu"
    if on_cpu:
        _force_fsdp2_on_cpu()
    import _mp_worker
    from peft_post import DistillationConfig, DistillationTrainer, make_student
    from peft_post.distill import prepare_distillation_dataset
    from peft_post.modeling import label_logits
    from peft_post.testing import tiny_corpus

    tokenizer = _mp_worker.tokenizer_in(workdir)
    teacher = _mp_worker.causal_lm_in(workdir, "teacher")
    student = make_student(teacher, [0, 3])
    blocks = prepare_distillation_dataset(Dataset.from_dict({"text": tiny_corpus()[:16]}), tokenizer, 16)
    blocks = blocks.filter(lambda row: len(row["input_ids"]) == 16)
    args = DistillationConfig(os.path.join(out, "distill"), learning_rate=0.5, block_size=16,
                              per_device_train_batch_size=4 // int(os.environ["WORLD_SIZE"]),
                              **{**_mp_worker.COMMON, "use_cpu": on_cpu})
    trainer = DistillationTrainer(student, teacher, args, train_dataset=blocks, processing_class=tokenizer)
    trainer.train()
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    # The label-slot forward, which calls the model's parts itself, on the sharded student (every process, as the
    # pipeline scores the student's public zero-shot accuracy right after distilling it).
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    positions = torch.tensor([5, 4])
    with torch.no_grad():
        logits = label_logits(student, ids.to(trainer.args.device), mask.to(trainer.args.device),
                              positions.to(trainer.args.device), prompt=None)
    torch.save({"ids": ids, "mask": mask, "positions": positions, "logits": logits.cpu()},
               os.path.join(out, f"logits-{os.environ['RANK']}.pt"))
    trainer.save_model(os.path.join(out, "saved"))
    logged = next(h for h in trainer.state.log_history if "loss_kl" in h)
    rank = int(os.environ["RANK"])
    info = {"distributed_type": trainer.accelerator.distributed_type.name, "is_fsdp2": trainer.accelerator.is_fsdp2,
            "sharded": sharded, "log": {k: logged[k] for k in ("loss", "loss_kl", "loss_lm", "loss_cos")}}
    with open(os.path.join(out, f"info-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(*sys.argv[1:3])
