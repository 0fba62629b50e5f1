"""Tests of the task: the verifier and rewards (components.rewards), the arithmetic generator
(components.arithmetic), prompt-data loading and splits (components.data), the prepare_data stage."""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from components import prepare_data
from components.config import ArithmeticConfig, Config, DataConfig
from components.arithmetic import COLUMNS, make_arithmetic
from components.data import load_prompts, prepare_splits
from components.errors import DatasetError
from components.rewards import (
    correctness_reward,
    extract_answer,
    format_reward,
    is_correct,
    normalize_number,
    reference_completion,
    split_steps,
    wrong_answer,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers
def _expr(prompt: str) -> ast.expr:
    m = re.fullmatch(r"What is ([0-9+\-*() ]+)\?", prompt)
    assert m, f"prompt not in plain notation: {prompt!r}"
    return ast.parse(m.group(1), mode="eval").body


def _evaluate(node: ast.expr) -> int:
    """Independent evaluator: Python's parser gives normal precedence and parentheses."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    assert isinstance(node, ast.BinOp), ast.dump(node)
    a, b = _evaluate(node.left), _evaluate(node.right)
    ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b}
    return ops[type(node.op)]()


def _operands_and_ops(node: ast.expr) -> tuple[list[int], list[str]]:
    if isinstance(node, ast.Constant):
        return [node.value], []
    sym = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[type(node.op)]
    la, lo = _operands_and_ops(node.left)
    ra, ro = _operands_and_ops(node.right)
    return la + ra, lo + [sym] + ro


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PLAIN = [
    {"prompt": "What is 2 + 2?", "answer": "4"},
    {"prompt": "Half of 5?", "answer": 2.5, "solution": "5 / 2 = 2.5"},
    {"prompt": "How many?", "answer": "1,234"},
    {"prompt": "Below zero?", "answer": -3},
]

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A farm has 1,000 hens and buys 234 more. How many hens now?",
     "answer": "1000 + 234 = <<1000+234=1234>>1234 hens.\n#### 1,234"},
    {"question": "It was 5 degrees and dropped 8. What is it now?",
     "answer": "5 - 8 = <<5-8=-3>>-3\n#### -3"},
]


# --------------------------------------------------------------------------- arithmetic
HARD = ArithmeticConfig(min_operand=3, max_operand=17, num_operations=4,
                        operators=["+", "-", "*"], parentheses=True)


def test_arithmetic_is_deterministic_and_seeded():
    a = make_arithmetic(HARD, 200, seed=7)
    b = make_arithmetic(HARD, 200, seed=7)
    c = make_arithmetic(HARD, 200, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == COLUMNS
    assert a["prompt"].tolist() != c["prompt"].tolist()
    assert a["id"].tolist() == [f"arith-7-{i}" for i in range(200)]
    assert a["prompt"].is_unique and a["id"].is_unique


@pytest.mark.parametrize("cfg", [
    ArithmeticConfig(),
    ArithmeticConfig(min_operand=0, max_operand=9, num_operations=2, operators=["-", "*"]),
    HARD,
    ArithmeticConfig(min_operand=10, max_operand=99, num_operations=6, operators=["*", "+"], parentheses=True),
])
def test_arithmetic_answers_recomputed_from_prompt(cfg):
    df = make_arithmetic(cfg, 300, seed=3)
    for prompt, answer in zip(df["prompt"], df["answer"]):
        assert answer == str(_evaluate(_expr(prompt))), prompt


def test_arithmetic_difficulty_knobs_honoured():
    for cfg in (HARD, ArithmeticConfig(min_operand=5, max_operand=6, num_operations=3, operators=["*"])):
        df = make_arithmetic(cfg, 16, seed=1)  # 2**4 * 1 = 16 problems for the second config
        for prompt in df["prompt"]:
            operands, ops = _operands_and_ops(_expr(prompt))
            assert len(ops) == cfg.num_operations
            assert set(ops) <= set(cfg.operators)
            assert all(cfg.min_operand <= v <= cfg.max_operand for v in operands)
    # parentheses off: never; on: one pair around a proper sub-expression, in many prompts.
    flat = make_arithmetic(HARD.model_copy(update={"parentheses": False}), 300, seed=1)
    assert not flat["prompt"].str.contains(r"[()]").any()
    paren = make_arithmetic(HARD, 300, seed=1)
    with_paren = paren["prompt"][paren["prompt"].str.contains("(", regex=False)]
    assert len(with_paren) > 100
    for p in with_paren:
        assert p.count("(") == 1 and p.count(")") == 1
        inner = p[p.index("(") + 1:p.index(")")]
        assert len(re.findall(r"[+\-*]", inner)) >= 1
        assert p[len("What is "):-1] != f"({inner})"
    # all three operators actually occur
    assert {op for p in paren["prompt"] for op in "+-*" if f" {op} " in p} == {"+", "-", "*"}


def test_arithmetic_solution_steps_are_true():
    df = make_arithmetic(HARD, 50, seed=2)
    for sol, answer in zip(df["solution"], df["answer"]):
        lines = sol.split("\n")
        assert len(lines) == HARD.num_operations
        for line in lines:
            lhs, rhs = line.split(" = ")
            assert eval(lhs, {"__builtins__": {}}) == int(rhs), line  # "a op (b)" with ints only
        assert lines[-1].split(" = ")[1] == answer


def test_arithmetic_capacity_and_exclude():
    tiny = ArithmeticConfig(min_operand=0, max_operand=2, num_operations=1, operators=["+"])
    all9 = make_arithmetic(tiny, 9, seed=0)
    assert sorted(all9["prompt"]) == sorted(f"What is {a} + {b}?" for a in range(3) for b in range(3))
    with pytest.raises(DatasetError, match=r"only 9"):
        make_arithmetic(tiny, 10, seed=0)
    taken = set(all9["prompt"][:5])
    rest = make_arithmetic(tiny, 4, seed=1, exclude=taken)
    assert set(rest["prompt"]).isdisjoint(taken) and len(rest) == 4
    with pytest.raises(DatasetError, match=r"remain after excluding"):
        make_arithmetic(tiny, 5, seed=1, exclude=taken)
    # exclusion also works in the sparse (rejection-sampling) regime
    big = make_arithmetic(HARD, 100, seed=0)
    other = make_arithmetic(HARD, 100, seed=0, exclude=set(big["prompt"][:50]))
    assert set(other["prompt"]).isdisjoint(set(big["prompt"][:50]))


def test_prepare_splits_arithmetic_disjoint_and_deterministic():
    cfg = DataConfig(num_train=300, num_test=60,
                     arithmetic=ArithmeticConfig(max_operand=19, num_operations=1, operators=["+", "-"]))
    train, test = prepare_splits(cfg, seed=5)
    assert (len(train), len(test)) == (300, 60)
    assert set(train["prompt"]).isdisjoint(set(test["prompt"]))
    assert set(train["id"]).isdisjoint(set(test["id"]))
    train2, test2 = prepare_splits(cfg, seed=5)
    pd.testing.assert_frame_equal(train, train2)
    pd.testing.assert_frame_equal(test, test2)
    # 13*13*2 = 338 problems cannot give 300 + 60 disjoint ones
    with pytest.raises(DatasetError, match="338.*remain after excluding 300"):
        prepare_splits(cfg.model_copy(update={"arithmetic": ArithmeticConfig(max_operand=12,
                                                                             operators=["+", "-"])}), 0)


# --------------------------------------------------------------------------- verifiers
@pytest.mark.parametrize("text,want", [
    ("85", "85"), ("085", "85"), ("1,234", "1234"), ("-1,234,567", "-1234567"), ("2.50", "2.5"),
    ("-0", "0"), ("-0.00", "0"), ("3.0", "3"), ("+7", "7"), (" 42 ", "42"), (".5", "0.5"), ("5.", "5"),
    ("123456789012345678901234567890123", "123456789012345678901234567890123"),
    ("", None), ("abc", None), ("1e5", None), ("12,34", None), ("$5", None), ("1.2.3", None), ("-", None),
])
def test_normalize_number(text, want):
    assert normalize_number(text) == want


@pytest.mark.parametrize("completion,answer,correct,fmt", [
    ("<answer>85</answer>", "85", True, 1.0),
    ("<answer>84</answer>", "85", False, 1.0),
    ("85", "85", False, 0.0),                                         # missing tags
    ("<answer>85", "85", False, 0.0),
    ("<think>37 + 48 = 85</think><answer>85</answer>", "85", True, 1.0),
    ("<think>a\nb</think>\n <answer>85</answer>\n", "85", True, 1.0),
    ("The answer is <answer>85</answer>.", "85", True, 0.5),          # extra text
    ("<answer>85</answer> because 40+45", "85", True, 0.5),
    ("<think>x</think>y<answer>85</answer>", "85", True, 0.5),
    ("<answer>-3</answer>", "-3", True, 1.0),                          # negative
    ("<answer>3</answer>", "-3", False, 1.0),
    ("<answer>1,234</answer>", "1234", True, 1.0),                     # commas
    ("<answer>1234</answer>", "1,234", True, 1.0),
    ("<answer>2.50</answer>", "2.5", True, 1.0),
    ("<answer>085</answer>", "85", True, 1.0),
    ("<answer>12</answer><answer>85</answer>", "85", True, 0.5),       # the last one counts
    ("<answer>85</answer><answer>12</answer>", "85", False, 0.5),
    ("<answer>eighty</answer>", "85", False, 0.5),
    ("<answer> 85 </answer>", "85", True, 0.5),
    ("<think><answer>1</answer></think><answer>85</answer>", "85", True, 0.5),
    ("", "85", False, 0.0),
])
def test_verifiers(completion, answer, correct, fmt):
    assert is_correct(completion, answer) is correct
    assert correctness_reward(completion, answer) == (1.0 if correct else 0.0)
    assert format_reward(completion) == fmt


def test_extract_answer():
    assert extract_answer("<think>maybe <answer>3</answer></think><answer> -1,000 </answer>") == "-1000"
    assert extract_answer("<answer>x</answer>") is None
    assert extract_answer("no tags 85") is None
    assert not is_correct("<answer>85</answer>", "not a number")


def test_reference_completion():
    assert reference_completion("85") == "<answer>85</answer>"
    assert reference_completion("085", "40 + 45 = 85") == "<answer>85</answer>"
    ref = reference_completion("85", "40 + 45 = 85", with_reasoning=True)
    assert ref == "<think>40 + 45 = 85</think><answer>85</answer>"
    assert reference_completion("85", None, with_reasoning=True) == "<answer>85</answer>"
    for r in (ref, reference_completion("-2.5")):
        assert format_reward(r) == 1.0
    assert is_correct(ref, "85")


@pytest.mark.parametrize("answer", ["85", "0", "-3", "2.5", "1234", "7", "11", "100"])
def test_wrong_answer_is_plausible_and_different(answer):
    rng = random.Random(0)
    outs = [wrong_answer(answer, rng) for _ in range(300)]
    for out in outs:
        assert normalize_number(out) == out and out != normalize_number(answer)
        digit_swap = sorted(out.lstrip("-")) == sorted(answer.lstrip("-")) and out.startswith("-") == answer.startswith("-")
        assert digit_swap or 1 <= abs(float(out) - float(answer)) <= 10, out
    assert len(set(outs)) > 5
    assert wrong_answer(answer, random.Random(4)) == wrong_answer(answer, random.Random(4))
    with pytest.raises(ValueError):
        wrong_answer("abc", rng)


def test_split_steps():
    c = "<think>48/2 = 24. Then 48 + 24 = 72!\n\nSo 72.</think><answer>72</answer>"
    spans = split_steps(c)
    pieces = [c[a:b] for a, b in spans]
    assert pieces == ["<think>48/2 = 24. ", "Then 48 + 24 = 72!\n\n", "So 72.</think>", "<answer>72</answer>"]
    # contiguous, covering, non-empty
    for text in (c, "<answer>5</answer>", "just text\nno answer", "a\n\n\n", "<think>a</think>\n<answer>1</answer>\n"):
        sp = split_steps(text)
        assert sp[0][0] == 0 and sp[-1][1] == len(text)
        assert all(a < b for a, b in sp) and all(sp[i][1] == sp[i + 1][0] for i in range(len(sp) - 1))
        assert all(text[a:b].strip() for a, b in sp)
    assert split_steps("<answer>5</answer>") == [(0, 18)]
    assert split_steps("") == []
    # a decimal point is not a sentence end
    assert len(split_steps("<think>2.5 + 1 = 3.5</think><answer>3.5</answer>")) == 2


# --------------------------------------------------------------------------- loading
def _check_plain(df: pd.DataFrame, stem: str) -> None:
    assert list(df.columns) == COLUMNS
    assert df["answer"].tolist() == ["4", "2.5", "1234", "-3"]
    assert df["id"].tolist() == [f"{stem}-{i}" for i in range(4)]
    assert df["solution"].tolist() == [None, "5 / 2 = 2.5", None, None]
    assert df["prompt"].tolist() == [r["prompt"] for r in PLAIN]


def test_load_jsonl_and_parquet(tmp_path):
    _check_plain(load_prompts(str(_write_jsonl(tmp_path / "mydata.jsonl", PLAIN))), "mydata")
    pq = tmp_path / "other.parquet"
    pd.DataFrame([{**r, "answer": str(r["answer"])} for r in PLAIN]).to_parquet(pq)
    _check_plain(load_prompts(str(pq)), "other")
    # numeric answer column in Parquet, given ids kept
    pd.DataFrame({"id": [10, 11], "prompt": ["a", "b"], "answer": [3, -2]}).to_parquet(tmp_path / "n.parquet")
    df = load_prompts(str(tmp_path / "n.parquet"))
    assert df["id"].tolist() == ["10", "11"] and df["answer"].tolist() == ["3", "-2"]


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def test_load_hf_from_disk(tmp_path, offline_hf):
    datasets = offline_hf
    raw = pd.DataFrame([{**r, "answer": str(r["answer"]), "solution": r.get("solution")} for r in PLAIN])
    single = datasets.Dataset.from_pandas(raw)
    single.save_to_disk(str(tmp_path / "single"))
    _check_plain(load_prompts(str(tmp_path / "single"), source="hf"), "single-train")
    gsm = datasets.Dataset.from_pandas(pd.DataFrame(GSM8K))
    datasets.DatasetDict({"train": gsm, "test": gsm.select([0])}).save_to_disk(str(tmp_path / "gsm"))
    test = load_prompts(str(tmp_path / "gsm"), layout="gsm8k", source="hf", split="test")
    assert test["answer"].tolist() == ["72"] and test["id"].tolist() == ["gsm-test-0"]
    with pytest.raises(DatasetError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_prompts(str(tmp_path / "gsm"), layout="gsm8k", source="hf", split="validation")


def test_load_hf_dir_of_parquet(tmp_path, offline_hf):
    d = tmp_path / "pqset"
    d.mkdir()
    pd.DataFrame(GSM8K[:2]).to_parquet(d / "train.parquet")
    pd.DataFrame(GSM8K[2:]).to_parquet(d / "test.parquet")
    train = load_prompts(str(d), layout="gsm8k", source="hf", split="train")
    test = load_prompts(str(d), layout="gsm8k", source="hf", split="test")
    assert train["answer"].tolist() == ["72", "1234"] and test["answer"].tolist() == ["-3"]
    with pytest.raises(DatasetError, match="does-not-exist.*cannot load HF data set"):
        load_prompts(str(tmp_path / "does-not-exist"), source="hf")


def test_gsm8k_layout(tmp_path):
    df = load_prompts(str(_write_jsonl(tmp_path / "gsm.jsonl", GSM8K)), layout="gsm8k")
    assert df["answer"].tolist() == ["72", "1234", "-3"]
    assert df["prompt"].tolist() == [r["question"] for r in GSM8K]
    assert df["solution"][0] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                 "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert df["solution"][1] == "1000 + 234 = 1234 hens."
    assert not df["solution"].str.contains("<<|>>|####").any()
    assert df["id"].tolist() == ["gsm-0", "gsm-1", "gsm-2"]
    ref = reference_completion(df["answer"][0], df["solution"][0], with_reasoning=True)
    assert is_correct(ref, "72") and format_reward(ref) == 1.0
    # plain layout on GSM8K columns names what is missing and what was found
    with pytest.raises(DatasetError, match=r"gsm\.jsonl.*\['prompt'\].*found columns \['question', 'answer'\]"):
        load_prompts(str(tmp_path / "gsm.jsonl"))


MALFORMED = [
    # (kind, layout, rows, bad row, message fragment)
    ("blank prompt", "plain", [PLAIN[0], {"prompt": "   ", "answer": "1"}, PLAIN[2]], 1, "prompt is empty"),
    ("null prompt", "plain", [PLAIN[0], PLAIN[1], {"prompt": None, "answer": "1"}], 2, "prompt is empty"),
    ("bad answer", "plain", [PLAIN[0], {"prompt": "q", "answer": "about 5"},
                             {"prompt": "r", "answer": "x"}], 1, "2 of 3 rows are bad"),
    ("null answer", "plain", [{"prompt": "q", "answer": None}], 0, "answer is not a number"),
    ("no ####", "gsm8k", [GSM8K[0], {"question": "q", "answer": "It is 5."}], 1, "####"),
    ("bad ####", "gsm8k", [{"question": "q", "answer": "so #### five"}, GSM8K[0]], 0, "not a number"),
    ("duplicate id", "plain", [{"id": "a", **PLAIN[0]}, {"id": "b", **PLAIN[1]},
                               {"id": "a", **PLAIN[2]}], 2, "duplicate id 'a' (first at row 0)"),
]


@pytest.mark.parametrize("kind,layout,rows,bad_row,fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_malformed_rows_name_file_and_row(tmp_path, kind, layout, rows, bad_row, fragment, fmt):
    path = tmp_path / f"bad_{fmt}.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    else:
        pd.DataFrame([{k: None if v is None else str(v) for k, v in r.items()} for r in rows]).to_parquet(path)
    with pytest.raises(DatasetError) as info:
        load_prompts(str(path), layout=layout)
    msg = str(info.value)
    assert str(path) in msg and f"row {bad_row}" in msg and fragment in msg, msg
    assert "\n" not in msg


def test_malformed_files(tmp_path):
    cases = {}
    cases["missing file"] = (tmp_path / "nope.jsonl", None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases["empty file"] = (empty, "no rows")
    empty_pq = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "answer": pd.Series([], dtype=str)}).to_parquet(empty_pq)
    cases["empty parquet"] = (empty_pq, "no rows")
    cols = _write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "reply": "1"}])
    cases["missing column"] = (cols, "found columns ['question', 'reply']")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    cases["unreadable parquet"] = (corrupt, "not a readable Parquet file")
    weird = tmp_path / "data.csv"
    weird.write_text("prompt,answer\nq,1\n")
    cases["unsupported type"] = (weird, "unsupported file type")
    for kind, (path, fragment) in cases.items():
        with pytest.raises(DatasetError) as info:
            load_prompts(str(path))
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg, (kind, msg)
        if fragment:
            assert fragment in msg, (kind, msg)
    # row-level file problems name the row (0-based data row) and the line
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DatasetError, match=r"latin\.jsonl: row 1 \(line 3\): not valid UTF-8"):
        load_prompts(str(latin))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl: row 1 \(line 2\): not valid JSON"):
        load_prompts(str(broken))
    notobj = _write_jsonl(tmp_path / "list.jsonl", [PLAIN[0], [1, 2]])
    with pytest.raises(DatasetError, match=r"list\.jsonl: row 1 .*JSON object"):
        load_prompts(str(notobj))


# --------------------------------------------------------------------------- file/hf splits
def test_prepare_splits_file(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(50)]
    path = _write_jsonl(tmp_path / "all.jsonl", rows)
    cfg = DataConfig(source="file", path=str(path), num_train=100, num_test=10)
    train, test = prepare_splits(cfg, seed=1)
    assert (len(train), len(test)) == (40, 10)
    assert set(train["prompt"]).isdisjoint(test["prompt"])
    assert set(train["prompt"]) | set(test["prompt"]) == {r["prompt"] for r in rows}
    train2, test2 = prepare_splits(cfg, seed=1)
    assert test2["prompt"].tolist() == test["prompt"].tolist()
    assert prepare_splits(cfg, seed=2)[1]["prompt"].tolist() != test["prompt"].tolist()
    # truncation to num_train
    small = prepare_splits(cfg.model_copy(update={"num_train": 15}), seed=1)[0]
    assert len(small) == 15 and set(small["prompt"]) <= set(train["prompt"])
    # too few rows for the requested test split
    with pytest.raises(DatasetError, match=r"all\.jsonl.*50 rows"):
        prepare_splits(cfg.model_copy(update={"num_test": 50}), seed=1)
    # separate test file: colliding prompts are dropped, truncated to num_test
    tpath = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(45, 60)])
    cfg2 = cfg.model_copy(update={"test_path": str(tpath), "num_test": 100})
    train, test = prepare_splits(cfg2, seed=0)
    assert len(train) == 50 and sorted(test["prompt"]) == sorted(f"q{i}" for i in range(50, 60))
    assert len(prepare_splits(cfg2.model_copy(update={"num_test": 4}), seed=0)[1]) == 4
    # a test file fully contained in train leaves nothing
    same = _write_jsonl(tmp_path / "same.jsonl", rows[:5])
    with pytest.raises(DatasetError, match=r"same\.jsonl.*test split would be empty"):
        prepare_splits(cfg.model_copy(update={"test_path": str(same)}), seed=0)


def test_prepare_splits_hf(tmp_path, offline_hf):
    datasets = offline_hf
    train = pd.DataFrame(GSM8K)
    test = pd.DataFrame([GSM8K[1], {"question": "New one?", "answer": "#### 9"}])  # row 0 is also in train
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(train),
                          "dev": datasets.Dataset.from_pandas(test)}).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(source="hf", path=str(tmp_path / "ds"), layout="gsm8k", hf_test_split="dev",
                     num_train=10, num_test=10)
    tr, te = prepare_splits(cfg, seed=0)
    assert len(tr) == 3 and te["prompt"].tolist() == ["New one?"] and te["answer"].tolist() == ["9"]
    assert set(tr["id"]).isdisjoint(te["id"])


# --------------------------------------------------------------------------- stage CLI
def _cfg_json(**data) -> str:
    return Config(seed=3, data=DataConfig(**data)).to_json()


def test_run_and_cli_write_both_tables(tmp_path, capsys):
    out = tmp_path / "out"
    cfg_json = _cfg_json(num_train=40, num_test=10)
    rc = prepare_data.main(["--config-json", cfg_json, "--train", str(out / "train.parquet"),
                            "--test", str(out / "test.parquet")])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"num_train": 40, "num_test": 10, "source": "arithmetic"}
    train, test = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "test.parquet")
    assert list(train.columns) == COLUMNS and (len(train), len(test)) == (40, 10)
    assert set(train["prompt"]).isdisjoint(test["prompt"])
    expected_train, _ = prepare_splits(DataConfig(num_train=40, num_test=10), seed=3)
    assert train["prompt"].tolist() == expected_train["prompt"].tolist()
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]


def test_cli_bad_input_exits_2_one_line_no_output(tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [PLAIN[0], {"prompt": "q", "answer": "n/a"}])
    out = tmp_path / "out"
    rc = prepare_data.main(["--config-json", _cfg_json(source="file", path=str(bad), num_test=1),
                            "--train", str(out / "train.parquet"), "--test", str(out / "test.parquet")])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl" in lines[0] and "row 1" in lines[0], captured.err
    assert captured.out == ""
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_as_module_subprocess(tmp_path):
    """`python -m components.prepare_data` works end to end (and fails cleanly)."""
    out = tmp_path / "o"
    args = [sys.executable, "-m", "components.prepare_data", "--train", str(out / "tr.parquet"),
            "--test", str(out / "te.parquet")]
    ok = subprocess.run(args + ["--config-json", _cfg_json(num_train=20, num_test=5)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(pd.read_parquet(out / "te.parquet")) == 5
    bad = subprocess.run(args[:3] + ["--train", str(tmp_path / "x" / "tr.parquet"), "--test",
                                     str(tmp_path / "x" / "te.parquet"), "--config-json",
                                     _cfg_json(source="file", path=str(tmp_path / "missing.jsonl"))],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "missing.jsonl" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()
