import json
import logging

import pytest

from megatron_rl.trainer.data import DataConfig, PromptDataset, PromptLoader, epoch_order
from megatron_rl.utils.tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "id": i} for i in range(10)]


def test_jsonl_chat_template_and_answers(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:3] + [
        {"q": {"text": "What is 9 * 9?"}, "prompt": [{"role": "user", "content": "What is 9 * 9?"}], "answer": "81"}])
    ds = PromptDataset(DataConfig(train_path=str(path), keep_keys=("id",)), tok)
    assert len(ds) == 4 and ds.stats == {"rows": 4, "bad_records_skipped": 0, "too_long_skipped": 0, "kept": 4}
    rec = ds[0]
    want_text = tok.apply_chat_template([{"role": "user", "content": "What is 0 + 1?"}],
                                        add_generation_prompt=True, tokenize=False)
    assert rec.prompt_text == want_text == "<|user|>What is 0 + 1?<|end|><|assistant|>"
    assert rec.prompt_ids == tok(want_text, add_special_tokens=False)["input_ids"]
    assert rec.answer == "1" and rec.info == {"id": 0} and rec.index == 0
    assert ds[3].prompt_text.startswith("<|user|>What is 9 * 9?") and ds[3].answer == "81"
    sys_ds = PromptDataset(DataConfig(train_path=str(path), system_prompt="Be brief."), tok)
    assert sys_ds[0].prompt_text.startswith("<|system|>Be brief.<|end|><|user|>")


def test_parquet_with_nested_fields(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
             "reward_model": {"ground_truth": str(i + 2)}} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = PromptDataset(DataConfig(train_path=str(tmp_path / "d.parquet"), answer_key="reward_model.ground_truth"), tok)
    assert len(ds) == 5 and [r.answer for r in ds.records] == ["2", "3", "4", "5", "6"]
    assert ds[4].prompt_text == "<|user|>What is 4 + 2?<|end|><|assistant|>"
    with pytest.raises(ValueError, match=r"d.parquet: no column 'question'"):
        PromptDataset(DataConfig(train_path=str(tmp_path / "d.parquet"), prompt_key="question"), tok)


def test_bad_lines_error_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "", "{not json", ROWS[1]])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        PromptDataset(DataConfig(train_path=str(path)), tok)
    path = write_jsonl(tmp_path / "nofield.jsonl", [ROWS[0], {"question": "x", "answer": "1"}])
    with pytest.raises(ValueError, match=r"nofield.jsonl:2: no prompt field 'prompt'"):
        PromptDataset(DataConfig(train_path=str(path)), tok)
    path = write_jsonl(tmp_path / "noans.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"noans.jsonl:1: no answer field 'answer'"):
        PromptDataset(DataConfig(train_path=str(path)), tok)


def test_skip_mode_and_overlong_prompts_are_counted(tok, tmp_path, caplog):
    long_prompt = {"prompt": "What is 1 + 1? " * 40, "answer": "2"}
    path = write_jsonl(tmp_path / "mixed.jsonl",
                       [ROWS[0], "{oops", {"question": "no prompt"}, "[1, 2]", long_prompt, ROWS[1],
                        {"prompt": 5, "answer": "5"}])
    ds = PromptDataset(DataConfig(train_path=str(path), on_bad_line="skip"), tok, max_prompt_tokens=32)
    assert ds.stats == {"rows": 7, "bad_records_skipped": 4, "too_long_skipped": 1, "kept": 2}
    assert [r.index for r in ds.records] == [0, 5]          # stable ids are file rows
    # an over-long prompt is skipped (not an error) in error mode too, warned with its file:line
    path2 = write_jsonl(tmp_path / "long.jsonl", [ROWS[0], long_prompt])
    with caplog.at_level(logging.WARNING, logger="megatron_rl.trainer.data"):
        ds2 = PromptDataset(DataConfig(train_path=str(path2)), tok, max_prompt_tokens=32)
    assert ds2.stats["too_long_skipped"] == 1 and len(ds2) == 1
    assert f"1 of 2 prompts are longer than 32 tokens (rollout.max_prompt_length)" in caplog.text
    assert f"first: {path2}:2 (" in caplog.text


def test_skipped_prompts_are_reported_once_per_epoch(tok, tmp_path, caplog):
    """The loop's side (Rollouts.take): data/too_long_skipped on each epoch's first step, one warning."""
    from megatron_rl.trainer.rollouts import Rollouts

    long_prompt = {"prompt": "What is 1 + 1? " * 40, "answer": "2"}
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:3] + [long_prompt])
    rollouts = Rollouts.__new__(Rollouts)          # the data part only: no tokenizer download, no engine
    rollouts.dataset = PromptDataset(DataConfig(train_path=str(path)), tok, max_prompt_tokens=32)
    rollouts._data_epoch = None
    loader = PromptLoader(rollouts.dataset, batch_size=2)
    logged = []
    caplog.clear()                                  # the load's own warning
    with caplog.at_level(logging.WARNING, logger="megatron_rl.trainer.rollouts"):
        for _ in range(4):                          # 3 prompts, 2 a step: epochs 0, 1, 1, 2
            loader.next_batch()
            logged.append(rollouts._data_stats(loader.state_dict()["epoch"]))
    assert [m.get("data/epoch") for m in logged] == [0, 1, None, 2]
    assert all(m["data/too_long_skipped"] == 1 for m in logged if m)
    assert caplog.text.count("prompts are longer than 32 tokens") == 3
    assert f"{path}:4 (" in caplog.text


def test_order_is_deterministic_and_resumable(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = DataConfig(train_path=str(path), seed=3)
    ds = PromptDataset(cfg, tok)
    loader = PromptLoader(ds, batch_size=4)
    first = [[r.index for r in loader.next_batch()] for _ in range(2)]
    state = loader.state_dict()
    rest = [[r.index for r in loader.next_batch()] for _ in range(4)]   # crosses into epochs 1 and 2
    assert state["epoch"] == 0 and state["position"] == 8
    assert loader.epoch == 2

    # a fresh process: same data, same seed -> same order from the start and after a restore
    again = PromptLoader(PromptDataset(cfg, tok), batch_size=4)
    assert [[r.index for r in again.next_batch()] for _ in range(2)] == first
    resumed = PromptLoader(PromptDataset(cfg, tok), batch_size=4)
    resumed.load_state_dict(state)
    assert [[r.index for r in resumed.next_batch()] for _ in range(4)] == rest

    # each epoch is a permutation; epochs differ; the seed matters
    e0, e1 = epoch_order(10, 3, 0), epoch_order(10, 3, 1)
    assert sorted(e0) == list(range(10)) and e0 != e1 and e0 != epoch_order(10, 4, 0)
    assert first[0] + first[1] + rest[0][:2] == e0 and rest[0][2:] == e1[:2]
    assert epoch_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]

    other = PromptLoader(PromptDataset(DataConfig(train_path=str(path), seed=4), tok), batch_size=4)
    with pytest.raises(ValueError, match="`seed`"):
        other.load_state_dict(state)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="`on_bad_line`"):
        DataConfig(train_path="x.jsonl", on_bad_line="ignore")
    with pytest.raises(ValueError, match="`max_prompt_tokens`"):
        PromptDataset(DataConfig(train_path="x.jsonl"), tokenizer=None, max_prompt_tokens=0)
    with pytest.raises(ValueError, match="`format`"):
        DataConfig(train_path="x.csv").resolved_format()
