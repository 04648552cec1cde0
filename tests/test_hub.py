"""Model card content, and the real upload/download path of `huggingface_hub` against a local fake Hub."""

import ast
import glob
import importlib.resources
import json
import os
import re
import shutil
import socket

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PromptTuningConfig, get_peft_model

from fake_hub import FakeHub, point_hub_clients_at
from peft_post import POST_CONFIG_NAME, POSTConfig, build_model_card, load_transferred_prompt
from peft_post import push_transferred_prompt
from peft_post.cli import main as cli_main
from peft_post.hub import MODEL_CARD_TEMPLATE, PAPER_URL, push_adapter_folder, read_adapter_folder
from peft_post.modeling import label_logits
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


@pytest.fixture
def no_saved_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no `hf auth login` token: what a fresh machine or a CI job without secrets has."""
    from huggingface_hub import constants, get_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-such-token"))
    assert get_token() is None


def hub_requests(hub):
    """The requests a test caused (huggingface_hub fetches its agent-harness list on its own, at most daily)."""
    return [r for r in hub.requests if r[1] != "/api/agent-harnesses"]


def saved_adapter(load_tiny, tmp_path, kind="gpt2", **kw):
    """A POST prompt saved the way a run folder holds it, next to files that must not be uploaded."""
    model = prompted(load_tiny, kind, **kw)
    folder = tmp_path / f"{kind}-prompt"
    model.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"private seed and paths")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    return model, str(folder)


def forbid_model_loading(monkeypatch):
    """Any attempt to load (or download) a model fails the test."""
    import peft
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"push loaded a model: from_pretrained{args}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoModel,
                peft.PeftModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


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


def card_lines(config, **kw):
    return str(build_model_card(config, "alice/p", base_model="org/base", **kw)).splitlines()


def test_card_is_rendered_from_the_packaged_jinja_template():
    source = (importlib.resources.files("peft_post") / "templates" / MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")
    assert source.startswith("---\n{{ card_data }}\n---\n")
    for heading in ("How to load it with plain PEFT", "Task", "Transfer provenance", "Privacy", "Evaluation", "Citation"):
        assert f"\n## {heading}\n" in source
    text = str(build_model_card(tiny_post_config("gpt2"), "alice/p", base_model="org/base", evaluation=EVALUATION))
    assert not re.search(r"\{\{|\{%|\{#", text)  # every Jinja tag rendered
    assert text.endswith(f"ICML 2025. {PAPER_URL}\n") and "\n\n\n" not in text
    assert re.findall(r"[^\n]\n## ", text) == [] and re.findall(r"\n## [^\n]+\n[^\n]", text) == []  # blank-line framed


def test_card_of_a_dp_prompt_says_what_it_said_before():
    ledger = dict(LEDGER, adjacency="replace_one", history=[[0.73, 0.0125, 320]], epsilon_add_remove=5.25)
    lines = card_lines(tiny_post_config("gpt2", privacy=ledger, provenance=dict(PROVENANCE)))
    for line in (
        "# POST soft prompt for org/base",
        "A soft prompt (3 virtual tokens) for `org/base`, transferred from `org/tiny-source` with "
        f"[POST]({PAPER_URL}) (Privacy Of Soft-prompt Transfer, ICML 2025). It carries a differential-privacy "
        "guarantee; see Privacy.",
        "Classification as text infilling: each input is rendered through the template `Review: {text}\\nSentiment:` "
        "(at most 256 tokens, cut from the left) and class c scores the mean logit of its label words at the label slot.",
        "L = (1 − α)·KL_T(a_t, a_s) + α·KL_T(a_t − b_t, a_s − b_s)",
        "| neighbouring datasets | replace_one |",
        "| history [σ, q, steps] per phase | 0.73, 0.0125, 320 |",
        "| ε under add/remove-one (not the guarantee: N is published) | 5.25 |",
        "- inference queries: texts sent to a model that uses this prompt are seen by whoever runs that model;",
        "- the numbers themselves: they are the training code's record, not an audit of it.",
    ):
        assert line in lines, line
    start = lines.index("| field | value |")
    assert lines[start + 2:start + 11] == [
        "| target (base) model | org/base |", "| source model | org/tiny-source |",
        "| transfer α (direction-term weight) | 0.4 |", "| transfer temperature T | 1.5 |", "| virtual tokens | 3 |",
        "| public_data | vader/movieReviewSnippets |", "| public_size | 64 |", "| seed | 3 |", "| stage | transfer |",
    ]
    start = lines.index("| privacy ledger | value |")
    assert lines[start - 2].startswith("The prompt was trained on the source model `org/tiny-source` with DP-SGD ")
    assert lines[start + 2:start + 7] == ["| ε (epsilon) | 8 |", "| δ (delta) | 1e-05 |", "| accountant | prv |",
                                          "| noise multiplier σ | 0.73 |", "| per-example clipping norm C | 1 |"]
    protects = next(line for line in lines if line.startswith("**What this protects:**"))
    assert "against replacing any single example of the private data set by another (replace-one adjacency; " in protects
    assert protects.endswith("by the post-processing property of DP the transferred prompt keeps the same (ε, δ).")
    assert not any("does not hold" in line or "no differential-privacy guarantee" in line for line in lines)


def test_card_of_a_void_guarantee_shows_the_ledger_but_says_it_does_not_hold():
    reasons = ["the noise came from a seeded generator", "batches are replayable"]
    config = tiny_post_config("gpt2", privacy=dict(LEDGER, guarantee_holds=False, guarantee_void_reasons=reasons))
    card = build_model_card(config, "alice/p", base_model="org/base")
    assert card.data.tags == ["peft", "prompt-tuning", "post"]  # no differential-privacy tag
    lines = str(card).splitlines()
    assert next(line for line in lines if line.startswith("A soft prompt")).endswith(
        "It carries **no** differential-privacy guarantee; see Privacy.")
    warning = ("**The differential-privacy guarantee does not hold for this prompt**, although it was trained with "
               "DP-SGD: the noise came from a seeded generator; batches are replayable. Treat it as non-private.")
    assert lines[lines.index("## Privacy") + 2] == warning  # the first thing the section says
    for line in ("| ε (epsilon) | 8 |", "| guarantee holds | False |",
                 "| guarantee_void_reasons | the noise came from a seeded generator, batches are replayable |"):
        assert line in lines, line


def test_card_of_a_direct_dp_prompt_and_of_a_cleared_ledger():
    direct = card_lines(tiny_post_config("bert", source_model_name_or_path=None, transfer_alpha=None))
    assert "No source model is recorded: this prompt was not produced by a POST transfer (it was tuned on `org/base` " \
           "directly, or its provenance was not recorded)." in direct
    assert "| transfer α (direction-term weight) | not recorded |" in direct
    assert any(line.startswith("The prompt was trained on the base model with DP-SGD ") for line in direct)
    protects = next(line for line in direct if line.startswith("**What this protects:**"))
    assert "against the neighbouring relation add/remove-one (not recorded). Anything" in protects
    assert "post-processing" not in protects

    cleared = {"dp_claim_cleared": {"previous_epsilon": 8.0, "previous_delta": 1e-5,
                                    "reason": "trained further without DP by PromptTrainer"}}
    lines = card_lines(tiny_post_config("gpt2", privacy=None, provenance=cleared))
    privacy = lines[lines.index("## Privacy"):lines.index("## Evaluation")]
    assert privacy[2].startswith("**This prompt has no differential-privacy guarantee.** Its training did not use DP-SGD")
    assert privacy[3:] == ["", "An earlier DP ledger (ε = 8) was cleared: trained further without DP by PromptTrainer.",
                           ""]


def test_card_metadata_takes_license_and_datasets_only_when_given():
    config = tiny_post_config("gpt2")
    meta = build_model_card(config, "alice/p", base_model="org/base").data.to_dict()
    assert "license" not in meta and "datasets" not in meta
    card = build_model_card(config, "alice/p", base_model="org/base", license="apache-2.0",
                            datasets=["vader/movieReviewSnippets"])
    reparsed = ModelCard(str(card)).data
    assert reparsed.license == "apache-2.0" and reparsed.datasets == ["vader/movieReviewSnippets"]
    with pytest.raises(ValueError, match="datasets"):
        build_model_card(config, "alice/p", base_model="org/base", datasets=["./public.csv"])
    with pytest.raises(ValueError, match="datasets"):
        build_model_card(config, "alice/p", base_model="org/base", datasets="vader/movieReviewSnippets")


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
    assert hub_requests(fake_hub) == []


# -- pushing a saved folder (`peft-post push`): the token first, no model loaded ---------------------------------


def test_cli_push_uploads_the_adapter_folder_without_loading_any_model(fake_hub, load_tiny, tmp_path, monkeypatch,
                                                                       capsys):
    model, folder = saved_adapter(load_tiny, tmp_path)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"accuracy": {"POST transferred prompt": 0.8125, "full tuning": None}}))
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # no --token: the environment's, as in CI
    with monkeypatch.context() as patched:
        forbid_model_loading(patched)
        assert cli_main(["push", "--adapter", folder, "--repo_id", "alice/from-folder", "--base_model",
                         "org/tiny-gpt2", "--report", str(report)]) == 0
    assert f"pushed {folder} to alice/from-folder" in capsys.readouterr().out
    requests = hub_requests(fake_hub)
    assert requests[0] == ("GET", "/api/whoami-v2")  # the token is checked before anything else
    assert not any("/resolve/" in path for _, path in requests)  # nothing downloaded, not even a config

    repo = fake_hub.repos["alice/from-folder"]
    assert repo.private and len(repo.commits) == 1
    # only the adapter files and the card: not the trainer's files or checkpoints next to them
    assert set(repo.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", POST_CONFIG_NAME}
    for name in ("adapter_model.safetensors", POST_CONFIG_NAME):
        assert repo.files[name] == open(os.path.join(folder, name), "rb").read()
    # the card from the folder's JSON is the card of the in-memory model
    assert repo.files["README.md"].decode() == str(build_model_card(
        model.peft_config["default"], "alice/from-folder", base_model="org/tiny-gpt2",
        evaluation={"POST transferred prompt": 0.8125},
    ))
    assert json.loads(repo.files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-gpt2"
    with open(os.path.join(folder, "adapter_config.json")) as f:  # the folder itself is left as it was
        assert json.load(f)["base_model_name_or_path"] == model.peft_config["default"].base_model_name_or_path

    loaded = load_transferred_prompt(load_tiny("gpt2"), "alice/from-folder", token=TOKEN)
    torch.testing.assert_close(get_prompt(loaded), get_prompt(model), rtol=0, atol=0)
    assert loaded.peft_config["default"].privacy == LEDGER


def test_push_without_a_token_says_how_to_log_in_before_any_request(fake_hub, no_saved_token, load_tiny, tmp_path,
                                                                    capsys):
    model, folder = saved_adapter(load_tiny, tmp_path)
    with pytest.raises(ValueError, match=r"hf auth login.*HF_TOKEN"):
        push_adapter_folder(folder, "alice/p", base_model="org/b")
    with pytest.raises(ValueError, match=r"hf auth login.*HF_TOKEN"):
        push_transferred_prompt(model, "alice/p", base_model="org/b")
    with pytest.raises(ValueError, match="token"):
        push_adapter_folder(folder, "alice/p", base_model="org/b", token=False)
    capsys.readouterr()  # drop the model-loading progress bars
    assert cli_main(["push", "--adapter", folder, "--repo_id", "alice/p", "--base_model", "org/b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-post push: error: No Hugging Face token")
    assert "hf auth login" in err and "HF_TOKEN" in err and "Traceback" not in err
    assert hub_requests(fake_hub) == [] and fake_hub.repos == {}


def test_push_with_a_rejected_token_stops_after_checking_it(fake_hub, load_tiny, tmp_path, capsys):
    _, folder = saved_adapter(load_tiny, tmp_path)
    capsys.readouterr()  # drop the model-loading progress bars
    assert cli_main(["push", "--adapter", folder, "--repo_id", "alice/p", "--base_model", "org/b",
                     "--token", "hf_revoked"]) == 2
    err = capsys.readouterr().err
    assert "rejected the token" in err and "hf auth login --force" in err and "Traceback" not in err
    assert hub_requests(fake_hub) == [("GET", "/api/whoami-v2")] and fake_hub.repos == {}


def test_push_to_an_unreachable_hub_exits_1_with_a_message(monkeypatch, load_tiny, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_hub_clients_at(monkeypatch, f"http://127.0.0.1:{port}", str(tmp_path / "hf-cache"))
    _, folder = saved_adapter(load_tiny, tmp_path)
    capsys.readouterr()  # drop the model-loading progress bars
    assert cli_main(["push", "--adapter", folder, "--repo_id", "alice/p", "--base_model", "org/b",
                     "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peft-post push: error: Could not reach the Hub") and "Traceback" not in err


def test_push_names_the_adapter_argument_for_a_missing_or_non_adapter_folder(fake_hub, load_tiny, tmp_path, capsys):
    _, folder = saved_adapter(load_tiny, tmp_path)
    plain = tmp_path / "plain-prompt"  # a PEFT prompt-tuning adapter without the POST side file
    get_peft_model(load_tiny("gpt2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(plain)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights)
    os.remove(no_weights / "adapter_model.safetensors")
    cases = [
        (tmp_path / "missing", "is not a folder"),
        (tmp_path, "lacks adapter_config.json, post_config.json, adapter_model.safetensors or adapter_model.bin"),
        (plain, "lacks post_config.json"),
        (no_weights, "lacks adapter_model.safetensors or adapter_model.bin"),
    ]
    capsys.readouterr()  # drop the model-loading progress bars
    for path, why in cases:
        assert cli_main(["push", "--adapter", str(path), "--repo_id", "alice/p", "--base_model", "org/b",
                         "--token", TOKEN]) == 2
        err = capsys.readouterr().err
        assert f"`adapter` {str(path)!r}" in err and why in err and "Traceback" not in err, err
        with pytest.raises(ValueError, match="`adapter`"):
            push_adapter_folder(str(path), "alice/p", base_model="org/b", token=TOKEN)
    assert read_adapter_folder(folder).privacy == LEDGER
    assert hub_requests(fake_hub) == []


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


def test_card_of_a_generation_prompt_states_the_task_and_its_snippet_generates_the_same_answer(
        fake_hub, load_tiny, tiny_model_dirs, tokenizer):
    """A generation prompt's card: the task kind and metric, and a plain-PEFT snippet whose greedy answer (PEFT's
    generate, one unpadded llama input) is the one `peft_post.generation` gives."""
    from peft_post.generation import generate_answers

    base_dir = tiny_model_dirs["llama"]
    fake_hub.seed_repo("org/tiny-llama", {
        os.path.relpath(p, base_dir): open(p, "rb").read() for p in glob.glob(os.path.join(base_dir, "*"))
    })
    model = prompted(load_tiny, "llama", task_kind="generation", max_answer_tokens=4)
    evaluation = {"POST transferred prompt": {"exact_match": 0.42, "token_f1": 0.5, "num_examples": 50}}
    push_transferred_prompt(model, "alice/gen-prompt", token=TOKEN, private=False, base_model="org/tiny-llama",
                            evaluation=evaluation)
    card = fake_hub.repos["alice/gen-prompt"].files["README.md"].decode()
    assert "Generation: each input" in card and "exact match and token F1" in card
    assert "| model / prompt | exact match |" in card and "| POST transferred prompt | 42.00% | 50 |" in card
    assert "label words" not in card.split("## Task")[1].split("##")[0]
    namespace = {}
    exec(compile(snippet_of(card), "model-card-snippet", "exec"), namespace)
    config = model.peft_config["default"]
    expected = generate_answers(model, tokenizer, [namespace["text"]], TaskTemplate.from_config(config, tokenizer),
                                max_new_tokens=4)[0]
    assert namespace["out"][0, namespace["inputs"].input_ids.shape[1]:].tolist()[: len(expected)] == expected
