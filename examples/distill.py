"""Distil a small student from a large causal LM on public text (POST stage 1, the provider's one-time cost).

Usage:
    python examples/distill.py --teacher embedded:smollm2-135m-instruct --keep_layers 0,1,2,3,-4,-3,-2,-1 \
        --dataset embedded:distillation_text --output_dir runs/student --max_steps 300 --learning_rate 1e-3

On several GPUs, with the student sharded by FSDP2 (docs/scaling.md):
    accelerate launch --config_file examples/accelerate/fsdp2_distill.yaml examples/distill.py ...
"""

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from peft_post import DistillationConfig, DistillationTrainer, make_student
from peft_post.assets import load_text_dataset, resolve_model


@dataclass
class ScriptArguments:
    teacher: str = field(default="embedded:smollm2-135m-instruct", metadata={"help": "Teacher (large) model."})
    keep_layers: str = field(default="0,1,2,3,-4,-3,-2,-1", metadata={"help": "Teacher layers the student keeps."})
    dataset: str = field(default="embedded:distillation_text", metadata={"help": "Public text dataset."})


def main():
    script, args = HfArgumentParser((ScriptArguments, DistillationConfig)).parse_args_into_dataclasses()
    path = resolve_model(script.teacher)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path)
    student = make_student(teacher, [int(i) for i in script.keep_layers.split(",")])
    text = load_text_dataset(script.dataset, split="train")
    trainer = DistillationTrainer(student, teacher, args, train_dataset=text, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # on every process: under FSDP2 it gathers the student's shards
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
