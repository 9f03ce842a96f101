"""Zero-shot QA accuracy through the real lm-eval harness, on local files only.

Usage::

    from flatquant.qa import evaluate_qa
    scores = evaluate_qa(model, tokenizer, ["piqa", "arc_easy", "winogrande"], limit=100)
    # {"piqa": 0.61, "arc_easy": 0.52, "winogrande": 0.53, "average": 0.553...}

Why this shape: FlatQuant (Sun et al. 2024, Table 2) reports zero-shot accuracy from
EleutherAI's lm-evaluation-harness. No machine here reaches a hub, so every task is an
lm-eval ``ConfigurableTask`` built from a config dict whose ``custom_dataset`` reads the
local files (``data_root`` is a runtime value; nothing goes through ``datasets.load_dataset``)
and whose prompts copy lm-eval's own task yamls. The model goes through lm-eval's ``HFLM``
with the in-process instance, so tokenization (context/continuation split), left
truncation, batching, the ``acc`` / ``acc_norm`` rules and LAMBADA's greedy match are
lm-eval's own code, not a re-implementation that could drift from published numbers.

``hellaswag_llamacpp`` is NOT lm-eval's ``hellaswag``: the only local copy is llama.cpp's
preprocessed text (``activity_label: ctx`` already joined, ``ctx_b`` not capitalized), so
its numbers are close to, but not comparable with, lm-eval ``hellaswag``.
"""

from __future__ import annotations

import bz2
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DATA_ENV = "FLATQUANT_DATA"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data root: the argument, else $FLATQUANT_DATA, else ../shared/data beside the repo."""
    if data_root is None:
        data_root = os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT
    return Path(data_root)


# ---------------------------------------------------------------- local file readers
# Each returns docs in the schema of the Hugging Face dataset lm-eval's yaml reads, so the
# yaml's templates apply unchanged.


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split()


def _piqa(folder: Path) -> list[dict]:
    rows, labels = _jsonl(folder / "valid.jsonl"), _labels(folder / "valid-labels.lst")
    if len(rows) != len(labels):
        raise ValueError(f"piqa: {len(rows)} rows in valid.jsonl but {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(rows, labels)]


def _arc(file_name: str, folder: Path) -> list[dict]:
    """AI2's jsonl (question.stem, question.choices[{text,label}], answerKey) → HF ai2_arc."""
    docs = []
    for r in _jsonl(folder / file_name):
        choices = r["question"]["choices"]
        docs.append({"id": r["id"], "question": r["question"]["stem"],
                     "choices": {"text": [c["text"] for c in choices],
                                 "label": [c["label"] for c in choices]},
                     "answerKey": r["answerKey"]})
    return docs


def _winogrande(folder: Path) -> list[dict]:
    keys = ("sentence", "option1", "option2", "answer")
    return [{k: r[k] for k in keys} for r in _jsonl(folder / "dev.jsonl")]


def _lambada(folder: Path) -> list[dict]:
    return [{"text": r["text"]} for r in _jsonl(folder / "lambada_test.jsonl")]


def _hellaswag_llamacpp(folder: Path) -> list[dict]:
    """llama.cpp's text form: per task 6 lines, `activity_label: ctx`, gold index, 4 endings."""
    with bz2.open(folder / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag_llamacpp: {len(lines)} lines, not a multiple of 6")
    return [{"query": lines[i], "choices": lines[i + 2:i + 6], "label": int(lines[i + 1])}
            for i in range(0, len(lines), 6)]


# ---------------------------------------------------------------- winogrande prompt
# lm-eval's partial evaluation (tasks/winogrande/preprocess_winogrande.py): the option goes
# into the sentence prefix (one context per option); the shared suffix is scored.


def _wino_gold(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def _wino_suffix(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def _wino_contexts(doc: dict) -> list[str]:
    prefix = doc["sentence"][:doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]


# ---------------------------------------------------------------- task table


@dataclass(frozen=True)
class QATask:
    """One local task: where its files lie, how to read them, the lm-eval config fields."""

    folder: str
    files: tuple[str, ...]
    read: Callable[[Path], list[dict]]
    split: str  # the split lm-eval's own task evaluates
    fields: dict[str, Any]

    @property
    def metric(self) -> str:
        names = [m["metric"] for m in self.fields["metric_list"]]
        return "acc_norm" if "acc_norm" in names else "acc"


_ARC_FIELDS = {"output_type": "multiple_choice",
               "doc_to_text": "Question: {{question}}\nAnswer:",
               "doc_to_target": "{{choices.label.index(answerKey)}}",
               "doc_to_choice": "{{choices.text}}",
               "metric_list": [_ACC, _ACC_NORM]}

TASKS: dict[str, QATask] = {
    "piqa": QATask("piqa", ("valid.jsonl", "valid-labels.lst"), _piqa, "validation",
                   {"output_type": "multiple_choice",
                    "doc_to_text": "Question: {{goal}}\nAnswer:",
                    "doc_to_target": "label",
                    "doc_to_choice": "{{[sol1, sol2]}}",
                    "metric_list": [_ACC, _ACC_NORM]}),
    "arc_easy": QATask("arc_easy", ("ARC-Easy-Test.jsonl",),
                       functools.partial(_arc, "ARC-Easy-Test.jsonl"), "test", _ARC_FIELDS),
    "arc_challenge": QATask("arc_challenge", ("ARC-Challenge-Test.jsonl",),
                            functools.partial(_arc, "ARC-Challenge-Test.jsonl"), "test",
                            _ARC_FIELDS),
    "winogrande": QATask("winogrande", ("dev.jsonl",), _winogrande, "validation",
                         {"output_type": "multiple_choice",
                          "doc_to_text": _wino_gold,
                          "doc_to_target": _wino_suffix,
                          "doc_to_choice": _wino_contexts,
                          "metric_list": [_ACC]}),
    "lambada_openai": QATask("lambada_openai", ("lambada_test.jsonl",), _lambada, "test",
                             {"output_type": "loglikelihood",
                              "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                              "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                              "metric_list": [_ACC]}),
    "hellaswag_llamacpp": QATask("hellaswag_derived_llamacpp", ("hellaswag_val_full.txt.bz2",),
                                 _hellaswag_llamacpp, "validation",
                                 {"output_type": "multiple_choice",
                                  "doc_to_text": "{{query}}",
                                  "doc_to_target": "{{label}}",
                                  "doc_to_choice": "choices",
                                  "metric_list": [_ACC, _ACC_NORM]}),
}


def _task(name: str) -> QATask:
    if name not in TASKS:
        raise ValueError(f"unknown QA task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_docs(name: str, data_root: str | Path | None = None) -> list[dict]:
    """The task's docs from local files, in the schema of lm-eval's HF dataset."""
    return _task(name).read(_checked_folder(name, resolve_data_root(data_root)))


def _checked_folder(name: str, root: Path) -> Path:
    """root/<task folder>, after checking that every file the task reads is there."""
    spec = _task(name)
    folder = root / spec.folder
    for file_name in spec.files:
        if not (folder / file_name).is_file():
            raise FileNotFoundError(
                f"QA task {name!r}: missing data file {folder / file_name} "
                f"(set data_root or ${DATA_ENV} to the folder holding {spec.folder}/)")
    return folder


def _dataset(name: str, root: Path, **_metadata: Any):
    """lm-eval's custom_dataset hook (it passes task metadata as keywords; unused)."""
    import datasets

    return datasets.DatasetDict({TASKS[name].split: datasets.Dataset.from_list(load_docs(name, root))})


def task_config(name: str, data_root: str | Path | None = None) -> dict[str, Any]:
    """An lm-eval task config dict (zero-shot) reading `name` from `data_root`."""
    spec = _task(name)
    return {"task": name, "custom_dataset": functools.partial(_dataset, name, resolve_data_root(data_root)),
            f"{spec.split}_split": spec.split, "num_fewshot": 0, "metadata": {"version": 1.0},
            **spec.fields}


# ---------------------------------------------------------------- running


def run_lm_eval(model, tokenizer, tasks: list[str], data_root=None, limit: int | None = None,
                batch_size: int = 8, device=None, max_length: int = 2048,
                log_samples: bool = False) -> dict:
    """lm-eval's raw result dict (``results``, ``n-samples``, ``samples`` if asked) for `tasks`.

    `model`: an in-process causal LM whose forward(input_ids) returns `.logits`
    (batch, seq, vocab); `device`, when given, moves it there in place.
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = list(dict.fromkeys(tasks))
    if not names:
        raise ValueError(f"no QA task given; known tasks: {', '.join(TASKS)}")
    root = resolve_data_root(data_root)
    for name in names:  # fail on a bad name or a missing file before any model work
        _checked_folder(name, root)
    task_objs = [ConfigurableTask(config=task_config(name, root)) for name in names]

    if device is not None:
        model.to(device)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = head.weight if head is not None else None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal",
              batch_size=batch_size, max_length=max_length)
    if head is not None and head.weight is not head_weight:
        head.weight = head_weight  # HFLM calls tie_weights(); evaluate the model as given
    return simple_evaluate(model=lm, tasks=task_objs, task_manager=TaskManager(include_defaults=False),
                           limit=limit, bootstrap_iters=0, log_samples=log_samples,
                           # zero-shot scoring draws no random numbers: leave the caller's RNGs alone
                           random_seed=None, numpy_random_seed=None, torch_random_seed=None)


def evaluate_qa(model, tokenizer, tasks: list[str], data_root=None, limit: int | None = None,
                batch_size: int = 8, device=None, max_length: int = 2048) -> dict[str, float]:
    """Zero-shot accuracy per task (acc_norm where the task defines it, else acc) and "average".

    `limit`: the first `limit` docs of each task (lm-eval's --limit). Raises ValueError for an
    unknown task and FileNotFoundError naming the task and file when a local file is absent.
    """
    out = run_lm_eval(model, tokenizer, tasks, data_root, limit, batch_size, device, max_length)
    scores = {name: float(out["results"][name][f"{_task(name).metric},none"])
              for name in dict.fromkeys(tasks)}
    scores["average"] = sum(scores.values()) / len(scores)
    return scores
