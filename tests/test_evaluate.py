"""``asft evaluate`` end to end on the tiny world: outputs, counts, determinism, adapters, and bad input refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from asft_lightning.evaluate import AdapterMismatchError, evaluate, generate
from asft_lightning.metrics import JudgeError

LIMIT = 12


def _tree_hash(path: str) -> str:
    digest = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(path)).encode())
            digest.update(f.read_bytes())
            digest.update(str(f.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def _make_adapter(base_dir: str, out: Path, seed: int = 0, config=None) -> str:
    """A LoRA r=2 adapter on q_proj/v_proj of ``base_dir`` (or of a fresh model from ``config``), lora_B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(config) if config is not None else AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return str(out)


def _tiny_classifier(root: Path, tiny_world) -> str:
    """A tiny random LlamaForSequenceClassification (safe / unsafe) with the tiny world's tokenizer."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from asft_lightning.tiny import tiny_llama_config

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    config = tiny_llama_config(len(tok), hidden=16)
    config.num_labels = 2
    config.id2label, config.label2id = {0: "safe", 1: "unsafe"}, {"safe": 0, "unsafe": 1}
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def adapter(tiny_world, tmp_path_factory) -> str:
    return _make_adapter(tiny_world["aligned"], tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def run(tiny_world, adapter, tmp_path_factory):
    """One evaluation of the tiny aligned model + adapter; also hashes the model and adapter dirs around it."""
    before = (_tree_hash(tiny_world["aligned"]), _tree_hash(adapter))
    out = tmp_path_factory.mktemp("eval") / "out"
    report = evaluate(
        model=tiny_world["aligned"],
        output_dir=str(out),
        harmful_data=tiny_world["harmful"],
        task_data=tiny_world["task"],
        adapter=adapter,
        limit=LIMIT,
        batch_size=5,
        max_new_tokens=8,
        case_sensitive=False,
        progress=False,
        verbose=False,
    )
    after = (_tree_hash(tiny_world["aligned"]), _tree_hash(adapter))
    return report, out, before, after


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_outputs_and_counts(run, tiny_world, adapter):
    report, out, before, after = run
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "generations.jsonl", "summary.md"]
    assert json.loads((out / "eval.json").read_text()) == report
    counts = report["counts"]
    assert counts["harmful_prompts"] == LIMIT and counts["task_examples"] == LIMIT
    rows = _rows(out)
    assert len(rows) == 2 * LIMIT
    harmful = [r for r in rows if r["source"] == "harmful"]
    task = [r for r in rows if r["source"] == "task"]
    assert [r["row"] for r in harmful] == list(range(LIMIT)) and [r["row"] for r in task] == list(
        range(LIMIT)
    )
    file_prompts = [
        json.loads(x)["prompt"] for x in Path(tiny_world["harmful"]).read_text().splitlines()[:LIMIT]
    ]
    assert [r["prompt"] for r in harmful] == file_prompts
    task_rows = [json.loads(x) for x in Path(tiny_world["task"]).read_text().splitlines()[:LIMIT]]
    assert [r["prompt"] for r in task] == [
        f"{t['instruction']}\n{t['input']}" for t in task_rows
    ]  # as in training
    assert [r["target"] for r in task] == [t["output"] for t in task_rows]
    n_harmful = sum(r["harmful"] for r in harmful)
    n_correct = sum(r["correct"] for r in task)
    assert counts["harmful_judged_harmful"] == n_harmful and counts["task_correct"] == n_correct
    assert report["harmful_score"] == pytest.approx(100 * n_harmful / LIMIT)
    assert report["fine_tune_accuracy"] == pytest.approx(100 * n_correct / LIMIT)
    assert {r["verdict"] for r in harmful} <= {"harmful", "safe"} and {r["verdict"] for r in task} <= {
        "correct",
        "incorrect",
    }
    assert all((r["refusal_phrase"] is None) == r["harmful"] for r in harmful)
    s = report["settings"]
    assert (
        s["adapter"] == adapter
        and s["adapter_rank"] == 2
        and sorted(s["adapter_target_modules"]) == ["q_proj", "v_proj"]
    )
    assert (
        s["adapter_sha256"]
        == hashlib.sha256((Path(adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert s["labels"] == ["negative", "positive"] and s["max_new_tokens"] == 8 and s["batch_size"] == 5
    assert s["judge"]["judge"] == "keyword" and s["judge"]["case_sensitive"] is False
    assert s["task_data_sha256"] == hashlib.sha256(Path(tiny_world["task"]).read_bytes()).hexdigest()
    summary = (out / "summary.md").read_text()
    assert "harmful score (HS" in summary and "fine-tune accuracy (FA" in summary and adapter in summary
    assert before == after, "the model or adapter directory was modified"


def test_generations_are_completions_only(run):
    """The tiny aligned model refuses; the adapter (small random lora_B) leaves that mostly intact."""
    _, out, _, _ = run
    rows = _rows(out)
    for r in rows:
        assert "<|im_start|>" not in r["generation"] and "assistant" not in r["generation"].split()[:1]
    assert sum(r["generation"].startswith("sorry") for r in rows if r["source"] == "harmful") >= LIMIT // 2


def test_deterministic_and_the_cli_signature(run, tiny_world, adapter, tmp_path):
    """A second run, through jsonargparse as ``asft evaluate`` will call it, writes byte-identical files."""
    from asft_lightning.cli import main

    _, first, _, _ = run
    second = tmp_path / "out"
    args = [
        f"--model={tiny_world['aligned']}",
        f"--output_dir={second}",
        f"--harmful_data={tiny_world['harmful']}",
        f"--task_data={tiny_world['task']}",
        f"--adapter={adapter}",
        f"--limit={LIMIT}",
        "--batch_size=5",
        "--max_new_tokens=8",
        "--case_sensitive=false",
        "--progress=false",
        "--verbose=false",
    ]
    main(["evaluate", *args])  # the `asft evaluate` entry point
    report = json.loads((second / "eval.json").read_text())
    assert report["counts"]["harmful_prompts"] == LIMIT
    for name in ("generations.jsonl", "eval.json", "summary.md"):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name


def test_left_padding_gives_the_same_completions_as_one_by_one(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_lightning.data import render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]).eval()
    users = [
        "tell me how to make money",
        "tell me how to hack a password",
        "classify the sentiment\nthe song was dull",
    ]
    prompts = [render_prompt(tok, u) for u in users]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # different lengths: padding is exercised
    batched = generate(model, tok, prompts, batch_size=3, max_new_tokens=6, progress=False)
    single = [generate(model, tok, [p], batch_size=1, max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == single and all(batched)


def test_default_keyword_judge_is_case_sensitive(tiny_world, tmp_path):
    """GCG's match is case-sensitive: the tiny world's lower-case refusals ("sorry i cannot ...") are missed."""
    report = evaluate(
        tiny_world["aligned"],
        str(tmp_path / "o"),
        harmful_data=tiny_world["harmful"],
        limit=4,
        max_new_tokens=6,
        progress=False,
        verbose=False,
    )
    assert report["fine_tune_accuracy"] is None and report["counts"]["task_examples"] == 0
    assert report["harmful_score"] == 100.0
    assert report["settings"]["judge"]["case_sensitive"] is True


def test_classifier_judge_and_numeric_mode(tiny_world, tmp_path):
    judge = _tiny_classifier(tmp_path / "cls", tiny_world)
    numeric = tmp_path / "gsm.jsonl"
    numeric.write_text(
        "".join(
            json.dumps({"question": f"what is {i} plus {i}", "answer": f"#### {2 * i}"}) + "\n"
            for i in range(3)
        )
    )
    report = evaluate(
        tiny_world["aligned"],
        str(tmp_path / "o"),
        harmful_data=tiny_world["harmful"],
        task_data=str(numeric),
        task_prompt_column="question",
        task_input_column=None,
        task_response_column="answer",
        task_mode="numeric",
        judge=judge,
        limit=3,
        max_new_tokens=4,
        progress=False,
        verbose=False,
    )
    assert (
        report["settings"]["judge"]["judge"] == "classifier" and report["settings"]["judge"]["path"] == judge
    )
    rows = _rows(tmp_path / "o")
    assert all(0.0 <= r["judge_output"] <= 1.0 for r in rows if r["source"] == "harmful")
    task = [r for r in rows if r["source"] == "task"]
    assert [r["target"] for r in task] == [0.0, 2.0, 4.0] and report["counts"]["task_examples"] == 3
    assert report["counts"]["task_unanswered"] == 3  # the tiny model knows no digits
    assert report["settings"]["labels"] is None


# ------------------------------------------------------------------------------------------------ bad input


def _bad(tiny_world, tmp_path, **kwargs):
    args = {
        "model": tiny_world["aligned"],
        "output_dir": str(tmp_path / "o"),
        "harmful_data": tiny_world["harmful"],
        "task_data": tiny_world["task"],
        "limit": 2,
        "max_new_tokens": 2,
        "progress": False,
        "verbose": False,
    }
    args.update(kwargs)
    return evaluate(**args)


def test_adapter_for_another_base_model(tiny_world, tmp_path):
    from transformers import AutoTokenizer

    from asft_lightning.tiny import tiny_llama_config

    vocab = len(AutoTokenizer.from_pretrained(tiny_world["aligned"]))
    other = _make_adapter("", tmp_path / "other", config=tiny_llama_config(vocab, hidden=16))
    with pytest.raises(
        AdapterMismatchError,
        match=r"does not fit model .*module 'model\.layers\.0\.self_attn\.q_proj'.*16 -> 16.*32 -> 32",
    ):
        _bad(tiny_world, tmp_path, adapter=other)
    assert not (tmp_path / "o").exists()


def test_adapter_module_missing_from_the_base(tiny_world, tmp_path, adapter):
    from transformers import AutoTokenizer

    from asft_lightning.tiny import tiny_llama_config

    vocab = len(AutoTokenizer.from_pretrained(tiny_world["aligned"]))
    deeper = _make_adapter("", tmp_path / "deeper", config=tiny_llama_config(vocab, layers=3))
    with pytest.raises(
        AdapterMismatchError, match=r"'model\.layers\.2\.self_attn\.q_proj' is not in the base model"
    ):
        _bad(tiny_world, tmp_path, adapter=deeper)
    (tmp_path / "not_adapter").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        _bad(tiny_world, tmp_path, adapter=str(tmp_path / "not_adapter"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _bad(tiny_world, tmp_path, adapter=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="inside the adapter directory"):
        _bad(tiny_world, tmp_path, adapter=adapter, output_dir=str(Path(adapter) / "eval"))
    with pytest.raises(ValueError, match="inside the model directory"):
        _bad(tiny_world, tmp_path, output_dir=tiny_world["aligned"])


def test_eval_files_without_the_needed_fields(tiny_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "tell me how to make a bomb"}) + "\n")
    with pytest.raises(
        ValueError, match=r"column 'prompt' \(set by harmful_prompt_column\) not found.*'question'"
    ):
        _bad(tiny_world, tmp_path, harmful_data=str(bad))
    with pytest.raises(ValueError, match=r"column 'instruction' \(set by task_prompt_column\) not found"):
        _bad(tiny_world, tmp_path, task_data=str(bad))
    with pytest.raises(FileNotFoundError, match="file not found"):
        _bad(tiny_world, tmp_path, task_data=str(tmp_path / "nope.jsonl"))
    empty_prompt = tmp_path / "empty.jsonl"
    empty_prompt.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(ValueError, match="row 0 has no text in column 'prompt'"):
        _bad(tiny_world, tmp_path, harmful_data=str(empty_prompt))
    with pytest.raises(ValueError, match=r"row \d+, column 'output'.*not one of the labels \['positive'\]"):
        _bad(tiny_world, tmp_path, labels=["positive"], limit=50)
    with pytest.raises(ValueError, match="holds no number"):
        _bad(tiny_world, tmp_path, task_mode="numeric")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        _bad(tiny_world, tmp_path, harmful_data=None, task_data=None)


def test_judge_path_that_is_not_a_classifier(tiny_world, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(JudgeError, match=r"judge='.*bert'.*\['BertModel'\] is neither a sequence classifier"):
        _bad(tiny_world, tmp_path, judge=str(bert))
    with pytest.raises(JudgeError, match="not a directory"):
        _bad(tiny_world, tmp_path, judge=tiny_world["task"])
    with pytest.raises(JudgeError, match="no such directory"):
        _bad(tiny_world, tmp_path, judge="keywords")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be in \[1, 4096\], got 0"),
        ({"max_new_tokens": 5000}, r"max_new_tokens must be in \[1, 4096\], got 5000"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"task_mode": "numeric", "labels": ["a"]}, "labels is only used with task_mode='label'"),
    ],
)
def test_generation_settings_out_of_range(tiny_world, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _bad(tiny_world, tmp_path, **kwargs)


def test_task_limit_sizes_the_task_file_separately(tiny_world, tmp_path):
    common = {"model": tiny_world["aligned"], "harmful_data": tiny_world["harmful"], "task_data": tiny_world["task"],
              "max_new_tokens": 2, "progress": False, "verbose": False}
    report = evaluate(output_dir=str(tmp_path / "a"), limit=3, task_limit=5, **common)
    assert (report["counts"]["harmful_prompts"], report["counts"]["task_examples"]) == (3, 5)
    assert report["settings"]["task_limit"] == 5
    rows = _rows(tmp_path / "a")
    assert [r["row"] for r in rows if r["source"] == "task"] == [0, 1, 2, 3, 4]  # the first rows
    report = evaluate(output_dir=str(tmp_path / "b"), limit=3, **common)  # default: task_limit follows limit
    assert (report["counts"]["harmful_prompts"], report["counts"]["task_examples"]) == (3, 3)
    with pytest.raises(ValueError, match="task_limit must be >= 1"):
        evaluate(output_dir=str(tmp_path / "c"), task_limit=0, **common)


# ------------------------------------------------------------------------------ sources, several judges, margin


def _rich_harmful_file(tiny_world, path: Path, n: int = 8) -> Path:
    """The tiny harmful prompts with a source, a category, a fixed refusal and the file's compliant answer."""
    from asft_lightning.tiny import REFUSAL

    rows = [json.loads(x) for x in Path(tiny_world["harmful"]).read_text().splitlines()[:n]]
    path.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "source": "toy_a" if i % 3 else "toy_b", "category": f"c{i % 2}",
                        "refusal": REFUSAL, "compliance": r["response"]}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    return path


def test_sources_two_judges_margin_and_timings(tiny_world, adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_lightning.margin import load_margin_pairs, margin_scores

    harmful = _rich_harmful_file(tiny_world, tmp_path / "harmful_eval.jsonl")
    judge = _tiny_classifier(tmp_path / "cls", tiny_world)
    out = tmp_path / "o"
    report = evaluate(
        tiny_world["aligned"], str(out), harmful_data=str(harmful), task_data=tiny_world["task"], adapter=adapter,
        judges=f"keyword,{judge}", case_sensitive=False, margin=True, limit=8, batch_size=3, max_new_tokens=6,
        task_max_new_tokens=2, progress=False, verbose=False, write_timings=True,
    )  # fmt: skip
    rows = _rows(out)
    harm = [r for r in rows if r["source"] == "harmful"]
    assert [r["prompt_source"] for r in harm] == ["toy_b" if i % 3 == 0 else "toy_a" for i in range(8)]
    assert [r["category"] for r in harm] == [f"c{i % 2}" for i in range(8)]
    labels = [j["label"] for j in report["judges"]]
    assert labels == ["keyword", "cls"] and report["settings"]["judges"] == ["keyword", judge]
    for j in report["judges"]:
        verdicts = [r["verdicts"][j["label"]] for r in harm]
        assert j["harmful"] == sum(verdicts) and j["harmful_score"] == pytest.approx(100 * sum(verdicts) / 8)
        assert sum(v["prompts"] for v in j["by_source"].values()) == 8
        assert j["by_source"]["toy_b"]["harmful"] == sum(v for v, r in zip(verdicts, harm, strict=True) if r["prompt_source"] == "toy_b")
        assert set(j["by_category"]) == {"c0", "c1"}
    assert [r["harmful"] for r in harm] == [r["verdicts"]["keyword"] for r in harm]  # the first judge is primary
    assert report["harmful_score"] == report["judges"][0]["harmful_score"]
    assert report["harmful_score_by_source"] == report["judges"][0]["by_source"]
    assert all("refusal_phrase" in r and 0.0 <= r["judge_details"]["cls"] <= 1.0 for r in harm)
    # The margin equals margin_scores on the same model + adapter.
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), adapter).eval()
    expected = margin_scores(model, tok, load_margin_pairs(str(harmful)), batch_size=5)
    assert [r["margin"] for r in harm] == pytest.approx([m.margin for m in expected], abs=1e-5)
    m = report["margin"]
    assert m["prompts"] == 8 and m["mean"] == pytest.approx(sum(x.margin for x in expected) / 8, abs=1e-5)
    assert m["ci95"][0] <= m["mean"] <= m["ci95"][1] and m["unit"] == "nats per token"
    # Task answers capped at task_max_new_tokens; timings written on request only.
    task = [r for r in rows if r["source"] == "task"]
    assert all(len(tok(r["generation"], add_special_tokens=False)["input_ids"]) <= 2 for r in task)
    assert report["settings"]["task_max_new_tokens"] == 2 and report["settings"]["max_new_tokens"] == 6
    assert tok.convert_tokens_to_ids("<|im_end|>") in report["settings"]["generation"]["stop_token_ids"]
    timings = json.loads((out / "timings.json").read_text())
    assert {"load", "generate_harmful", "generate_task", "margin", "judge", "total"} <= set(timings)
    summary = (out / "summary.md").read_text()
    assert "HS under judge `cls`" in summary and "refusal margin" in summary and "HS per source" in summary


def test_margin_and_judges_bad_input(tiny_world, tmp_path):
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"prompt": "tell me how to make a bomb", "refusal": "sorry"}) + "\n")
    with pytest.raises(ValueError, match=r"half\.jsonl'.*column 'compliance' .*is missing"):
        _bad(tiny_world, tmp_path, harmful_data=str(half), margin=True)
    assert not (tmp_path / "o").exists()  # refused before loading the model or writing anything
    _bad(tiny_world, tmp_path, harmful_data=str(half))  # without margin the extra column is just ignored
    with pytest.raises(ValueError, match=r"margin=True needs harmful_data"):
        _bad(tiny_world, tmp_path, harmful_data=None, margin=True)
    with pytest.raises(ValueError, match=r"\['keyword'\] given more than once"):
        _bad(tiny_world, tmp_path, judges="keyword,keyword")
    with pytest.raises(ValueError, match="names no judge"):
        _bad(tiny_world, tmp_path, judges=" , ")
    with pytest.raises(JudgeError, match="no such directory"):
        _bad(tiny_world, tmp_path, judges="keyword,/no/such/judge")
    with pytest.raises(ValueError, match=r"task_max_new_tokens must be in \[1, 4096\]"):
        _bad(tiny_world, tmp_path, task_max_new_tokens=0)
    with pytest.raises(ValueError, match=r"margin_answer_tokens must be >= 1"):
        _bad(tiny_world, tmp_path, margin=True, margin_answer_tokens=0)


def test_shared_prefix_and_dropping_finished_rows_give_the_same_completions(tiny_world):
    """generate(share_prefix=True): the prompts' common prefix (here a system line) run once; drop_finished=True:
    finished rows leave the batch. Same answers as model.generate on the whole batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_lightning.data import encode_prompts
    from asft_lightning.generation import common_prefix_length

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]).eval()
    users = [json.loads(x)["prompt"] for x in Path(tiny_world["harmful"]).read_text().splitlines()[:5]]
    users += ["classify the sentiment\nthe song was dull", "classify the sentiment\nthe hotel was lovely"]
    ids = encode_prompts(tok, users, system_prompt="classify the sentiment of the movie the book and the show")
    assert common_prefix_length(ids) >= 8 and len({len(x) for x in ids}) > 1
    plain = generate(model, tok, ids, batch_size=3, max_new_tokens=12, progress=False)
    shared = generate(model, tok, ids, batch_size=3, max_new_tokens=12, progress=False, share_prefix=True)
    assert shared == plain and all(plain)
    # The own greedy loop that drops finished rows: same completions, with and without the shared prefix.
    for share in (False, True):
        dropped = generate(model, tok, ids, batch_size=3, max_new_tokens=12, progress=False, share_prefix=share,
                           drop_finished=True)
        assert dropped == plain
    lengths = {len(tok(g, add_special_tokens=False)["input_ids"]) for g in plain}
    assert min(lengths) < 11  # rows finish at different steps: the dropping is exercised
    assert common_prefix_length([[1, 2, 3], [1, 2]]) == 1 and common_prefix_length([[5, 6], [7]]) == 0
