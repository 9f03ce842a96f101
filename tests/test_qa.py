"""flatquant.qa against a plain-torch recomputation, on hand-written items in the real formats.

The reference below parses the raw files itself and scores each continuation with the model
directly, following lm-eval's rules: whole = encode(context + continuation), the continuation
tokens are whole[len(encode(context)):], trailing spaces of the context move to the
continuation; acc = argmax of summed log-probs, acc_norm = argmax of the sum divided by the
character length of the choice (lm-eval's `completion_len`, = bytes for ASCII text).
"""

from __future__ import annotations

import bz2
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from flatquant import qa  # noqa: E402

DATA = Path(__file__).parent / "data" / "qa"
ALL_TASKS = list(qa.TASKS)
REAL_ROWS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
             "lambada_openai": 5153, "hellaswag_llamacpp": 10042}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- reference items
# Each item: (list of (context, continuation)), gold index, choice strings for acc_norm.


def _ref_items(task: str, root: Path = DATA) -> list[tuple[list[tuple[str, str]], int, list[str]]]:
    if task == "piqa":
        labels = (root / "piqa/valid-labels.lst").read_text().split()
        return [([(f"Question: {r['goal']}\nAnswer:", " " + s) for s in (r["sol1"], r["sol2"])],
                 int(y), [r["sol1"], r["sol2"]])
                for r, y in zip(_jsonl(root / "piqa/valid.jsonl"), labels)]
    if task in ("arc_easy", "arc_challenge"):
        name = {"arc_easy": "ARC-Easy-Test.jsonl", "arc_challenge": "ARC-Challenge-Test.jsonl"}[task]
        items = []
        for r in _jsonl(root / task / name):
            texts = [c["text"] for c in r["question"]["choices"]]
            gold = [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])
            items.append(([(f"Question: {r['question']['stem']}\nAnswer:", " " + t) for t in texts],
                          gold, texts))
        return items
    if task == "winogrande":
        items = []
        for r in _jsonl(root / "winogrande/dev.jsonl"):
            cut = r["sentence"].index("_")
            suffix = " " + r["sentence"][cut + 1:].strip()
            items.append(([(r["sentence"][:cut] + o, suffix) for o in (r["option1"], r["option2"])],
                          int(r["answer"]) - 1, []))
        return items
    if task == "lambada_openai":
        return [([(" ".join(r["text"].split(" ")[:-1]), " " + r["text"].split(" ")[-1])], 0, [])
                for r in _jsonl(root / "lambada_openai/lambada_test.jsonl")]
    assert task == "hellaswag_llamacpp"
    with bz2.open(root / "hellaswag_derived_llamacpp/hellaswag_val_full.txt.bz2", "rt") as f:
        lines = f.read().splitlines()
    return [([(lines[i], " " + e) for e in lines[i + 2:i + 6]], int(lines[i + 1]), lines[i + 2:i + 6])
            for i in range(0, len(lines), 6)]


@torch.no_grad()
def _score(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | context), every token the argmax)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    target = torch.tensor(whole[n_ctx:])
    rows = logp[n_ctx - 1:len(whole) - 1]
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def _reference(model, tok, task: str, root: Path = DATA) -> tuple[float, list[list[float]]]:
    """(the task's metric as lm-eval defines it, per-item log-likelihoods)."""
    hits, lls_all = [], []
    for pairs, gold, choices in _ref_items(task, root):
        scored = [_score(model, tok, c, x) for c, x in pairs]
        lls = [ll for ll, _ in scored]
        lls_all.append(lls)
        if task == "lambada_openai":
            hits.append(float(scored[0][1]))
        elif qa.TASKS[task].metric == "acc_norm":
            norm = [ll / len(ch) for ll, ch in zip(lls, choices)]
            hits.append(float(max(range(len(norm)), key=norm.__getitem__) == gold))
        else:
            hits.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
    return sum(hits) / len(hits), lls_all


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on the test items, so every byte of any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [line for p in DATA.rglob("*.jsonl") for line in p.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- tests


def test_accuracy_matches_plain_torch(model, tokenizer):
    got = qa.evaluate_qa(model, tokenizer, ALL_TASKS, data_root=DATA, batch_size=3)
    raw = qa.run_lm_eval(model, tokenizer, ALL_TASKS, data_root=DATA, batch_size=3, log_samples=True)
    for task in ALL_TASKS:
        want, lls = _reference(model, tokenizer, task)
        assert got[task] == want, task
        samples = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(lls) == 5, task
        for s, ref in zip(samples, lls):
            harness = [float(r[0]) for r in s["filtered_resps"]]
            assert harness == pytest.approx(ref, abs=1e-4), (task, s["doc_id"])
    assert got["average"] == pytest.approx(sum(got[t] for t in ALL_TASKS) / len(ALL_TASKS))
    assert set(got) == {*ALL_TASKS, "average"}


@torch.no_grad()
def test_lambada_greedy_hits(model, tokenizer, tmp_path):
    """Texts ending in the model's own greedy next word: acc must count them as hits."""
    rows = _jsonl(DATA / "lambada_openai/lambada_test.jsonl")
    texts = [r["text"] for r in rows[:2]]
    for r in rows:
        words = r["text"].split(" ")
        for k in range(3, len(words)):
            context = " ".join(words[:k])
            ids = tokenizer.encode(context)
            best = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            word = tokenizer.decode([best])
            if word[:1] == " " and word[1:].isalpha() and tokenizer.encode(context + word) == ids + [best]:
                texts.append(context + word)
                break
    (tmp_path / "lambada_openai").mkdir()
    (tmp_path / "lambada_openai/lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts))
    want, _ = _reference(model, tokenizer, "lambada_openai", tmp_path)
    assert want >= 0.4
    assert qa.evaluate_qa(model, tokenizer, ["lambada_openai"], data_root=tmp_path)["lambada_openai"] == want


def test_tied_head_left_as_given(tokenizer):
    """HFLM calls tie_weights(); a head untied after loading (e.g. a fused norm) must survive."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    tied = transformers.LlamaForCausalLM(cfg).eval()
    head = torch.nn.Parameter(tied.lm_head.weight.detach() * 3.0)
    tied.lm_head.weight = head
    qa.evaluate_qa(tied, tokenizer, ["piqa"], data_root=DATA, limit=1)
    assert tied.lm_head.weight is head


def test_limit_and_single_task(model, tokenizer):
    out = qa.run_lm_eval(model, tokenizer, ["arc_easy"], data_root=DATA, limit=2)
    assert out["n-samples"]["arc_easy"] == {"original": 5, "effective": 2}


def test_docs_follow_lm_eval_schema():
    arc = qa.load_docs("arc_easy", DATA)
    assert arc[2]["choices"]["label"] == ["1", "2", "3", "4"] and arc[2]["answerKey"] == "1"
    hs = qa.load_docs("hellaswag_llamacpp", DATA)
    assert len(hs) == 5 and len(hs[0]["choices"]) == 4 and hs[0]["label"] == 1


def test_unknown_task_lists_known(model, tokenizer):
    with pytest.raises(ValueError, match=r"unknown QA task 'hellaswag'.*piqa.*hellaswag_llamacpp"):
        qa.evaluate_qa(model, tokenizer, ["hellaswag"], data_root=DATA)


def test_missing_file_names_task_and_file(model, tokenizer, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_text((DATA / "piqa/valid.jsonl").read_text())
    with pytest.raises(FileNotFoundError, match=r"'piqa'.*valid-labels\.lst"):
        qa.evaluate_qa(model, tokenizer, ["piqa"], data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'winogrande'.*dev\.jsonl"):
        qa.load_docs("winogrande", tmp_path)


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(qa.DATA_ENV, str(tmp_path))
    assert qa.resolve_data_root() == tmp_path
    assert qa.resolve_data_root(DATA) == DATA
    monkeypatch.delenv(qa.DATA_ENV)
    assert qa.resolve_data_root() == Path(qa.__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.slow
def test_real_data_limit_20(model, tokenizer):
    root = qa.resolve_data_root()
    if not (root / "piqa").is_dir():
        pytest.skip(f"real data not at {root}")
    for task, rows in REAL_ROWS.items():
        assert len(qa.load_docs(task, root)) == rows, task
    out = qa.run_lm_eval(model, tokenizer, ALL_TASKS, data_root=root, limit=20)
    for task in ALL_TASKS:
        assert out["n-samples"][task] == {"original": REAL_ROWS[task], "effective": 20}, task
        assert 0.0 <= out["results"][task][f"{qa.TASKS[task].metric},none"] <= 1.0, task
