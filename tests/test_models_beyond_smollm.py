"""Issue 16 item 5: models beyond SmolLM2. Student layers counted from the top (checked against the target's config
before any weights load, keyed as the absolute layers they name), and text-only use of Gemma-3
`ForConditionalGeneration` checkpoints."""

import json
import os
import shutil

import pytest
import torch
import transformers as tf
from peft import get_peft_model
from safetensors.torch import save_file

from peft_post import POSTConfig, make_student
from peft_post.cli import main
from peft_post.modeling import label_logits, quiet_checkpointing_deprecation
from peft_post.pipeline import PipelineConfig, student_cache_key, student_folder
from peft_post.pipeline.preflight import check_model_head, check_student_layers
from peft_post.pipeline.store import (SettingsChanged, check_settings, resolved_student_layers, settings_key,
                                      stage_settings, target_num_layers,
                                      written_layers_student_key)
from peft_post.testing import build_tiny_model
from peft_post.text_models import load_text_model, text_config

CAUSAL = dict(task_type="CAUSAL_LM", template="{text} It was", label_words=[["bad"], ["good"]])


@pytest.fixture
def llama4(tmp_path, tokenizer):
    path = str(tmp_path / "llama4")
    build_tiny_model("llama", tokenizer, path, num_layers=4)
    return path


# ------------------------------------------------------------------------------------------- layers from the top
def test_layers_from_the_top_key_the_same_student_and_settings_as_the_absolute_layers(llama4):
    relative = PipelineConfig(target_model=llama4, student_layers="0,1,-2,-1")
    absolute = PipelineConfig(target_model=llama4, student_layers="0,1,2,3")
    assert resolved_student_layers(relative) == resolved_student_layers(absolute) == [0, 1, 2, 3]
    assert target_num_layers(llama4) == 4
    assert student_cache_key(relative, llama4) == student_cache_key(absolute, llama4)
    assert student_folder(relative, llama4) == student_folder(absolute, llama4)
    for stage in ("distill", "tune", "transfer", "evaluate"):
        settings = stage_settings(relative, stage, "digest", "digest" if stage == "transfer" else None)
        assert settings == stage_settings(absolute, stage, "digest", "digest" if stage == "transfer" else None)
        if stage != "distill":
            assert settings["student_layers"] == [0, 1, 2, 3]
    other = PipelineConfig(target_model=llama4, student_layers="0,-1")
    assert student_cache_key(other, llama4) != student_cache_key(absolute, llama4)


def test_the_key_of_absolute_layers_is_the_one_computed_before_layers_were_resolved():
    # Computed with the code before this change (a Hub-id target: absolute layers read no config).
    cfg = PipelineConfig(preset="rotten_tomatoes", student_layers="0,1,3", seed=7)
    assert student_cache_key(cfg, "peft-post-tests/tiny-llama") == "0dfec52e37c6d20e"
    assert settings_key(stage_settings(cfg, "distill")) == "a82b61c5e90aa62f"


def test_the_embedded_model_keeps_its_cached_student_keys_with_the_presets_counted_from_the_top():
    from peft_post.assets import cache_dir, resolve_model

    folder = os.path.join(cache_dir(), "models", "SmolLM2-135M-Instruct")
    if not os.path.isfile(os.path.join(folder, "peft_post_asset.json")):
        pytest.skip("the embedded model is not built in this cache (building it takes 30 s and the wheel)")
    path = resolve_model(PipelineConfig().target_model)
    assert target_num_layers(path) == 30
    # The keys (and distill settings keys) of the students distilled with the presets' absolute layers.
    # The default's (TREC) key is the one its headline student was distilled and cached under, in fp32.
    for preset, layers, key, settings in (("default", "0,1,2,3,-4,-3,-2,-1", "c11d09009560f274", "473cef43bf00cd65"),
                                          ("rotten_tomatoes", "0,1,2,3,-4,-3,-2,-1", "612d9dc759251cd4",
                                           "fc2c88a5e68ec99d"),
                                          ("quick", "0,1,-2,-1", "188ea0daaea5c97f", "81cdaab2bddada2f")):
        cfg = PipelineConfig(preset=preset, student_layers=layers)
        assert student_cache_key(cfg, path) == key, preset
        assert settings_key(stage_settings(cfg, "distill")) == settings, preset


def test_a_record_with_layers_from_the_top_as_written_is_this_runs_when_they_resolve_to_its_layers(llama4):
    settings = stage_settings(PipelineConfig(target_model=llama4, student_layers="0,-1"), "tune", "digest")
    assert settings["student_layers"] == [0, 3]

    def record(layers):
        old = {**settings, "student_layers": layers}
        return {"settings": old, "settings_key": settings_key(old)}

    check_settings("tune", record([0, -1]), settings, "here")  # written before settings resolved the layers
    check_settings("tune", record([0, 3]), settings, "here")
    with pytest.raises(SettingsChanged, match=r"--student_layers \[0, -2\] then, \[0, 3\] now"):
        check_settings("tune", record([0, -2]), settings, "here")
    with pytest.raises(SettingsChanged, match="--seed"):
        check_settings("tune", {**record([0, -1]), "settings": {**record([0, -1])["settings"], "seed": 1},
                                "settings_key": "other"}, settings, "here")


def test_a_student_keyed_by_layers_as_written_before_is_reused(llama4, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_POST_CACHE", str(tmp_path / "cache"))
    cfg = PipelineConfig(target_model=llama4, student_layers="0,-1")
    absolute = PipelineConfig(target_model=llama4, student_layers="0,3")
    resolved = student_folder(cfg, llama4)
    assert os.path.basename(resolved) == student_cache_key(cfg, llama4) == student_cache_key(absolute, llama4)
    assert written_layers_student_key(absolute, llama4) is None
    # A finished student under the key of the layers as written, [0, -1] (distilled before keys resolved them).
    legacy = os.path.join(os.path.dirname(resolved), written_layers_student_key(cfg, llama4))
    assert legacy != resolved

    def finish(folder):
        os.makedirs(folder)
        with open(os.path.join(folder, "stage.json"), "w") as f:
            json.dump({"stage": "distill"}, f)

    finish(legacy)
    assert student_folder(cfg, llama4) == legacy  # reused, not distilled again
    assert student_folder(absolute, llama4) == resolved  # written absolute: its key never changed
    finish(resolved)
    assert student_folder(cfg, llama4) == resolved  # once the resolved key's student exists, it is the one


def test_a_layer_list_for_a_deeper_model_is_refused_before_any_weights_load_suggesting_layers_from_the_top(
        tmp_path, tokenizer, capsys):
    from conftest import build_tiny_run_inputs

    flags = build_tiny_run_inputs(tmp_path, tokenizer)(tmp_path / "run")
    # A 28-layer target with a config and a tokenizer but no weights: any weight load would fail another way.
    target = str(tmp_path / "deep")
    tf.LlamaConfig(num_hidden_layers=28, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
                   ).save_pretrained(target)
    tokenizer.save_pretrained(target)
    flags[flags.index("--target_model") + 1] = target
    flags[flags.index("--student_layers") + 1] = "0,1,2,3,26,27,28,29"
    for command in ("run", "distill"):
        assert main([command, *flags]) == 2
        err = capsys.readouterr().err
        assert "`--student_layers` '0,1,2,3,26,27,28,29' does not fit `--target_model` (28 layers)" in err, err
        assert "`--student_layers 0,1,2,3,-4,-3,-2,-1`" in err and "30-layer model" in err, err
    assert not os.path.exists(tmp_path / "run")
    cfg = PipelineConfig(target_model=target, student_layers="0,1,2,3,-4,-3,-2,-1")
    assert check_student_layers(cfg, target) == [0, 1, 2, 3, 24, 25, 26, 27]
    # No suggestion where none fits, or where the layers already count from the top.
    every_layer = ",".join(str(i) for i in range(30))
    for layers, absent in ((every_layer, "`--student_layers 0"), ("0,-29", "30-layer")):
        with pytest.raises(ValueError, match="does not fit") as err:
            check_student_layers(PipelineConfig(target_model=target, student_layers=layers), target)
        assert absent not in str(err.value)


# ------------------------------------------------------------------------------------------------- Gemma-3 text only
def gemma3_wrapper(vocab_size, num_layers=4):
    text = tf.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"], pad_token_id=0,
        # As the published Gemma-3 checkpoints: no final soft-capping (transformers 5.25's ForConditionalGeneration
        # ignores it, its ForCausalLM applies it, so a value here would make the two differ by design).
        final_logit_softcapping=None)
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                             image_token_index=vocab_size - 1, boi_token_index=vocab_size - 3,
                             eoi_token_index=vocab_size - 2)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # config-built norms are zeros-centred no-ops; make every weight count in the comparison
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def gemma3_dir(tmp_path, tokenizer):
    full = gemma3_wrapper(len(tokenizer))
    path = str(tmp_path / "gemma3")
    full.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return full, path


def test_a_gemma3_conditional_generation_checkpoint_loads_as_its_text_model_alone(gemma3_dir, tokenizer):
    full, path = gemma3_dir
    assert type(tf.AutoConfig.from_pretrained(path)).__name__ == "Gemma3Config"
    config = text_config(path)
    assert type(config).__name__ == "Gemma3TextConfig" and config.num_hidden_layers == 4
    model = load_text_model(path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    names = [n for n, _ in model.named_parameters()]
    assert not any("vision" in n or "multi_modal" in n for n in names)
    # Exactly the language model's weights, and nothing else.
    language = {f"model.{k}": v for k, v in full.model.language_model.state_dict().items()}
    language["lm_head.weight"] = full.lm_head.weight
    state = model.state_dict()
    assert set(state) == set(language)
    for key, value in language.items():
        assert torch.equal(state[key], value), key
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in full.model.language_model.parameters())
    ids = torch.tensor(tokenizer(["a truly great film", "bad"], padding=True)["input_ids"])
    mask = (ids != tokenizer.pad_token_id).long()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   full(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_the_older_saved_layout_loads_too_and_other_models_load_as_before(gemma3_dir, llama4, tmp_path):
    full, path = gemma3_dir
    # transformers 4.52-4.57 saved the wrapper as model.language_model.*, model.vision_tower.*, lm_head.*.
    older = str(tmp_path / "gemma3-older")
    os.makedirs(older)
    shutil.copy(os.path.join(path, "config.json"), older)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    save_file(state, os.path.join(older, "model.safetensors"), metadata={"format": "pt"})
    assert any(k.startswith("model.language_model.") for k in state)
    model = load_text_model(older)
    reference = load_text_model(path)
    assert set(model.state_dict()) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # A text-only checkpoint: exactly what AutoModelForCausalLM loads.
    plain = load_text_model(llama4, dtype=torch.float32)
    auto = tf.AutoModelForCausalLM.from_pretrained(llama4, dtype=torch.float32)
    assert type(plain) is type(auto)
    for (name, a), (_, b) in zip(plain.state_dict().items(), auto.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_text_model_makes_a_student_and_runs_a_prompted_forward(gemma3_dir, tokenizer):
    full, path = gemma3_dir
    with pytest.raises(ValueError, match="load_text_model"):
        make_student(full, [0, -1])
    teacher = load_text_model(path)
    student = make_student(teacher, [0, -1])
    assert student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    for key in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(student.state_dict()[f"model.layers.1.{key}"], teacher.state_dict()[f"model.layers.3.{key}"])
    assert student.config.post_distillation["teacher"] == path

    torch.manual_seed(0)
    with quiet_checkpointing_deprecation():
        prompted = get_peft_model(teacher, POSTConfig(num_virtual_tokens=3, **CAUSAL))
    ids = torch.tensor(tokenizer(["a truly great film It was"])["input_ids"])
    mask = torch.ones_like(ids)
    pos = torch.tensor([ids.shape[1] - 1])
    with torch.no_grad():
        zero_shot = label_logits(prompted, ids, mask, pos, prompt=None)
        with_prompt = label_logits(prompted, ids, mask, pos)
        base = prompted.get_base_model()
        torch.testing.assert_close(zero_shot, base(input_ids=ids).logits[:, -1], rtol=0, atol=1e-5)
        prompt = prompted.prompt_encoder["default"].embedding.weight.unsqueeze(0)
        embeds = torch.cat([prompt, base.get_input_embeddings()(ids)], dim=1)
        torch.testing.assert_close(with_prompt, base(inputs_embeds=embeds).logits[:, -1], rtol=0, atol=1e-5)
    assert with_prompt.shape == (1, len(tokenizer)) and not torch.equal(with_prompt, zero_shot)


def test_preflight_reads_the_language_model_config_of_a_wrapper(gemma3_dir):
    _, path = gemma3_dir
    cfg = PipelineConfig(target_model=path, student_layers="0,-1")
    assert target_num_layers(path) == 4
    assert check_student_layers(cfg, path) == [0, 3]
    check_model_head(cfg, path, "target_model")
    with pytest.raises(ValueError, match=r"\(4 layers\)"):
        check_student_layers(PipelineConfig(target_model=path, student_layers="0,5"), path)
    assert student_cache_key(cfg, path) == student_cache_key(PipelineConfig(target_model=path, student_layers="0,3"),
                                                             path)
