"""Model card content, and the real upload/download path of `huggingface_hub` against a local fake Hub."""

import ast
import glob
import json
import os
import re

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PromptTuningConfig, get_peft_model

from fake_hub import FakeHub, point_hub_clients_at
from peft_post import POST_CONFIG_NAME, POSTConfig, build_model_card, label_logits, load_transferred_prompt
from peft_post import push_transferred_prompt
from peft_post.prompts import get_prompt, set_prompt
from peft_post.tasks import TaskTemplate, VerbalizerCollator
from peft_post.testing import TINY_LEDGER, tiny_post_config, tiny_sentiment_rows

TOKEN = "hf_fake_write_token"
LEDGER = TINY_LEDGER
PROVENANCE = {"stage": "transfer", "public_data": "vader/movieReviewSnippets", "public_size": 64, "steps": 150,
              "seed": 3}
EVALUATION = {
    "target zero-shot": {"accuracy": 0.773, "num_examples": 1000, "per_class": {}, "dataset": "rotten_tomatoes"},
    "POST transferred prompt": 0.8125,
}


def post_config(kind, **kw):
    return tiny_post_config(kind, **{"provenance": dict(PROVENANCE), **kw})


def prompted(load_tiny, kind, seed=0, **kw):
    model = get_peft_model(load_tiny(kind), post_config(kind, **kw))
    torch.manual_seed(seed)
    set_prompt(model, 0.1 * torch.randn_like(get_prompt(model)))
    return model.eval()


def batch_for(config, tokenizer, rows):
    return VerbalizerCollator(TaskTemplate.from_config(config, tokenizer))(rows)


def card_sections(text):
    return re.findall(r"^## (.+)$", text, flags=re.M)


def snippet_of(text):
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with FakeHub(tokens={TOKEN: "alice"}) as hub:
        point_hub_clients_at(monkeypatch, hub.endpoint, str(tmp_path / "hf-cache"))
        yield hub


# -- the card ---------------------------------------------------------------------------------------------------


def test_card_metadata_and_sections_of_a_dp_transferred_prompt(load_tiny):
    config = prompted(load_tiny, "gpt2").peft_config["default"]
    card = build_model_card(config, "alice/post-prompt", base_model="org/tiny-target", evaluation=EVALUATION)
    reparsed = ModelCard(str(card))  # what the Hub will read back from README.md
    meta = reparsed.data.to_dict()
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "org/tiny-target"
    assert meta["tags"] == ["peft", "prompt-tuning", "post", "differential-privacy"]
    assert meta["pipeline_tag"] == "text-generation"

    text = reparsed.text
    assert card_sections(text) == [
        "How to load it with plain PEFT", "Task", "Transfer provenance", "Privacy", "Evaluation", "Citation",
    ]
    for row in ("| source model | org/tiny-source |", "| transfer α (direction-term weight) | 0.4 |",
                "| transfer temperature T | 1.5 |", "| public_data | vader/movieReviewSnippets |", "| steps | 150 |",
                "| public_size | 64 |"):
        assert row in text, row
    for row in ("| ε (epsilon) | 8 |", "| δ (delta) | 1e-05 |", "| accountant | prv |", "| noise multiplier σ | 0.73 |",
                "| per-example clipping norm C | 1 |", "| Poisson sampling rate q | 0.0125 |", "| steps | 320 |"):
        assert row in text, row
    privacy = text.split("## Privacy")[1].split("## Evaluation")[0]
    assert "What this protects" in privacy and "What this does not protect" in privacy
    assert "inference queries" in privacy and "public data" in privacy and "post-processing" in privacy
    assert "no differential-privacy guarantee" not in privacy
    assert "| target zero-shot | 77.30% | 1000 | rotten_tomatoes |" in text
    assert "| POST transferred prompt | 81.25% |  |  |" in text
    assert "| 0 | bad, awful |" in text and "| 1 | good, great |" in text


def test_card_without_ledger_states_there_is_no_dp_guarantee(load_tiny):
    config = prompted(load_tiny, "roberta", privacy=None, source_model_name_or_path=None, transfer_alpha=None,
                      provenance=None).peft_config["default"]
    card = ModelCard(str(build_model_card(config, "alice/p", base_model="org/tiny-roberta")))
    assert card.data.tags == ["peft", "prompt-tuning", "post"]
    assert card.data.pipeline_tag == "fill-mask"
    privacy = card.text.split("## Privacy")[1].split("## Evaluation")[0]
    assert "no differential-privacy guarantee" in privacy
    assert "ε" not in privacy and "What this protects" not in privacy
    assert "not produced by a POST transfer" in card.text
    assert "No evaluation results were published" in card.text
    assert "No further provenance" in card.text


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_card_snippet_is_valid_python_that_uses_plain_peft_only(kind, load_tiny):
    config = prompted(load_tiny, kind).peft_config["default"]
    snippet = snippet_of(str(build_model_card(config, "alice/p", base_model="org/base")))
    tree = ast.parse(snippet)
    imported = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"torch", "transformers", "peft"}
    assert "peft_post" not in snippet
    assert 'PeftModel.from_pretrained(base, "alice/p")' in snippet
    auto = "AutoModelForMaskedLM" if kind == "bert" else "AutoModelForCausalLM"
    assert f'{auto}.from_pretrained("org/base")' in snippet


def test_card_refuses_local_base_model_bad_evaluation_and_plain_configs(load_tiny, tiny_model_dirs):
    config = prompted(load_tiny, "gpt2").peft_config["default"]
    assert os.path.isdir(config.base_model_name_or_path)  # tiny models load from a local folder
    with pytest.raises(ValueError, match="base_model"):
        build_model_card(config, "alice/p")
    with pytest.raises(ValueError, match="repo_id"):
        build_model_card(config, "not a repo id", base_model="org/base")
    with pytest.raises(ValueError, match="evaluation"):
        build_model_card(config, "alice/p", base_model="org/base", evaluation={"POST": 81.25})  # percent, not fraction
    with pytest.raises(ValueError, match="evaluation"):
        build_model_card(config, "alice/p", base_model="org/base", evaluation={"POST": {"acc": 0.8}})
    with pytest.raises(ValueError, match="POSTConfig"):
        build_model_card(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "alice/p", base_model="o/b")


# -- upload and load back through the fake Hub ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_push_then_load_back_from_the_hub_gives_the_same_prompt_and_fields(kind, fake_hub, load_tiny, tokenizer):
    model = prompted(load_tiny, kind)
    config = model.peft_config["default"]
    local_base = config.base_model_name_or_path
    repo_id = f"alice/post-{kind}"
    info = push_transferred_prompt(model, repo_id, token=TOKEN, evaluation=EVALUATION,
                                   base_model=f"org/tiny-{kind}", commit_message="POST prompt v1")
    assert config.base_model_name_or_path == local_base  # the override is for the upload only

    assert fake_hub.create_payloads == [{"name": f"post-{kind}", "organization": "alice", "visibility": "private",
                                         "type": "model"}]
    repo = fake_hub.repos[repo_id]
    assert repo.private and info.oid == repo.head and len(repo.commits) == 1
    assert repo.commits[0][1] == "POST prompt v1"
    assert set(repo.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", POST_CONFIG_NAME}
    assert repo.files["README.md"].decode() == str(
        build_model_card(config, repo_id, base_model=f"org/tiny-{kind}", evaluation=EVALUATION)
    )
    adapter_config = json.loads(repo.files["adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == f"org/tiny-{kind}"
    assert "template" not in adapter_config  # POST fields stay in the side file
    assert json.loads(repo.files[POST_CONFIG_NAME])["privacy"] == LEDGER

    # A private repo is invisible without the token (first, while the download cache is still empty).
    with pytest.raises(RepositoryNotFoundError):
        load_transferred_prompt(load_tiny(kind), repo_id)

    loaded = load_transferred_prompt(load_tiny(kind), repo_id, token=TOKEN)
    got = loaded.peft_config["default"]
    assert isinstance(got, POSTConfig) and not loaded.training
    for name in POSTConfig.post_field_names():
        assert getattr(got, name) == getattr(config, name), name
    assert got.num_virtual_tokens == config.num_virtual_tokens and got.task_type == config.task_type
    torch.testing.assert_close(get_prompt(loaded), get_prompt(model), rtol=0, atol=0)
    batch = batch_for(config, tokenizer, tiny_sentiment_rows(6))
    with torch.no_grad():
        torch.testing.assert_close(label_logits(loaded, **batch), label_logits(model, **batch), rtol=0, atol=0)
    assert ("POST", f"/api/models/{repo_id}/commit/main") in fake_hub.requests
    assert any(m == "GET" and p.endswith("/adapter_model.safetensors") for m, p in fake_hub.requests)


def test_pushing_again_adds_a_commit_and_revision_loads_the_old_prompt(fake_hub, load_tiny):
    model = prompted(load_tiny, "llama", seed=1)
    first = get_prompt(model)
    v1 = push_transferred_prompt(model, "alice/p", token=TOKEN, base_model="org/tiny-llama")
    set_prompt(model, first + 1.0)
    v2 = push_transferred_prompt(model, "alice/p", token=TOKEN, base_model="org/tiny-llama")
    assert v1.oid != v2.oid and [c[0] for c in fake_hub.repos["alice/p"].commits] == [v1.oid, v2.oid]
    # exist_ok: the second create_repo got a 409 and went on
    assert [p for m, p in fake_hub.requests if p == "/api/repos/create"] == ["/api/repos/create"] * 2

    latest = load_transferred_prompt(load_tiny("llama"), "alice/p", token=TOKEN)
    old = load_transferred_prompt(load_tiny("llama"), "alice/p", token=TOKEN, revision=v1.oid)
    torch.testing.assert_close(get_prompt(latest), first + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(get_prompt(old), first, rtol=0, atol=0)


def test_private_push_refuses_an_existing_public_repo(fake_hub, load_tiny):
    HfApi(token=TOKEN).create_repo("alice/public", private=False)
    with pytest.raises(ValueError, match="public"):
        push_transferred_prompt(prompted(load_tiny, "gpt2"), "alice/public", token=TOKEN, base_model="org/b")
    assert fake_hub.commit_payloads == [] and fake_hub.repos["alice/public"].files == {}


def test_push_refuses_bad_input_before_any_request(fake_hub, load_tiny):
    with pytest.raises(ValueError, match="PeftModel"):
        push_transferred_prompt(load_tiny("gpt2"), "alice/p", token=TOKEN, base_model="org/b")
    with pytest.raises(ValueError, match="base_model"):
        push_transferred_prompt(prompted(load_tiny, "gpt2"), "alice/p", token=TOKEN)  # local base path
    plain = get_peft_model(load_tiny("gpt2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="POSTConfig"):
        push_transferred_prompt(plain, "alice/p", token=TOKEN, base_model="org/b")
    assert [r for r in fake_hub.requests if r[1] != "/api/agent-harnesses"] == []


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_card_snippet_runs_against_the_hub_and_matches_peft_post(kind, fake_hub, load_tiny, tiny_model_dirs,
                                                                  tokenizer):
    base_dir = tiny_model_dirs[kind]
    fake_hub.seed_repo(f"org/tiny-{kind}", {
        os.path.relpath(p, base_dir): open(p, "rb").read() for p in glob.glob(os.path.join(base_dir, "*"))
    })
    model = prompted(load_tiny, kind)
    push_transferred_prompt(model, f"alice/{kind}-prompt", token=TOKEN, private=False, base_model=f"org/tiny-{kind}")
    assert fake_hub.create_payloads[-1]["visibility"] == "public"

    snippet = snippet_of(fake_hub.repos[f"alice/{kind}-prompt"].files["README.md"].decode())
    namespace = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)  # plain transformers + PEFT, from the Hub

    config = model.peft_config["default"]
    batch = batch_for(config, tokenizer, [{"text": namespace["text"]}])
    with torch.no_grad():
        expected = label_logits(model, **batch)[0]
    torch.testing.assert_close(namespace["logits"], expected, rtol=0, atol=1e-5)
    scores = [expected[[tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in ws]].mean().item()
              for ws in config.label_words]
    assert namespace["scores"] == pytest.approx(scores, abs=1e-5)


# -- loading checks (local folders) -----------------------------------------------------------------------------


def test_load_from_a_local_folder_and_refuse_the_wrong_base_model(load_tiny, tokenizer, tmp_path):
    from peft_post.testing import build_tiny_model

    model = prompted(load_tiny, "qwen2")
    model.save_pretrained(tmp_path / "prompt")
    loaded = load_transferred_prompt(load_tiny("qwen2"), str(tmp_path / "prompt"))
    torch.testing.assert_close(get_prompt(loaded), get_prompt(model), rtol=0, atol=0)
    assert loaded.peft_config["default"].privacy == LEDGER

    # a name/path loads the base with the Auto class of the prompt's task type
    by_name = load_transferred_prompt(model.peft_config["default"].base_model_name_or_path, str(tmp_path / "prompt"))
    assert type(by_name.get_base_model()).__name__ == "Qwen2ForCausalLM"

    with pytest.raises(ValueError, match="causal LM .* BertForMaskedLM"):
        load_transferred_prompt(load_tiny("bert"), str(tmp_path / "prompt"))
    wide = build_tiny_model("qwen2", tokenizer, str(tmp_path / "wide"), hidden_size=48)
    with pytest.raises(ValueError, match="token_dim"):
        load_transferred_prompt(wide, str(tmp_path / "prompt"))
    with pytest.raises(ValueError, match="PeftModel"):
        load_transferred_prompt(model, str(tmp_path / "prompt"))


def test_a_named_adapter_is_pushed_to_the_repo_root_and_loads_under_its_name(fake_hub, load_tiny):
    model = get_peft_model(load_tiny("gpt2"), post_config("gpt2"), adapter_name="sentiment")
    torch.manual_seed(2)
    set_prompt(model, 0.1 * torch.randn_like(get_prompt(model, "sentiment")), "sentiment")
    push_transferred_prompt(model, "alice/named", token=TOKEN, base_model="org/tiny-gpt2", adapter_name="sentiment")
    assert set(fake_hub.repos["alice/named"].files) == {
        "README.md", "adapter_config.json", "adapter_model.safetensors", POST_CONFIG_NAME,
    }
    loaded = load_transferred_prompt(load_tiny("gpt2"), "alice/named", token=TOKEN, adapter_name="sentiment")
    assert isinstance(loaded.peft_config["sentiment"], POSTConfig)
    torch.testing.assert_close(get_prompt(loaded, "sentiment"), get_prompt(model, "sentiment"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter named 'default'"):
        push_transferred_prompt(model, "alice/named", token=TOKEN, base_model="org/tiny-gpt2")
