"""Transfer a soft prompt from a small model to a large one with public data only (POST stage 3).

Usage:
    python examples/transfer.py --target embedded:smollm2-135m-instruct --source_model runs/student \
        --source_prompt runs/prompt --public_dataset embedded:vader_tweets --output_dir runs/transferred \
        --max_steps 300 --learning_rate 1e-2 --alpha 0.5

A generation prompt transfers the same way; the POST loss then runs at the answer tokens of each public input, the
source's own greedy answer by default (``--continuation public_answers`` uses the public set's ``--answer_column``):
    python examples/transfer.py --source_prompt runs/prompt --public_dataset embedded:trec --public_split public \
        --output_dir runs/transferred --max_steps 300 --learning_rate 1e-2 --alpha 0.5
"""

from dataclasses import dataclass, field

from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from peft_post import POSTConfig, TransferConfig, TransferTrainer
from peft_post.assets import load_text_dataset, resolve_model


@dataclass
class ScriptArguments:
    target: str = field(default="embedded:smollm2-135m-instruct", metadata={"help": "Target (large) model."})
    source_model: str = field(default="runs/student", metadata={"help": "Source (small) model folder or id."})
    source_prompt: str = field(default="runs/prompt", metadata={"help": "Folder of the source prompt p_s."})
    public_dataset: str = field(default="embedded:vader_tweets", metadata={"help": "Public transfer texts."})
    public_split: str = field(default="train", metadata={"help": "Split of the public dataset."})
    num_public_examples: int = field(default=256, metadata={"help": "Public examples to transfer with."})


def main():
    script, args = HfArgumentParser((ScriptArguments, TransferConfig)).parse_args_into_dataclasses()
    target_path, source_path = resolve_model(script.target), resolve_model(script.source_model)
    task = POSTConfig.from_pretrained(script.source_prompt)
    source = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source_path), script.source_prompt,
                                       config=task)
    target_config = POSTConfig(num_virtual_tokens=task.num_virtual_tokens, template=task.template,
                               label_words=task.label_words, max_length=task.max_length, task_kind=task.task_kind,
                               max_answer_tokens=task.max_answer_tokens)
    target = get_peft_model(AutoModelForCausalLM.from_pretrained(target_path), target_config)
    public = load_text_dataset(script.public_dataset, split=script.public_split).shuffle(seed=args.seed)
    public = public.select(range(min(script.num_public_examples, len(public))))
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    trainer = TransferTrainer(target, source, args, public_dataset=public, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
