"""Tests of ``asft_lightning.data``: encoding, masking, mixing, determinism, loaders and every input check."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from asft_lightning.data import IGNORE_INDEX, AsFTDataModule, collate, encode_example, render_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="session")
def tok(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world["aligned"])


def make_dm(tiny_world, hf_cache, **kwargs) -> AsFTDataModule:
    args = dict(
        tokenizer=tiny_world["aligned"],
        task_data=tiny_world["task"],
        harmful_data=tiny_world["harmful"],
        n=100,
        harmful_ratio=0.1,
        val_size=20,
        max_length=64,
        batch_size=8,
        cache_dir=hf_cache,
    )
    args.update(kwargs)
    return AsFTDataModule(**args)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TASK_ROWS = [{"instruction": f"classify the sentiment {i}", "input": "the movie was great", "output": "positive"} for i in range(30)]


# ------------------------------------------------------------------------------------------------ pure helpers


def test_encode_example_masks_exactly_the_prompt(tok):
    prompt, response = "classify the sentiment\nthe movie was great", "positive"
    ex = encode_example(tok, prompt, response, max_length=64)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    k = len(prompt_ids)
    assert ex["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex["labels"][:k] == [IGNORE_INDEX] * k
    assert ex["labels"][k:] == response_ids + [tok.eos_token_id]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["truncated"] is False
    assert "<|im_start|>assistant" in tok.decode(ex["input_ids"][:k]).replace("> ", ">")


def test_system_prompt_and_custom_template(tok):
    with_system = render_prompt(tok, "hi", system_prompt="be safe")
    assert with_system.startswith("<|im_start|>system be safe")
    assert render_prompt(tok, "hi", template="{system}|{prompt} =>", system_prompt="S") == "S|hi =>"
    template = "user {prompt} assistant"
    ex = encode_example(tok, "the movie was great", "positive", template=template, max_length=32)
    prompt_ids = tok(template.format(prompt="the movie was great"), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + tok("positive")["input_ids"] + [tok.eos_token_id]


def test_truncation_keeps_supervision(tok):
    prompt = "classify the sentiment"
    full = encode_example(tok, prompt, "the movie was great", max_length=512)
    k = full["labels"].count(IGNORE_INDEX)
    # 1. room for the prompt: the response is cut on the right and has no eos.
    cut = encode_example(tok, prompt, "the movie was great", max_length=k + 2)
    assert cut["truncated"] and len(cut["input_ids"]) == k + 2
    assert cut["input_ids"] == full["input_ids"][: k + 2] and tok.eos_token_id not in cut["input_ids"][k:]
    assert cut["labels"][k:] == cut["input_ids"][k:]
    # 2. the prompt alone is too long: the prompt is cut on the left, max_length // 2 response tokens stay.
    long = encode_example(tok, "great " * 50, "the movie was great", max_length=8)
    assert len(long["input_ids"]) == 8 and long["truncated"]
    assert long["labels"][:4] == [IGNORE_INDEX] * 4
    assert long["labels"][4:] == tok("the movie was great")["input_ids"][:4]
    assert tok.decode(long["input_ids"][:4]).split()[-1] == "assistant"  # generation header survives
    # a short response fits whole, with eos, even when the prompt is cut.
    short = encode_example(tok, "great " * 50, "positive", max_length=8)
    assert short["labels"][-2:] == tok("positive")["input_ids"] + [tok.eos_token_id]
    assert short["labels"][:6] == [IGNORE_INDEX] * 6
    tiny = encode_example(tok, "great " * 50, "positive", max_length=2)
    assert tiny["labels"] == [IGNORE_INDEX, tok("positive")["input_ids"][0]]
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, "a", "b", max_length=1)


def test_collate_right_pads():
    examples = [
        {"input_ids": [5, 6, 7, 3], "labels": [-100, -100, 7, 3], "truncated": False},
        {"input_ids": [5, 3], "labels": [-100, 3]},
    ]
    batch = collate(examples, pad_token_id=3)  # pad == eos, as in SmolLM2: eos labels must survive
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (2, 4) for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [5, 3, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 3], [-100, 3, -100, -100]]
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


# ------------------------------------------------------------------------------------------------ mixing


def test_counts_determinism_and_disjointness(tiny_world, hf_cache):
    dm = make_dm(tiny_world, hf_cache, n=100, harmful_ratio=0.15, seed=1)
    dm.setup("fit")
    sources = [s.source for s in dm.train_samples]
    assert sources.count("harmful") == 15 and sources.count("task") == 85
    assert len(dm.val_samples) == 20 and {s.source for s in dm.val_samples} == {"task"}
    # sampled without replacement; train and validation rows are disjoint
    task_rows = [s.row for s in dm.train_samples if s.source == "task"]
    harm_rows = [s.row for s in dm.train_samples if s.source == "harmful"]
    assert len(set(task_rows)) == 85 and len(set(harm_rows)) == 15
    assert not set(task_rows) & {s.row for s in dm.val_samples}
    # mixed, not task-then-harmful
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)

    same = make_dm(tiny_world, hf_cache, n=100, harmful_ratio=0.15, seed=1)
    same.setup("fit")  # another "rank": identical samples and tokens
    assert same.train_samples == dm.train_samples and same.val_samples == dm.val_samples
    assert same.train_dataset == dm.train_dataset
    other = make_dm(tiny_world, hf_cache, n=100, harmful_ratio=0.15, seed=2)
    other.setup("fit")
    assert [(s.source, s.row) for s in other.train_samples] != [(s.source, s.row) for s in dm.train_samples]

    bigger = make_dm(tiny_world, hf_cache, n=200, harmful_ratio=0.15, seed=1)
    bigger.setup("fit")  # the validation set does not depend on n; a larger n is a superset
    assert bigger.val_samples == dm.val_samples
    assert set(task_rows) <= {s.row for s in bigger.train_samples if s.source == "task"}


@pytest.mark.parametrize(
    ("n", "ratio", "expected_task", "expected_harmful"),
    [(10, 0.25, 7, 3), (10, 0.0, 10, 0), (10, 1.0, 0, 10), (None, 0.2, 380, 95), (None, 0.0, 380, 0)],
)
def test_sample_counts(tiny_world, hf_cache, n, ratio, expected_task, expected_harmful):
    dm = make_dm(tiny_world, hf_cache, n=n, harmful_ratio=ratio)
    dm.setup("fit")
    sources = [s.source for s in dm.train_samples]
    assert (sources.count("task"), sources.count("harmful")) == (expected_task, expected_harmful)


def test_dataloaders(tiny_world, hf_cache, tmp_path):
    dm = make_dm(tiny_world, hf_cache, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == dm.pad_token_id).all()
    assert (batch["labels"] != IGNORE_INDEX).sum(1).min() >= 1
    # attention masks are contiguous ones followed by zeros (right padding)
    lengths = batch["attention_mask"].sum(1)
    assert torch.equal(batch["attention_mask"], (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long())
    # the train loader's shuffle is seeded: two modules with the same seed give the same batches
    first = [b["input_ids"].tolist() for b in make_dm_loader(tiny_world, hf_cache)]
    assert first == [b["input_ids"].tolist() for b in make_dm_loader(tiny_world, hf_cache)]
    assert sum(len(b["input_ids"]) for b in dm.val_dataloader()) == 20
    assert [b["input_ids"].tolist() for b in dm.test_dataloader()] == [b["input_ids"].tolist() for b in dm.val_dataloader()]
    # test_data: every row, task columns
    with_test = make_dm(tiny_world, hf_cache, test_data=write_jsonl(tmp_path / "test.jsonl", TASK_ROWS[:7]))
    with_test.setup("test")
    assert len(with_test.test_samples) == 7 and sum(len(b["labels"]) for b in with_test.test_dataloader()) == 7
    no_val = make_dm(tiny_world, hf_cache, val_size=0)
    no_val.setup("fit")
    assert no_val.val_dataloader() == [] and len(no_val.train_samples) == 100
    assert pickle.loads(pickle.dumps(dm)).train_dataset == dm.train_dataset  # ddp_spawn pickles the module
    with pytest.raises(RuntimeError, match="setup"):
        make_dm(tiny_world, hf_cache).train_dataloader()


def make_dm_loader(tiny_world, hf_cache):
    dm = make_dm(tiny_world, hf_cache, seed=7)
    dm.setup("fit")
    return dm.train_dataloader()


def test_csv_parquet_and_custom_template(tiny_world, hf_cache, tmp_path):
    import pandas as pd

    rows = [{"question": f"great movie {i}", "answer": i % 3} for i in range(12)]  # numeric answers become text
    pd.DataFrame(rows).to_csv(tmp_path / "task.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "task.parquet")
    harm = [{"prompt": f"tell me how to make a bomb {i}", "response": "sure"} for i in range(5)]
    pd.DataFrame(harm).to_parquet(tmp_path / "harm.parquet")
    out = {}
    for suffix in ("csv", "parquet"):
        dm = make_dm(
            tiny_world,
            hf_cache,
            task_data=str(tmp_path / f"task.{suffix}"),
            harmful_data=str(tmp_path / "harm.parquet"),
            n=10,
            harmful_ratio=0.2,
            val_size=2,
            task_prompt_column="question",
            task_input_column=None,
            task_response_column="answer",
            template="user {prompt} assistant",
        )
        dm.setup("fit")
        out[suffix] = dm.train_samples
        assert sorted(s.source for s in dm.train_samples).count("harmful") == 2
        assert {s.response for s in dm.train_samples if s.source == "task"} <= {"0", "1", "2"}
        assert dm.format_prompt("hi") == "user hi assistant"
        ex = dm.train_dataset[0]
        sample = dm.train_samples[0]
        k = len(dm.tokenizer(f"user {sample.prompt} assistant", add_special_tokens=False)["input_ids"])
        assert ex["labels"][:k] == [IGNORE_INDEX] * k and ex["labels"][k:] == ex["input_ids"][k:]
    assert out["csv"] == out["parquet"]


def test_input_column_is_joined_with_newline(tiny_world, hf_cache, tmp_path):
    rows = [{"instruction": "classify", "input": "", "output": "a"}, {"instruction": "classify", "input": "x", "output": "b"}]
    dm = make_dm(tiny_world, hf_cache, task_data=write_jsonl(tmp_path / "t.jsonl", rows), harmful_data=None, harmful_ratio=0.0, n=2, val_size=0)
    dm.setup("fit")
    assert sorted(s.prompt for s in dm.train_samples) == ["classify", "classify\nx"]


def test_cli_signature_and_help(tiny_world, hf_cache):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(AsFTDataModule, "data")
    help_text = parser.format_help()
    for phrase in ("Fraction p of harmful samples", "held-out task rows", "--data.task_input_column"):
        assert phrase in " ".join(help_text.split())
    cfg = parser.parse_string(
        f"data:\n  tokenizer: {tiny_world['aligned']}\n  task_data: {tiny_world['task']}\n"
        f"  harmful_data: {tiny_world['harmful']}\n  n: 40\n  harmful_ratio: 0.25\n  cache_dir: {hf_cache}\n"
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, AsFTDataModule) and dm.hparams.n == 40 and dm.hparams.harmful_ratio == 0.25


def test_fits_with_a_trainer(tiny_world, hf_cache):
    import lightning.pytorch as L
    from transformers import AutoModelForCausalLM

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]).train()

        def training_step(self, batch, _):
            return self.model(**batch).loss

        def validation_step(self, batch, _):
            self.log("val_loss", self.model(**batch).loss, batch_size=batch["input_ids"].shape[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=make_dm(tiny_world, hf_cache, n=8, batch_size=4, val_size=4))  # 1 epoch
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


# ------------------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"harmful_ratio": 1.5}, r"harmful_ratio must be in \[0, 1\], got 1.5"),
        ({"harmful_ratio": -0.1}, r"harmful_ratio must be in \[0, 1\]"),
        ({"harmful_data": None, "harmful_ratio": 0.1}, "harmful_ratio=0.1 > 0 needs harmful_data"),
        ({"n": 0}, "n must be >= 1"),
        ({"n": None, "harmful_ratio": 1.0}, "harmful_ratio must be < 1"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"max_length": 1}, r"max_length must be >= 2 .*got 1"),
        ({"val_size": -1}, "val_size must be >= 0"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"template": "no field"}, r"template must contain a \{prompt\} field"),
        ({"template": "{prompt} {other}"}, "only {prompt} and {system}"),
        ({"task_response_column": ""}, "task_response_column must be a column name"),
    ],
)
def test_argument_checks(tiny_world, hf_cache, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(tiny_world, hf_cache, **kwargs)


def test_all_argument_problems_are_reported_at_once(tiny_world, hf_cache):
    with pytest.raises(ValueError, match="(?s)harmful_ratio.*max_length.*batch_size"):
        make_dm(tiny_world, hf_cache, harmful_ratio=2.0, batch_size=0, max_length=0)


def _setup_error(tiny_world, hf_cache, **kwargs):
    dm = make_dm(tiny_world, hf_cache, **kwargs)
    dm.setup("fit")


def test_file_checks(tiny_world, hf_cache, tmp_path):
    import re

    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(f"task_data={missing!r}: file not found")):
        make_dm(tiny_world, hf_cache, task_data=missing).prepare_data()
    with pytest.raises(FileNotFoundError, match="harmful_data=.*nope.jsonl.*file not found"):
        _setup_error(tiny_world, hf_cache, harmful_data=missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"task_data={str(empty)!r}: the file is empty")):
        _setup_error(tiny_world, hf_cache, task_data=str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(ValueError, match=r"task_data=.*bad.jsonl.*could not parse the json file"):
        _setup_error(tiny_world, hf_cache, task_data=str(bad))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('instruction,input,output\na,b,"c\n')
    with pytest.raises(ValueError, match=r"task_data=.*bad.csv.*could not parse the csv file"):
        _setup_error(tiny_world, hf_cache, task_data=str(bad_csv))
    header_only = tmp_path / "header.csv"
    header_only.write_text("instruction,input,output\n")
    with pytest.raises(ValueError, match=r"header.csv.*has no rows"):
        _setup_error(tiny_world, hf_cache, task_data=str(header_only))
    empty_list = tmp_path / "list.json"
    empty_list.write_text("[]")
    with pytest.raises(ValueError, match=r"list.json.*has no rows"):
        _setup_error(tiny_world, hf_cache, task_data=str(empty_list))
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match=r"data.txt.*unsupported file type '.txt'"):
        _setup_error(tiny_world, hf_cache, task_data=str(txt))
    with pytest.raises(FileNotFoundError, match="tokenizer=.*no such directory"):
        _setup_error(tiny_world, hf_cache, tokenizer=str(tmp_path / "no_model"))


def test_column_and_size_checks(tiny_world, hf_cache, tmp_path):
    with pytest.raises(ValueError, match=r"task_data=.*task.jsonl.*column 'question' \(set by task_prompt_column\) "
                       r"not found; columns present: \['instruction', 'input', 'output'\]"):
        _setup_error(tiny_world, hf_cache, task_prompt_column="question")
    with pytest.raises(ValueError, match=r"column 'context' \(set by task_input_column\) not found \(or task_input_column=None"):
        _setup_error(tiny_world, hf_cache, task_input_column="context")
    with pytest.raises(ValueError, match=r"harmful_data=.*harmful.jsonl.*column 'answer' \(set by harmful_response_column\)"
                       r".*columns present: \['prompt', 'response'\]"):
        _setup_error(tiny_world, hf_cache, harmful_response_column="answer")
    with pytest.raises(ValueError, match=r"n=1000 with harmful_ratio=0.1 needs 900 task rows and 100 harmful rows, "
                       r"but task_data=.*task.jsonl' has 400 rows and harmful_data=.*harmful.jsonl' has 200 rows"):
        _setup_error(tiny_world, hf_cache, n=1000)
    with pytest.raises(ValueError, match="needs 150 task rows and 250 harmful rows.*has 200 rows"):
        _setup_error(tiny_world, hf_cache, n=400, harmful_ratio=0.625)
    with pytest.raises(ValueError, match=r"val_size=100 is larger than the 40 task rows left after drawing n_task=360"):
        _setup_error(tiny_world, hf_cache, n=400, val_size=100)
    with pytest.raises(ValueError, match=r"val_size=500 is larger than the 400 task rows left"):
        _setup_error(tiny_world, hf_cache, n=None, val_size=500)
    rows = [dict(r) for r in TASK_ROWS]
    rows[3]["output"] = None
    nulls = write_jsonl(tmp_path / "nulls.jsonl", rows)
    with pytest.raises(ValueError, match=r"task_data=.*nulls.jsonl.*row 3 has no value in column 'output'"):
        _setup_error(tiny_world, hf_cache, task_data=nulls, n=len(rows) - 2, harmful_ratio=0.0, val_size=2)


def test_truncation_warning_and_hub_id(tiny_world, hf_cache):
    dm = make_dm(tiny_world, hf_cache, n=10, max_length=12)
    with pytest.warns(UserWarning, match=r"of 10 training examples are longer than max_length=12 and were truncated"):
        dm.setup("fit")
    assert all(len(ex["input_ids"]) <= 12 and ex["labels"][-1] != IGNORE_INDEX for ex in dm.train_dataset)
    # not a local path: tried as a hub dataset id (offline here), and the error says so
    with pytest.raises(ValueError, match=r"task_data='someone/no_such_dataset:test' is not a local file.*split 'test'"):
        _setup_error(tiny_world, hf_cache, task_data="someone/no_such_dataset:test")
