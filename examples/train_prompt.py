"""Tune a soft prompt on a (small) model with the verbalizer loss, optionally with differential privacy.

Usage:
    python examples/train_prompt.py --model_name_or_path runs/student --dataset embedded:rotten_tomatoes \
        --output_dir runs/prompt --max_steps 300 [--dp --target_epsilon 8]

A generation task (the answer's token cross-entropy instead of the verbalizer loss):
    python examples/train_prompt.py --model_name_or_path runs/student --dataset embedded:trec \
        --task_kind generation --answer_column answer --template $'Question: {text}\nAnswer type:' \
        --init_text 'Name the type of answer this question asks for' --output_dir runs/prompt --max_steps 200
"""

from dataclasses import dataclass, field
from typing import Optional

from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from peft_post import DPConfig, DPPromptTrainer, POSTConfig, PromptTrainer, PromptTrainingConfig
from peft_post.assets import load_text_dataset, resolve_model


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="embedded:smollm2-135m-instruct", metadata={"help": "Model to prompt."})
    dataset: str = field(default="embedded:rotten_tomatoes", metadata={"help": "Labelled dataset (train/test)."})
    template: str = field(default="Review: {text}\nSentiment:", metadata={"help": "Template ending at the label."})
    label_words: str = field(default="negative|positive", metadata={"help": "Classes by '|', synonyms by ','."})
    task_kind: str = field(default="classification", metadata={"help": "'classification' or 'generation'."})
    max_answer_tokens: int = field(default=16, metadata={"help": "Generation: most tokens of an answer."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Prompt length."})
    init_text: str = field(default="Predict if sentiment of this review is positive or negative",
                           metadata={"help": "Prompt initialisation text."})
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "Cap on training examples."})
    dp: bool = field(default=False, metadata={"help": "Train with DP-SGD on the prompt."})
    target_epsilon: float = field(default=8.0, metadata={"help": "DP budget ε (with --dp)."})
    target_delta: Optional[float] = field(default=None, metadata={"help": "DP δ (default 1/N)."})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "Per-example clipping bound C."})


def main():
    parser = HfArgumentParser((ScriptArguments, PromptTrainingConfig))
    script, args = parser.parse_args_into_dataclasses()
    path = resolve_model(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = POSTConfig(num_virtual_tokens=script.num_virtual_tokens, template=script.template,
                        label_words=[c.split(",") for c in script.label_words.split("|")],
                        task_kind=script.task_kind, max_answer_tokens=script.max_answer_tokens,
                        prompt_tuning_init="TEXT", prompt_tuning_init_text=script.init_text,
                        tokenizer_name_or_path=path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    data = load_text_dataset(script.dataset)
    train = data["train"]
    if script.max_train_examples:
        train = train.shuffle(seed=args.seed).select(range(min(script.max_train_examples, len(train))))
    if script.dp:
        dp = DPConfig(target_epsilon=script.target_epsilon, target_delta=script.target_delta,
                      max_grad_norm=script.dp_max_grad_norm)
        trainer = DPPromptTrainer(model, args, dp_config=dp, train_dataset=train, processing_class=tokenizer)
    else:
        trainer = PromptTrainer(model, args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
    if script.dp:
        print("privacy ledger:", trainer.privacy_report())


if __name__ == "__main__":
    main()
