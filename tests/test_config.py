import json
import os
import warnings

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model

from peft_post import POST_CONFIG_NAME, POSTConfig
from peft_post.modeling import label_logits
from peft_post.testing import TINY_LEDGER, tiny_post_config, tiny_sentiment_rows
from peft_post.tasks import TaskTemplate, VerbalizerCollator

LEDGER = TINY_LEDGER
post_config = tiny_post_config


@pytest.mark.parametrize(
    "field,value",
    [
        ("transfer_alpha", 1.5),
        ("transfer_alpha", -0.1),
        ("transfer_temperature", 0.0),
        ("template", "no placeholder"),
        ("template", "{text} and {text}"),
        ("label_words", [["good"]]),
        ("label_words", [["good"], []]),
        ("label_words", [["good"], [""]]),
        ("max_length", 1),
        ("num_virtual_tokens", 0),
        ("task_type", "SEQ_CLS"),
        ("privacy", {"epsilon": 8.0}),
        ("privacy", {**LEDGER, "epsilon": 0.0}),
        ("privacy", {**LEDGER, "delta": 1.0}),
        ("privacy", {**LEDGER, "accountant": "moments"}),
        ("provenance", "not a dict"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "task_type" else "task_type"):
        post_config("gpt2", **{field: value})


def test_masked_lm_template_needs_mask_and_causal_template_refuses_it():
    with pytest.raises(ValueError, match="mask"):
        POSTConfig(task_type="FEATURE_EXTRACTION", template="{text} It was")
    with pytest.raises(ValueError, match="mask"):
        POSTConfig(task_type="CAUSAL_LM", template="{text} It was {mask}.")


def test_is_a_prompt_tuning_config():
    cfg = post_config("gpt2")
    assert isinstance(cfg, PromptTuningConfig)
    assert cfg.peft_type.value == "PROMPT_TUNING"
    assert cfg.num_classes == 2


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "roberta", "bert"])
def test_round_trip_plain_peft_and_post_config(kind, load_tiny, tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = post_config(kind)
    model = get_peft_model(load_tiny(kind), cfg)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
    model.save_pretrained(tmp_path)

    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    side = json.loads((tmp_path / POST_CONFIG_NAME).read_text())
    assert "template" not in adapter and side["template"] == cfg.template
    assert adapter["base_model_name_or_path"] and os.path.isdir(adapter["base_model_name_or_path"])

    masked = kind in ("roberta", "bert")
    batch = VerbalizerCollator(TaskTemplate.from_config(cfg, tokenizer))(tiny_sentiment_rows(5))
    expected = label_logits(model, **batch)
    rows = torch.arange(5), batch["label_positions"] + cfg.num_virtual_tokens
    expected_peft = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows]
    # The label-slot forward equals PEFT's own forward up to float reassociation of the head matmul.
    torch.testing.assert_close(expected, expected_peft, rtol=0, atol=1e-6)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # plain PEFT must not warn about unknown keys
        plain = PeftModel.from_pretrained(load_tiny(kind), tmp_path)
    assert type(plain.peft_config["default"]) is PromptTuningConfig
    got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got[rows], expected_peft, rtol=0, atol=0)

    loaded = POSTConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, POSTConfig)
    for name in POSTConfig.post_field_names():
        assert getattr(loaded, name) == getattr(cfg, name), name
    assert loaded.task_type == ("FEATURE_EXTRACTION" if masked else "CAUSAL_LM")

    with_post = PeftModel.from_pretrained(load_tiny(kind), tmp_path, config=loaded)
    assert isinstance(with_post.peft_config["default"], POSTConfig)
    torch.testing.assert_close(label_logits(with_post, **batch), expected, rtol=0, atol=0)


def test_plain_prompt_tuning_adapter_loads_as_post_config_with_defaults(load_tiny, tmp_path):
    model = get_peft_model(load_tiny("gpt2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.save_pretrained(tmp_path)
    loaded = POSTConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, POSTConfig) and loaded.num_virtual_tokens == 2
    assert loaded.privacy is None and loaded.template == POSTConfig().template


def test_loading_another_peft_type_is_refused(load_tiny, tmp_path):
    from peft import LoraConfig

    get_peft_model(load_tiny("gpt2"), LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"])).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        POSTConfig.from_pretrained(tmp_path)


def test_missing_local_adapter_folder_is_a_clear_error(tmp_path):
    # Not a Hub validation traceback: the same ValueError PEFT's own configs raise, naming the path.
    missing = str(tmp_path / "no_such_run" / "source_prompt")
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at .*no_such_run"):
        POSTConfig.from_pretrained(missing)
