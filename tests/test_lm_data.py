"""Your prompts from the command line: ``--dataset`` files / folders, ``--prompt-column``, splits and
held-out parts, chat-message prompts, ``--system-prompt``; bad datasets are one line, exit 2, before
any model is loaded."""

from __future__ import annotations

import json

import pytest

from lm_fixtures import make_tokenizer, read_jsonl
from pg_lm.cli import main
from pg_lm.lm.config import LMConfig
from pg_lm.lm.data import datasets_from_config, load_prompts
from pg_lm.lm.sampling import format_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

ROWS = [{"question": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(1, 9)]
TINY = ["--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
        "--eval-size", "2", "--progress", "false", "--save-model", "false", "--mixed-precision", "no", "--lora-r", "0"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def no_model_loads(monkeypatch):
    import pg_lm.lm.setup as setup

    monkeypatch.setattr(setup, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_files_of_each_type_load_with_the_prompt_column_renamed(kind, tmp_path):
    import datasets

    path = tmp_path / f"data.{kind}"
    ds = datasets.Dataset.from_list(ROWS)
    {"jsonl": lambda: ds.to_json(path), "json": lambda: path.write_text(json.dumps(ROWS)),
     "csv": lambda: ds.to_csv(path), "parquet": lambda: ds.to_parquet(path)}[kind]()
    out = load_prompts(str(path), "train", prompt_column="question")
    assert out["prompt"] == [r["question"] for r in ROWS]
    assert [str(a) for a in out["answer"]] == [r["answer"] for r in ROWS]  # (CSV reads numbers as numbers)


def test_a_folder_has_splits_and_eval_split_picks_one(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "c", "answer": "3"}])
    train, held_out = datasets_from_config(LMConfig(dataset=str(folder), eval_split="test"))
    assert train["prompt"] == ["a", "b"] and held_out["prompt"] == ["c"]


def test_eval_fraction_holds_out_disjoint_rows_and_eval_dataset_is_read(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, held_out = datasets_from_config(LMConfig(dataset=str(path), prompt_column="question", eval_fraction=0.25))
    assert len(train) == 6 and len(held_out) == 2
    assert sorted(list(train["prompt"]) + list(held_out["prompt"])) == sorted(r["question"] for r in ROWS)
    other = write_jsonl(tmp_path / "e.jsonl", ROWS[:3])
    _, held_out = datasets_from_config(LMConfig(dataset=str(path), eval_dataset=str(other), prompt_column="question"))
    assert held_out["prompt"] == [r["question"] for r in ROWS[:3]]
    train, held_out = datasets_from_config(LMConfig(dataset=str(path), prompt_column="question"))
    assert len(train) == 8 and held_out is None  # no held-out part unless asked


def test_chat_message_prompts_go_through_the_template_as_given_after_the_system_prompt():
    tok = make_tokenizer()  # template: user turns "Q:<text>\n", other turns "A:<text>\n", then "A:"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2"}]
    assert format_prompts(tok, [msgs], True) == ["Q:hi\nA:yo\nQ:2+2\nA:"]
    assert format_prompts(tok, ["2+2", msgs], True, system_prompt="Be brief.") == [
        "A:Be brief.\nQ:2+2\nA:", "A:Be brief.\nQ:hi\nA:yo\nQ:2+2\nA:"]
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "x"}]
    assert format_prompts(tok, [own], True, system_prompt="Be brief.") == ["A:Mine.\nQ:x\nA:"]  # not a second one
    assert format_prompts(make_tokenizer(chat_template=False), ["2+2"], True, "Be brief.") == ["Be brief.\n\n2+2"]
    with pytest.raises(ValueError, match="prompt 0 is a list of chat messages, but the tokenizer has no chat template"):
        format_prompts(make_tokenizer(chat_template=False), [msgs], True)
    with pytest.raises(ValueError, match="prompt 1 is int: a prompt is a string or a list of chat messages"):
        format_prompts(tok, ["a", 3], True)


def test_cli_trains_on_a_jsonl_of_chat_messages_with_a_builtin_reward(tiny_lm_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in ROWS]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(out), "--dataset", str(path),
                 "--prompt-column", "messages", "--reward", "last_number", "--system-prompt", "Be brief.",
                 "--eval-fraction", "0.25", *TINY])
    assert code == 0
    prompts = [r["prompt"] for r in read_jsonl(out / "samples.jsonl")]
    assert prompts and all(p in [r["messages"] for r in rows] for p in prompts)  # the messages, as given
    summary = json.loads((out / "summary.json").read_text())
    assert {"eval/reward_before", "eval/reward_after", "eval/accuracy_after"} <= set(summary)


@pytest.mark.parametrize("setup_files, argv, fragment", [
    (lambda d: None, ["--dataset", "{d}/missing.jsonl", "--reward", "last_number"],
     "error: --dataset {d}/missing.jsonl: no such file or folder"),
    (lambda d: write_jsonl(d / "q.jsonl", ROWS), ["--dataset", "{d}/q.jsonl", "--reward", "last_number"],
     "error: the training dataset (--dataset {d}/q.jsonl) has no 'prompt' column (choose one with --prompt-column); "
     "it has: question, answer"),
    (lambda d: write_jsonl(d / "q.jsonl", ROWS), ["--dataset", "{d}/q.jsonl", "--prompt-column", "question"],
     "error: --dataset needs a reward: --reward path/to/file.py:function"),
    (lambda d: write_jsonl(d / "q.jsonl", ROWS), ["--dataset", "{d}/q.jsonl", "--prompt-column", "question",
                                                  "--reward", "last_number=total"],
     "error: reward function 'last_number_is' needs the column 'total', which the training dataset does not have "
     "(it has: prompt, answer)"),
    (lambda d: (d / "e.jsonl").write_text(""), ["--dataset", "{d}/e.jsonl", "--reward", "last_number"],
     "error: --dataset {d}/e.jsonl (split 'train') could not be loaded"),
    (lambda d: write_jsonl(d / "q.jsonl", ROWS), ["--dataset", "{d}/q.jsonl", "--eval-fraction", "0.2",
                                                  "--eval-split", "test"],
     "--eval-fraction holds out rows of --dataset: give it, or --eval-dataset / --eval-split, not both"),
])
def test_a_bad_dataset_is_one_line_exit_2_before_any_model_loads(setup_files, argv, fragment, tmp_path, monkeypatch,
                                                                 capsys):
    setup_files(tmp_path)
    no_model_loads(monkeypatch)
    try:
        code = main(["lm", "--output-dir", str(tmp_path / "run"), *[a.format(d=tmp_path) for a in argv]])
    except SystemExit as e:  # a config error: argparse exits
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert fragment.format(d=tmp_path) in err, err
