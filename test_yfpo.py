"""The specification of yfpo.py: one behaviour per test, on a tiny random model built from a config.

Run: python -m pytest -q test_yfpo.py
Optional, on a real model: YFPO_SMOLLM2=/path/to/SmolLM2-135M-Instruct python -m pytest -q -k smollm2
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach for the hub
import yfpo  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO_ROWS = [{"question": q, "answer": a, "gold": yfpo.parse_gold(a)} for q, a in yfpo.DEMO_PROBLEMS]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(yfpo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return str(yfpo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", model_type="llama"))


@pytest.fixture
def tiny(tiny_dir):
    return yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    return str(path)


@pytest.fixture(scope="session")
def neurons_file(tiny_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("identify")
    assert run("identify", "--model", tiny_dir, "--data", data_file, "--num-samples", "8", "--top-k", "12",
               "--out", str(out)) == 0
    return str(out / "neurons.json")


@pytest.fixture(scope="session")
def pairs_file(tiny_dir, data_file, tmp_path_factory):
    """Eight pairs in TRL's conversational format: chosen = the gold solution, rejected = a wrong number."""
    _, tokenizer = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)
    rows = []
    for row in yfpo.load_gsm8k(data_file, "train")[:8]:
        gold = yfpo.gold_solution(row["answer"])
        rows.append({"prompt": yfpo.make_prompt(tokenizer, row["question"]),
                     "chosen": yfpo.make_completion(tokenizer, gold),
                     "rejected": yfpo.make_completion(tokenizer, gold.replace(row["gold"], str(int(row["gold"]) + 1)))})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    yfpo.write_jsonl(path, rows)
    return str(path)


def run(*argv):
    return yfpo.main(["--help"] if not argv else list(argv))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train(tiny_dir, pairs_file, out, *extra):
    argv = ["train", "--model", tiny_dir, "--pairs", pairs_file, "--lr", "1e-3", "--batch-size", "2",
            "--grad-accum", "1", "--max-length", "256", "--device", "cpu", "--out", str(out), *extra]
    assert run(*argv) == 0
    return metrics(out)


def assert_user_error(capsys, out, *argv, says):
    """A user mistake: exit code 2, one line naming the problem, and nothing written in out."""
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert says in err, err
    assert not Path(out).exists() or not any(Path(out).iterdir())


def sample_batch(tokenizer, rows, max_length=256):
    return yfpo.collate(yfpo.solution_examples(tokenizer, rows, max_length), tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Grading: extract_answer and is_correct
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The answer is 18.", "18"),
    ("The answer is 1,234.", "1234"),
    ("The answer is $1,234.56.", "1234.56"),
    ("The answer is: -7", "-7"),
    ("The final answer is **42**.", "42"),
    ("#### 72", "72"),
    ("so 5 + 3 = 8\n#### 8", "8"),
    ("\\boxed{18}", "18"),
    ("\\boxed{\\$25}", "25"),
    ("The answer is 3. Wait, no. The answer is 4.", "4"),
    ("The answer is 10.\nFollow-up: what if she had 20 more? Then 30.", "10"),
    ("#### 5 then The answer is 6", "6"),
    ("The answer is 2 * 2 = 4 bolts", "2"),
    ("She paid $5 and then $7.", "7"),
    ("It is 45%.", "45"),
    ("He ran 3.50 miles.", "3.50"),
    ("The temperature is -3 degrees.", "-3"),
    ("pages 3-5 were torn", "5"),
    ("x = 1.5.", "1.5"),
    ("12 apples, 7 pears, 100 grapes", "100"),
    ("He earns 1,000,000 dollars", "1000000"),
    ("There is no number here.", None),
    ("", None),
    ("The answer is unknown.", None),
    ("The answer is twelve, or 12 in digits", "12"),
    ("In 2023 she was 30 years old and the answer is 31", "31"),
])
def test_extract_answer(text, expected):
    assert yfpo.extract_answer(text) == expected


def test_extract_answer_names_the_rule_that_fired():
    assert yfpo.extract_answer_rule("so 4 then The answer is 5.") == ("5", "strict")
    assert yfpo.extract_answer_rule("so 4 then 5") == ("5", "flexible")
    assert yfpo.extract_answer_rule("nothing") == (None, None)


@pytest.mark.parametrize("text, gold, expected", [
    ("The answer is 18.00", "18", True),
    ("The answer is 18", "18.0", True),
    ("The answer is 1,800", "1800", True),
    ("The answer is $1800.", "1,800", True),
    ("The answer is 17.99", "18", False),
    ("The answer is -5", "5", False),
    ("no number", "5", False),
    ("The answer is 0.5", ".5", True),
])
def test_is_correct_compares_numbers(text, gold, expected):
    assert yfpo.is_correct(text, gold) is expected


# ---------------------------------------------------------------------------------------------
# Data and prompts
# ---------------------------------------------------------------------------------------------

def test_gold_is_the_text_after_the_marker_without_commas():
    assert yfpo.parse_gold("He has 5.\n#### 1,234") == "1234"
    assert yfpo.parse_gold("#### -3.5 ") == "-3.5"


def test_gold_solution_drops_calculator_marks_and_states_the_answer():
    assert yfpo.gold_solution("4*12=<<4*12=48>>48 eggs.\n#### 48") == "4*12=48 eggs.\nThe answer is 48."


def test_load_local_jsonl_adds_gold(data_file):
    rows = yfpo.load_gsm8k(data_file, "test")
    assert len(rows) == len(DEMO_ROWS) and rows[8]["gold"] == "14400" and rows[0]["question"] == DEMO_ROWS[0]["question"]


def test_load_folder_picks_the_split_file(tmp_path):
    yfpo.write_jsonl(tmp_path / "train.jsonl", DEMO_ROWS[:3])
    yfpo.write_jsonl(tmp_path / "test.jsonl", DEMO_ROWS[3:5])
    assert [r["gold"] for r in yfpo.load_gsm8k(str(tmp_path), "test")] == ["15", "32"]


def test_load_folder_reads_every_shard_of_the_split_only(tmp_path):
    yfpo.write_jsonl(tmp_path / "train-00000-of-00002.jsonl", DEMO_ROWS[:2])
    yfpo.write_jsonl(tmp_path / "train-00001-of-00002.jsonl", DEMO_ROWS[2:3])
    yfpo.write_jsonl(tmp_path / "trainextra.jsonl", DEMO_ROWS[3:])
    assert [r["gold"] for r in yfpo.load_gsm8k(str(tmp_path), "train")] == ["8", "48", "105"]


def test_load_json_lines_json_list_and_parquet_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "list.json").write_text(json.dumps(DEMO_ROWS[:3]))
    yfpo.write_jsonl(tmp_path / "lines.json", DEMO_ROWS[:3])  # what datasets' to_json writes
    datasets.Dataset.from_list(DEMO_ROWS[:3]).to_parquet(str(tmp_path / "rows.parquet"))
    for name in ("list.json", "lines.json", "rows.parquet"):
        assert [r["gold"] for r in yfpo.load_gsm8k(str(tmp_path / name), "train")] == ["8", "48", "105"], name
    (tmp_path / "bad.json").write_text("[{oops")
    with pytest.raises(yfpo.UserError, match="could not load .*bad.json"):
        yfpo.load_gsm8k(str(tmp_path / "bad.json"), "train")


def test_chat_template_prompt_holds_question_instruction_and_generation_prompt(tiny):
    _, tokenizer = tiny
    text = yfpo.format_prompt(tokenizer, "What is 2+2?", system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?\n" + yfpo.INSTRUCTION
                    + "<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_without_chat_template_gets_plain_format(tiny):
    _, tokenizer = tiny
    tokenizer.chat_template = None
    assert yfpo.format_prompt(tokenizer, "What is 2+2?") == f"Question: What is 2+2?\n{yfpo.INSTRUCTION}\nAnswer:"


def test_control_rows_are_the_question_alone_and_their_answer_whole(tiny):
    _, tokenizer = tiny
    rows = [{"question": "How do I boil an egg?", "answer": "Put it in boiling water.", "gold": None},
            DEMO_ROWS[0]]
    (control_prompt, control_answer), (math_prompt, _) = yfpo.solution_examples(tokenizer, rows, 256)
    assert tokenizer.decode(control_prompt) == yfpo.format_prompt(tokenizer, "How do I boil an egg?", instruction=False)
    assert yfpo.INSTRUCTION not in tokenizer.decode(control_prompt) and "boil an egg?<|im_end|>" in tokenizer.decode(control_prompt)
    assert tokenizer.decode(control_answer).startswith("Put it in boiling water.")
    assert yfpo.INSTRUCTION in tokenizer.decode(math_prompt)


def test_tokenize_example_splits_the_templated_conversation(tiny):
    _, tokenizer = tiny
    prompt = yfpo.prompt_messages("What is 2+2?")
    completion = [{"role": "assistant", "content": "The answer is 4."}]
    prompt_ids, completion_ids = yfpo.tokenize_example(tokenizer, prompt, completion, 512)
    assert prompt_ids + completion_ids == tokenizer.apply_chat_template(prompt + completion, tokenize=True)
    assert tokenizer.decode(completion_ids) == "The answer is 4.<|im_end|>\n"
    short = yfpo.tokenize_example(tokenizer, prompt, completion, len(prompt_ids) + 3)
    assert short == (prompt_ids, completion_ids[:3])  # the completion's end is cut, never the prompt


def test_collate_masks_exactly_the_positions_that_predict_completion_tokens():
    batch = yfpo.collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 4, 5, 0], [7, 8, 9, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def texts(completions):
    return [c["text"] for c in completions]


@pytest.mark.parametrize("text, stated", [
    ("so 3 + 9 = 12. The answer is 1", False),      # the number may go on: "... is 12"
    ("The answer is 12", False),
    ("The answer is 12.", False),                   # "12." may still become 12.5
    ("The answer is 12.\n", True),
    ("The answer is 12. ", True),
    ("The answer is 12.5 dollars", True),
    ("The answer is 1,2", False),                   # "1,2" may become 1,234
    ("The answer is 1,234 apples", True),
    ("The answer is $15.", False),
    ("The answer is $15.)", True),
    ("#### 42\n", True),
    ("\\boxed{42}", True),
    ("Step 1 is 12 apples.", False),                # no stated answer at all
])
def test_answer_is_stated_only_once_the_number_is_complete(text, stated):
    assert bool(yfpo.ANSWER_STATED.search(text)) == stated


class ScriptedTokenizer:
    """The tiny tokenizer, except that the first n generated tokens decode to SCRIPT[:n] (one character each)."""
    SCRIPT = "So 3 + 9 = 12. The answer is 12. Then more text follows here."

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def decode(self, tokens, **kwargs):
        return self.SCRIPT[:len(tokens)]


def test_generation_stops_once_the_answer_is_stated(tiny):
    model, tokenizer = tiny
    model.generation_config.eos_token_id = None
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS[:3]]
    for completion in yfpo.generate(model, ScriptedTokenizer(tokenizer), prompts, 2, max_new_tokens=60):
        assert completion == {"text": "So 3 + 9 = 12. The answer is 12. ", "stop": "answer", "tokens": 33}
    tokenizer.eos_token = None  # no EOS either: only the length ends it
    short = yfpo.generate(model, ScriptedTokenizer(tokenizer), prompts[:1], 1, max_new_tokens=31)
    assert short == [{"text": "So 3 + 9 = 12. The answer is 12", "stop": "length", "tokens": 31}]
    assert yfpo.generate(model, ScriptedTokenizer(tokenizer), prompts, 2, max_new_tokens=1) == \
           [{"text": "S", "stop": "length", "tokens": 1}] * 3  # every sequence ends at its first token


def test_greedy_completions_do_not_depend_on_batch_size(tiny):
    model, tokenizer = tiny
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS]
    one = yfpo.generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=24)
    default = yfpo.generate(model, tokenizer, prompts, batch_size=yfpo.GENERATION_BATCH["cpu"], max_new_tokens=24)
    assert one == default and len(set(texts(one))) > 1


def test_rows_that_finish_early_leave_and_each_row_gets_its_own_completion(tiny):
    model, tokenizer = tiny
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS]
    alone = [yfpo.generate(model, tokenizer, [p], 1, max_new_tokens=40)[0] for p in prompts]
    # Make EOS a token these completions emit at different steps, so rows finish (and are refilled) at different times.
    emitted = [t for c in alone for t in tokenizer(c["text"])["input_ids"] if "\ufffd" not in tokenizer.decode([t])]
    model.generation_config.eos_token_id = max(set(emitted), key=emitted.count)
    alone = [yfpo.generate(model, tokenizer, [p], 1, max_new_tokens=40)[0] for p in prompts]
    assert len({c["tokens"] for c in alone}) > 3 and {c["stop"] for c in alone} == {"eos", "length"}
    for batch_size in (3, 8):  # 3: finished rows take waiting prompts; 8: then the batch shrinks
        assert yfpo.generate(model, tokenizer, prompts, batch_size, max_new_tokens=40) == alone


def test_samples_are_seeded_per_sequence_not_per_batch(tiny):
    model, tokenizer = tiny
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS[:5]]
    sample = lambda batch_size, seed: yfpo.generate(model, tokenizer, prompts, batch_size, 16, temperature=0.8,
                                                    num_samples=3, seed=seed)
    one = sample(1, seed=7)
    assert sample(4, seed=7) == one and sample(4, seed=8) != one
    assert len(set(texts(one))) == 15  # three different samples of each prompt


def test_eval_pairs_and_ablate_under_torchrun_write_what_one_process_writes(tiny_dir, data_file, neurons_file,
                                                                            tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (["eval", "--limit", "7", "--max-new-tokens", "12"],
                 ["pairs", "--num-questions", "7", "--samples-per-question", "2", "--max-new-tokens", "12"],
                 ["ablate", "--neurons", neurons_file, "--num-samples", "7", "--nll-batch-size", "2", "--random-seeds",
                  "2", "--eval-accuracy", "--max-new-tokens", "12"]):
        argv = [*argv, "--model", tiny_dir, "--data", data_file, "--device", "cpu", "--batch-size", "2"]
        assert run(*argv, "--out", str(tmp_path / "one")) == 0
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29518", str(HERE / "yfpo.py"), *argv, "--out", str(tmp_path / "two")],
                       check=True, env=env, capture_output=True, timeout=300)
    for name in ("eval.jsonl", "pairs.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    served = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29518", str(HERE / "yfpo.py"), "eval", "--model", tiny_dir, "--data", data_file,
                             "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "served")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert served.returncode != 0 and "--server runs in one process" in served.stderr
    assert not (tmp_path / "served").exists()
    one, two = (json.loads((tmp_path / d / "ablation.json").read_text()) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:  # each rank sums its own NLL batches: equal up to the order of the sums
        assert two[key] == (pytest.approx(one[key], rel=1e-6) if isinstance(one[key], (float, list)) else one[key]), key


@pytest.fixture
def fake_server(tiny_dir):
    """An OpenAI-compatible server on localhost that serves tiny_dir, records each request body and answers
    n choices (in reverse index order, as a server may) that state an answer and then go on."""
    import http.server
    import threading
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a model list at /v1/models, a web page anywhere else
            if self.path == "/v1/models":
                return self.answer({"object": "list", "data": [{"id": tiny_dir, "object": "model"}]})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            self.answer({"choices": [{"index": i, "text": f"Sample {i}. The answer is {8 + i}.\nMore.",
                                      "finish_reason": "length"} for i in reversed(range(body["n"]))]})

        def answer(self, obj):
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_eval_through_a_server_sends_the_prompt_ids_and_settings_and_grades_the_reply(tiny, tiny_dir, data_file,
                                                                                      fake_server, tmp_path):
    url, requests = fake_server
    _, tokenizer = tiny
    assert run("eval", "--model", tiny_dir, "--data", data_file, "--limit", "3", "--max-new-tokens", "50",
               "--server", url + "/v1", "--seed", "5", "--out", str(tmp_path)) == 0
    assert sorted(r["seed"] for r in requests) == [yfpo.sequence_seed(5, q) for q in range(3)]
    first = next(r for r in requests if r["seed"] == yfpo.sequence_seed(5, 0))
    assert first == {"model": tiny_dir, "prompt": tokenizer(yfpo.format_prompt(tokenizer, DEMO_ROWS[0]["question"]),
                                                            add_special_tokens=False)["input_ids"],
                     "max_tokens": 50, "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                     "repetition_penalty": 1.0, "seed": yfpo.sequence_seed(5, 0)}
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == ["Sample 0. The answer is 8.\n"] * 3  # cut where generate() stops
    assert [r["correct"] for r in rows] == [True, False, False] and rows[0]["stop"] == "answer"  # gold 8, 48, 105
    assert json.loads((tmp_path / "summary.json").read_text())["server"] == url


def test_pairs_through_a_server_asks_n_samples_per_question_in_order(tiny_dir, data_file, fake_server, tmp_path):
    url, requests = fake_server
    assert run("pairs", "--model", tiny_dir, "--data", data_file, "--num-questions", "2", "--samples-per-question",
               "3", "--temperature", "0.7", "--server", url, "--out", str(tmp_path)) == 0
    assert len(requests) == 2 and all(r["n"] == 3 and r["temperature"] == 0.7 for r in requests)
    rows = yfpo.load_pairs(tmp_path / "pairs.jsonl")  # question 0 (gold 8): sample 0 is right, sample 1 the first wrong
    assert rows[0]["chosen"][0]["content"] == "Sample 0. The answer is 8.\n"
    assert rows[0]["rejected"][0]["content"] == "Sample 1. The answer is 9.\n"


@pytest.mark.parametrize("case", ["unreachable", "not openai", "other model", "ablate", "identify"])
def test_server_bad_input(case, tiny_dir, data_file, neurons_file, fake_server, tmp_path, capsys):
    url, requests = fake_server
    out = tmp_path / "out"
    argv = ["eval", "--model", tiny_dir, "--data", data_file, "--out", str(out), "--server", url]
    if case == "unreachable":
        import socket
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            argv[-1], says = f"http://127.0.0.1:{s.getsockname()[1]}", "is not an OpenAI-compatible server"
    elif case == "not openai":
        argv[-1], says = url + "/nothing-here", "is not an OpenAI-compatible server"
    elif case == "other model":
        argv[2], says = data_file, f"serves {tiny_dir}, not --model {data_file}"  # any other name
    elif case == "ablate":
        argv[0], says = "ablate", "unrecognized arguments: --server"
        argv += ["--neurons", neurons_file]
    else:
        argv[0], says = "identify", "unrecognized arguments: --server"
    try:
        code = run(*argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and not requests
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_eval_cli_writes_rows_and_summary(tiny_dir, data_file, tmp_path, capsys):
    assert run("eval", "--model", tiny_dir, "--data", data_file, "--limit", "5", "--max-new-tokens", "8",
               "--out", str(tmp_path)) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert set(rows[0]) == {"index", "question", "gold", "completion", "extracted", "rule", "correct", "stop", "tokens"}
    assert all(r["correct"] == yfpo.is_correct(r["completion"], r["gold"]) for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"] == 5 and summary["accuracy"] == summary["correct"] / 5
    assert summary["ci_low"] <= summary["accuracy"] <= summary["ci_high"]
    assert summary["model"] == tiny_dir and summary["limit"] == 5 and summary["prompt_format"] == "chat_template"
    assert "accuracy" in capsys.readouterr().out


def test_paired_difference_counts_the_questions_only_one_run_got_right():
    d = yfpo.paired_difference([(False, True)] * 3 + [(True, True), (False, False)])
    assert d == {"shared": 5, "difference": -0.6, "only_this_correct": 0, "only_other_correct": 3, "mcnemar_p": 0.25}


def test_wilson_interval_known_value():
    low, high = yfpo.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert yfpo.wilson_interval(0, 10)[0] == 0.0


def test_mcnemar_detectable_difference_has_exactly_the_asked_power():
    d = yfpo.mcnemar_detectable(10, 100)  # 10 discordant of 100: significant splits are 0-10, 1-9 and mirrors
    pi = (d * 100 / 10 + 1) / 2
    power = sum(math.comb(10, k) * pi ** k * (1 - pi) ** (10 - k) for k in range(11)
                if yfpo.mcnemar_exact(k, 10 - k) <= 0.05)
    assert math.isclose(power, 0.8, rel_tol=1e-6) and math.isclose(d, 0.0833, abs_tol=1e-4)
    assert yfpo.mcnemar_detectable(5, 100) is None and yfpo.mcnemar_detectable(0, 100) is None  # none can be
    assert yfpo.mcnemar_detectable(40, 200) > yfpo.mcnemar_detectable(40, 400)  # the same count among more


def test_bootstrap_ci_is_reproducible_from_its_seed_and_brackets_the_mean():
    values = torch.arange(50, dtype=torch.float64) ** 1.5
    a, b = yfpo.bootstrap_ci(values, seed=3), yfpo.bootstrap_ci(values, seed=3)
    assert a == b and a != yfpo.bootstrap_ci(values, seed=4)
    assert a[0] < values.mean().item() < a[1]
    assert yfpo.bootstrap_ci(torch.ones(20), seed=0) == (1.0, 1.0)


def test_mcnemar_exact_known_values():
    assert yfpo.mcnemar_exact(0, 0) == 1.0
    assert yfpo.mcnemar_exact(0, 5) == 2 / 32
    assert math.isclose(yfpo.mcnemar_exact(2, 8), 2 * (1 + 10 + 45) / 1024)


@pytest.mark.parametrize("case", ["missing file", "bad json line", "no question", "answer not text", "no marker", "limit 0",
                                  "negative limit", "model missing", "out is a file", "hub model", "hub data",
                                  "gguf without its packages"])
def test_eval_bad_input_is_one_line_exit_2_and_no_output(case, tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    out = tmp_path / "out"
    argv = {"model": tiny_dir, "data": data_file, "out": str(out)}
    extra, says = [], None
    if case == "missing file":
        argv["data"], says = str(tmp_path / "nope.jsonl"), "data file missing"
    elif case == "bad json line":
        bad.write_text(json.dumps(DEMO_ROWS[0]) + "\n{oops\n")
        argv["data"], says = str(bad), "bad.jsonl:2: not valid JSON"
    elif case == "no question":
        bad.write_text(json.dumps({"answer": "#### 1"}) + "\n")
        argv["data"], says = str(bad), "row 1 has no 'question' field"
    elif case == "answer not text":
        bad.write_text(json.dumps({"question": "q", "answer": 5}) + "\n")
        argv["data"], says = str(bad), "row 1: 'question' and 'answer' must be text"
    elif case == "no marker":
        bad.write_text(json.dumps(DEMO_ROWS[0]) + "\n" + json.dumps({"question": "q", "answer": "5"}) + "\n")
        argv["data"], says = str(bad), "row 2: the answer has no '#### N'"
    elif case == "limit 0":
        extra, says = ["--limit", "0"], "--limit: must be a positive int"
    elif case == "negative limit":
        extra, says = ["--limit", "-3"], "--limit: must be a positive int"
    elif case == "model missing":
        argv["model"], says = str(tmp_path / "no-model"), "model path does not exist"
    elif case == "out is a file":
        out.write_text("x")
        argv["out"], says = str(out), "is an existing file"
    elif case == "hub model":  # offline, a hub id that is not cached
        argv["model"], says = "no-such-org/no-such-model", "offline, pass a local folder or .gguf file"
    elif case == "hub data":
        argv["data"], says = "no-such-org/no-such-data", "offline, pass a local file"
    elif case == "gguf without its packages":
        (tmp_path / "model.gguf").write_bytes(b"GGUF")
        real = yfpo.importlib.util.find_spec
        monkeypatch.setattr(yfpo.importlib.util, "find_spec", lambda name, *rest: None if name == "gguf" else real(name, *rest))
        argv["model"], says = str(tmp_path / "model.gguf"), "needs the optional packages: pip install gguf accelerate"
    code = None
    try:
        code = run("eval", "--model", argv["model"], "--data", argv["data"], "--out", argv["out"], *extra)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.is_dir()


# ---------------------------------------------------------------------------------------------
# Neurons: relevance, selection, the saved set, ablation
# ---------------------------------------------------------------------------------------------

def test_relevance_is_finite_and_leaves_the_weights_grad_alone(tiny):
    model, tokenizer = tiny
    with yfpo.attnlrp(model):
        relevance, gradient = yfpo.neuron_relevance(model, **sample_batch(tokenizer, DEMO_ROWS[:4]))
    assert relevance.shape == gradient.shape == (4, 2, 128)
    assert torch.isfinite(relevance).all() and relevance.abs().max() > 0 and torch.isfinite(gradient).all()
    assert all(p.grad is None for p in model.parameters())


def test_relevance_does_not_depend_on_batch_size(tiny):
    model, tokenizer = tiny
    with yfpo.attnlrp(model):
        four = yfpo.neuron_relevance(model, **sample_batch(tokenizer, DEMO_ROWS[:4]))
        ones = [yfpo.neuron_relevance(model, **sample_batch(tokenizer, [r])) for r in DEMO_ROWS[:4]]
    for j in (0, 1):  # relevance, gradient
        one = torch.cat([o[j] for o in ones])
        assert torch.allclose(four[j], one, atol=1e-4 * one.abs().max(), rtol=0)


def test_scores_are_relevance_per_solution_token_so_length_does_not_weigh(tiny, monkeypatch):
    model, tokenizer = tiny
    reasoning, gold = DEMO_ROWS[0]["answer"].split("\n####")
    short = sample_batch(tokenizer, DEMO_ROWS[:1])
    long = sample_batch(tokenizer, [{**DEMO_ROWS[0], "answer": f"{reasoning} {reasoning} {reasoning}\n####{gold}"}])
    assert long["loss_mask"].sum() > 1.8 * short["loss_mask"].sum()
    # Relevance v per solution token scores v whatever the length: 1 per token in one sample, 3 in the other -> 2.
    monkeypatch.setattr(yfpo, "neuron_relevance", lambda model, **b: (
        (1.0 if b["loss_mask"].sum() == short["loss_mask"].sum() else 3.0)
        * b["loss_mask"].sum(1)[:, None, None].expand(-1, 2, 128), -torch.ones(1, 2, 128)))
    scores, directions = yfpo.score_neurons(model, [short, long])
    assert torch.allclose(scores, torch.full((2, 128), 2.0)) and (directions == -1).all()


def test_relevance_is_conserved_from_logit_to_input(tiny_llama_dir):
    # AttnLRP is conservative up to the bias terms of its softmax rule (and norm epsilons): the input
    # relevance of one explained logit sums to that logit. Measured on this tiny Llama (no biases),
    # |sum R - logit| / sum |R| = 1.3%, 1.9%, 4.1%, 1.4% for the four samples; tolerance 5%.
    model, tokenizer = yfpo.load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
    model.requires_grad_(False)
    for row in DEMO_ROWS[:4]:
        ids = sample_batch(tokenizer, [row])["input_ids"]
        with yfpo.attnlrp(model):
            x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model.get_decoder()(inputs_embeds=x).last_hidden_state
            logit = model.lm_head(hidden)[0, -2, ids[0, -1]]  # the gold logit of the last token
            logit.backward()
        relevance = x * x.grad
        assert abs(relevance.sum().item() - logit.item()) <= 0.05 * relevance.abs().sum().item()


def test_attnlrp_patch_is_undone(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:2])

    def grads():
        model.zero_grad()
        logps = yfpo.forward_logps(model, batch)
        logps.sum().backward()
        return [p.grad.clone() for p in model.parameters()]
    before = grads()
    with yfpo.attnlrp(model):
        patched = grads()
        yfpo.score_neurons(model, [batch])
    after = grads()
    assert any(not torch.equal(a, b) for a, b in zip(before, patched))  # the patch does change gradients
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(yfpo.UserError, match="'gpt2' is not supported.*llama, qwen2, qwen3"):
        with yfpo.attnlrp(model):
            pass


def test_select_neurons_global_top_k_is_exact():
    scores = torch.tensor([[0.1, 5.0, -1.0, 2.0], [3.0, 0.0, 4.0, -2.0], [1.0, 1.5, 0.2, 0.3]])
    assert yfpo.select_neurons(scores, 3) == [(0, 1, 5.0), (1, 2, 4.0), (1, 0, 3.0)]


def test_select_neurons_per_layer_takes_k_over_L_from_each_layer():
    scores = torch.tensor([[0.1, 5.0, -1.0, 2.0], [3.0, 0.0, 4.0, -2.0], [1.0, 1.5, 0.2, 0.3]])
    picked = yfpo.select_neurons(scores, 6, per_layer=True)
    assert picked == [(0, 1, 5.0), (1, 2, 4.0), (1, 0, 3.0), (0, 3, 2.0), (2, 1, 1.5), (2, 0, 1.0)]


def test_select_neurons_rejects_k_beyond_the_model():
    with pytest.raises(yfpo.UserError, match="--top-k 13 is not between 1 and the model's 12 neurons"):
        yfpo.select_neurons(torch.zeros(3, 4), 13)
    with pytest.raises(yfpo.UserError, match="--per-layer"):
        yfpo.select_neurons(torch.zeros(3, 4), 2, per_layer=True)


def test_identify_writes_a_neuron_set_that_round_trips(neurons_file, tiny):
    model, _ = tiny
    saved = json.loads(Path(neurons_file).read_text())
    assert (saved["num_layers"], saved["intermediate_size"]) == (2, 128)
    assert len(saved["neurons"]) == 12 and sum(saved["counts_per_layer"]) == 12
    scores = [n["score"] for n in saved["neurons"]]
    assert scores == sorted(scores, reverse=True)
    assert all(n["act_std"] > 0 for n in saved["neurons"]) and {n["direction"] for n in saved["neurons"]} <= {-1, 1}
    assert saved["selection"]["num_selected"] == 12 and "per solution token" in saved["selection"]["normalization"]
    assert saved["direction_disagrees_with_mean_sign"] == sum(
        n["direction"] != (-1 if n["act_mean"] < 0 else 1) for n in saved["neurons"])
    loaded = yfpo.load_neurons(neurons_file, model)
    assert loaded == [(n["layer"], n["index"], n["score"], n["act_mean"], n["act_std"], n["direction"])
                      for n in saved["neurons"]]


def test_identify_formats_every_control_row_as_control_text(tiny_dir, data_file, tmp_path, monkeypatch):
    seen, batches = [], yfpo.solution_batches
    monkeypatch.setattr(yfpo, "solution_batches", lambda tokenizer, rows, *args: seen.append(rows) or batches(
        tokenizer, rows, *args))
    assert run("identify", "--model", tiny_dir, "--data", data_file, "--control", data_file, "--num-samples", "2",
               "--top-k", "4", "--out", str(tmp_path)) == 0
    # the control file here is GSM8K itself, with '####' markers: its rows still get no instruction.
    # identify reads the end of the train split (pairs reads its start), the control file from its start.
    assert [r["gold"] for r in seen[0]] == ["32", "30"] and [r["gold"] for r in seen[1]] == [None, None]
    assert [r["index"] for r in seen[0]] == [10, 11] and [r["index"] for r in seen[1]] == [0, 1]
    assert json.loads((tmp_path / "neurons.json").read_text())["selection"]["question_indices"] == [10, 11]


def test_identify_writes_a_random_control_set_matched_on_layer_and_scale(tiny, data_file, neurons_file):
    model, tokenizer = tiny
    selected = json.loads(Path(neurons_file).read_text())
    control = json.loads(Path(neurons_file).with_name("random_neurons.json").read_text())
    picked = {(n["layer"], n["index"]) for n in selected["neurons"]}
    drawn = [(n["layer"], n["index"]) for n in control["neurons"]]
    assert len(set(drawn)) == len(drawn) == len(picked) and not picked & set(drawn)
    assert sorted(l for l, _ in drawn) == sorted(l for l, _ in picked)  # as many per layer
    rows = yfpo.load_gsm8k(data_file, "train")[-8:]
    batches = [sample_batch(tokenizer, rows[i:i + 4], 512) for i in (0, 4)]
    mean, std, mean_abs = yfpo.activation_moments(model, batches)
    generator = torch.Generator().manual_seed(0)  # identify's seed: the matched draw of random_neurons
    assert drawn == yfpo.random_neurons(yfpo.load_neurons(neurons_file, model), mean_abs, generator)
    for n in control["neurons"]:  # its own statistics, from the same pass
        assert math.isclose(n["act_mean"], mean[n["layer"], n["index"]].item(), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(n["act_std"], std[n["layer"], n["index"]].item(), rel_tol=1e-4)
    assert control["selection"]["question_indices"] == list(range(4, 12))


def test_per_layer_records_the_neurons_it_kept(tiny_dir, data_file, tmp_path):
    assert run("identify", "--model", tiny_dir, "--data", data_file, "--num-samples", "4", "--top-k", "5",
               "--per-layer", "--out", str(tmp_path)) == 0
    saved = json.loads((tmp_path / "neurons.json").read_text())
    assert saved["selection"]["top_k"] == 5 and saved["selection"]["num_selected"] == len(saved["neurons"]) == 4


def test_identify_selects_the_top_of_score_neurons(tiny, data_file, neurons_file):
    model, tokenizer = tiny
    rows = yfpo.load_gsm8k(data_file, "train")[-8:]  # identify reads the end of the train split
    batches = [sample_batch(tokenizer, rows[i:i + 4], 512) for i in (0, 4)]
    with yfpo.attnlrp(model):
        scores = yfpo.score_neurons(model, batches)[0]
    expected = [(layer, index) for layer, index, _ in yfpo.select_neurons(scores, 12)]
    saved = json.loads(Path(neurons_file).read_text())["neurons"]
    assert [(n["layer"], n["index"]) for n in saved] == expected


def test_saved_direction_is_the_sign_of_the_summed_gradient(tiny, data_file, neurons_file):
    # the gradient the relevance is made of: AttnLRP's, over the solution tokens of identify's own batches
    model, tokenizer = tiny
    grads = {0: 0, 1: 0}
    for rows in (DEMO_ROWS[4:8], DEMO_ROWS[8:]):  # identify's batches (the split's end), by hand: the gold logits' gradient at down_proj
        batch = sample_batch(tokenizer, rows, 512)
        seen = {}

        def keep_gradient(module, args, i):
            args[0].register_hook(lambda grad: seen.__setitem__(i, grad))
        hooks = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: keep_gradient(m, a, i)) for i in (0, 1)]
        with yfpo.attnlrp(model):
            x = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, attention_mask=batch["attention_mask"]).logits
            gold = logits.gather(-1, batch["labels"][..., None])[..., 0]
            torch.autograd.grad((gold * batch["loss_mask"]).sum(), x)
        for h in hooks:
            h.remove()
        for i in (0, 1):
            own_tokens = torch.nn.functional.pad(batch["loss_mask"], (1, 0))[:, :-1, None]  # the solution's tokens
            grads[i] = grads[i] + (seen[i] * own_tokens).sum((0, 1))
    for n in json.loads(Path(neurons_file).read_text())["neurons"]:
        assert n["direction"] == (1 if grads[n["layer"]][n["index"]] >= 0 else -1)


def test_activation_moments_match_a_direct_computation(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:3])
    mean, std, mean_abs = yfpo.activation_moments(model, [batch])
    assert mean.shape == std.shape == mean_abs.shape == (2, 128)
    seen = {}
    hooks = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i in (0, 1)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    own_tokens = torch.nn.functional.pad(batch["loss_mask"], (1, 0))[:, :-1].bool()  # each solution token's own position
    for layer, index in [(1, 5), (0, 7), (1, 100)]:
        values = seen[layer][..., index][own_tokens].double()
        assert math.isclose(mean[layer, index].item(), values.mean().item(), rel_tol=1e-5)
        assert math.isclose(std[layer, index].item(), values.std(unbiased=False).item(), rel_tol=1e-4)
        assert math.isclose(mean_abs[layer, index].item(), values.abs().mean().item(), rel_tol=1e-5)


def test_ablation_zeroes_inside_and_leaves_the_model_exactly_as_it_was(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=batch["input_ids"]).logits
    seen = []
    with yfpo.ablate_neurons(model, [(0, 3, 1.0), (0, 9, 0.5), (1, 0, 0.1)]):
        hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        inside = model(input_ids=batch["input_ids"]).logits
        hook.remove()
    after = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(before, after) and not torch.equal(before, inside)
    assert seen[0][..., [3, 9]].abs().max() == 0 and seen[0][..., 4].abs().max() > 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not layer.mlp.down_proj._forward_pre_hooks for layer in model.model.layers)


def test_scaling_by_one_changes_nothing_and_by_zero_ablates(tiny):
    model, tokenizer = tiny
    batches = [sample_batch(tokenizer, DEMO_ROWS[:4])]
    neurons = [(0, 3), (1, 9), (1, 50)]
    base = yfpo.gold_nll(model, batches)
    with yfpo.ablate_neurons(model, neurons, scale=1.0):
        assert yfpo.gold_nll(model, batches) == base
    hooks = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(  # the ablation by hand: inputs set to 0
        lambda m, a, layer=layer: (a[0].index_fill(-1, torch.tensor([i for l, i in neurons if l == layer]), 0.0),))
        for layer in (0, 1)]
    zeroed = yfpo.gold_nll(model, batches)
    for h in hooks:
        h.remove()
    with yfpo.ablate_neurons(model, neurons):
        assert yfpo.gold_nll(model, batches) == zeroed != base
    with yfpo.ablate_neurons(model, neurons, scale=1.1):
        assert yfpo.gold_nll(model, batches) not in (base, zeroed)


def test_matched_control_draws_from_the_selected_neurons_bins_and_never_a_selected_one():
    mean_abs = torch.stack([torch.arange(40.0), torch.arange(40.0).flip(0)])  # layer 1: neuron i has 39 - i
    neurons = [(0, 39), (0, 38), (0, 0), (1, 0)]  # the top two and the bottom one of layer 0; the top one of layer 1
    for seed in range(20):
        control = yfpo.random_neurons(neurons, mean_abs, torch.Generator().manual_seed(seed), bins=4)
        # layer 0's 37 others (1..37) in 4 bins by |a|: 1-10, 11-19, 20-28, 29-37; layer 1's others: 1-39
        layer0 = sorted(i for l, i in control if l == 0)
        assert len(layer0) == 3 and 1 <= layer0[0] <= 10 and all(29 <= i <= 37 for i in layer0[1:])
        assert [i for l, i in control if l == 1][0] in range(1, 10)  # layer 1's top bin: |a| = 39 - i in 30..38
        assert not set(control) & set(neurons)
    unmatched = [yfpo.random_neurons(neurons, mean_abs, torch.Generator().manual_seed(s), bins=1) for s in range(20)]
    drawn = {n for control in unmatched for n in control}
    layer0 = [i for l, i in drawn if l == 0]
    assert not drawn & set(neurons) and min(layer0) <= 10 and max(layer0) >= 29  # from any bin, low |a| to high


def test_compare_with_random_gives_z_and_a_ratio_only_above_noise():
    clear = yfpo.compare_with_random(1.0, 2.0, [1.1, 1.3])  # rise 0.2; std 0.1414, 3 standard errors = 0.3
    assert clear["ratio"] is None and "within 3 standard errors" in clear["note"]
    assert math.isclose(clear["z"], (2.0 - 1.2) / math.sqrt(0.02))
    above = yfpo.compare_with_random(1.0, 2.0, [1.19, 1.2, 1.21])  # rise 0.2, std 0.01
    assert math.isclose(above["ratio"], 1.0 / 0.2) and above["note"] is None and math.isclose(above["std"], 0.01)


def test_ablate_cli_writes_the_comparison(tiny_dir, data_file, neurons_file, tmp_path, capsys):
    assert run("ablate", "--model", tiny_dir, "--data", data_file, "--neurons", neurons_file, "--num-samples", "4",
               "--random-seeds", "3", "--eval-accuracy", "--max-new-tokens", "4", "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert result["scale"] == 0 and result["random_seeds"] == 3 and result["nll_ablated"] != result["nll_base"]
    assert math.isclose(result["rise"], result["nll_ablated"] - result["nll_base"])
    for name in ("random_matched", "random_unmatched"):
        r = result[name]
        assert len(r["nll"]) == 3 and math.isclose(r["z"], (result["nll_ablated"] - r["mean"]) / r["std"])
        assert (r["ratio"] is None) == (r["note"] is not None) and r["mean_abs_ratio"] > 0
        assert r["ratio"] is None or math.isclose(r["ratio"], result["rise"] / r["rise"])
    assert result["random_matched"]["nll"] != result["random_unmatched"]["nll"]
    assert 0 <= result["accuracy_base"] <= 1 and 0 <= result["accuracy_ablated"] <= 1
    assert set(result["accuracy_paired"]) == {"shared", "difference", "only_this_correct", "only_other_correct", "mcnemar_p"}
    out = capsys.readouterr().out
    assert "random matched" in out and "random unmatched" in out and "McNemar p" in out
    assert all(r["note"] in out for r in (result["random_matched"], result["random_unmatched"]) if r["note"])


def test_ablate_control_text_nll_equals_a_hand_computation(tiny_dir, data_file, neurons_file, tmp_path):
    assert run("ablate", "--model", tiny_dir, "--data", data_file, "--neurons", neurons_file, "--num-samples", "3",
               "--random-seeds", "2", "--control", data_file, "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())["control"]
    model, tokenizer = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)
    neurons = yfpo.load_neurons(neurons_file, model)

    def nll():  # the control rows one at a time: the question alone as the prompt, the answer whole
        total = count = 0
        for q, a in yfpo.DEMO_PROBLEMS[-3:]:  # the control file's last rows (identify reads its first)
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            full = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant",
                                                                                    "content": a}])
            with torch.no_grad():
                logp = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(full[len(prompt):])
            total -= logp[len(prompt) - 1:].gather(-1, targets[:, None]).sum().item()
            count += len(targets)
        return total / count
    assert result["rows"] == [9, 10, 11] and math.isclose(result["nll_base"], nll(), rel_tol=1e-5)
    with yfpo.ablate_neurons(model, neurons, 0.0):
        assert math.isclose(result["nll_ablated"], nll(), rel_tol=1e-5)
    assert len(result["random_matched"]["nll"]) == 2 and "mean_abs_ratio" in result["random_unmatched"]


@pytest.mark.parametrize("case", ["shape mismatch", "k too large", "unsupported", "one seed", "num-samples 0",
                                  "hub data offline"])
def test_identify_and_ablate_bad_input(case, tiny_dir, data_file, neurons_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    if case == "shape mismatch":
        saved = json.loads(Path(neurons_file).read_text())
        saved["intermediate_size"] = 99
        bad = tmp_path / "neurons.json"
        bad.write_text(json.dumps(saved))
        assert_user_error(capsys, out, "ablate", "--model", tiny_dir, "--data", data_file, "--neurons", str(bad), "--out", out,
                          says="was made for 2 layers x 99 neurons but the model has 2 x 128")
    elif case == "k too large":
        assert_user_error(capsys, out, "identify", "--model", tiny_dir, "--data", data_file, "--top-k", "257", "--out", out,
                          says="--top-k 257 is not between 1 and the model's 256 neurons")
    elif case == "unsupported":
        from transformers import GPT2Config, GPT2LMHeadModel
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=400)).save_pretrained(tmp_path / "gpt2")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (tmp_path / "gpt2" / name).write_bytes((Path(tiny_dir) / name).read_bytes())
        assert_user_error(capsys, out, "identify", "--model", str(tmp_path / "gpt2"), "--data", data_file, "--out", out,
                          says="supported: llama, qwen2, qwen3")
    elif case == "one seed":
        assert_user_error(capsys, out, "ablate", "--model", tiny_dir, "--data", data_file, "--neurons", neurons_file,
                          "--random-seeds", "1", "--out", out, says="--random-seeds 1: the controls' std needs at least 2")
    elif case == "hub data offline":  # identify reads the train split: the hint names that file
        assert_user_error(capsys, out, "identify", "--model", tiny_dir, "--data", "no-such-org/no-such-data", "--out", out,
                          says="offline, pass a local file: --data /path/to/train.jsonl")
    else:
        with pytest.raises(SystemExit) as e:
            run("identify", "--model", tiny_dir, "--num-samples", "0", "--out", out)
        assert e.value.code == 2 and "--num-samples: must be a positive int" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------

def test_make_pairs_pairs_a_right_and_a_wrong_sample(tiny):
    _, tokenizer = tiny
    rows = [dict(r, gold=yfpo.parse_gold(r["answer"])) for r in DEMO_ROWS[:3]]
    samples = [["The answer is 7.", "The answer is 8."],  # gold 8: one right, one wrong
               ["The answer is 1.", "no idea"],           # gold 48: none right -> the gold solution is chosen
               ["The answer is 105.", "#### 105"]]        # gold 105: all right -> skipped
    pairs, counts = yfpo.make_pairs(tokenizer, rows, samples)
    assert counts == {"questions": 3, "samples": 6, "correct_samples": 3, "all_correct_skipped": 1,
                      "chosen_is_gold": 1, "pairs": 2}
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "The answer is 8."}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "The answer is 7."}]
    assert pairs[1]["chosen"][0]["content"] == yfpo.gold_solution(rows[1]["answer"]) and pairs[1]["chosen_is_gold"]
    assert pairs[1]["prompt"] == yfpo.prompt_messages(rows[1]["question"]) and pairs[1]["question_index"] == 1


def test_plain_format_completions_start_with_one_space(tiny):
    _, tokenizer = tiny
    tokenizer.chat_template = None
    assert yfpo.make_completion(tokenizer, " The answer is 4.") == yfpo.make_completion(tokenizer, "The answer is 4.")
    assert yfpo.make_completion(tokenizer, "The answer is 4.") == " The answer is 4."


def test_pairs_cli_writes_trl_rows(tiny_dir, data_file, tmp_path):
    assert run("pairs", "--model", tiny_dir, "--data", data_file, "--num-questions", "3", "--samples-per-question", "2",
               "--max-new-tokens", "8", "--out", str(tmp_path)) == 0
    rows = yfpo.load_pairs(tmp_path / "pairs.jsonl")
    assert len(rows) == 3 and [r["question_index"] for r in rows] == [0, 1, 2]  # a random model is always wrong
    assert all(r["chosen_is_gold"] and r["rejected"][0]["role"] == "assistant" for r in rows)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def test_dpo_loss_on_hand_computed_numbers():
    losses, chosen, rejected = yfpo.dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0]),
                                             torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]), beta=0.5)
    # h = (1) - (-1) = 2 -> -log sigmoid(1); h = 0 - 1 = -1 -> -log sigmoid(-0.5)
    assert torch.allclose(losses, torch.tensor([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))]))
    assert torch.allclose(chosen, torch.tensor([0.5, 0.0])) and torch.allclose(rejected, torch.tensor([-0.5, 0.5]))


def test_yfpo_loss_variants():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    h, m = 1.0, 0.2
    loss = yfpo.yfpo_loss(pc, pr, rc, rr, torch.tensor([m]), beta=0.1, lam=0.5, gamma=2.0, yoke="loss")[0]
    assert torch.allclose(loss, torch.tensor([-math.log(1 / (1 + math.exp(-0.1 * h))) - 0.5 * math.log(1 / (1 + math.exp(-2 * m)))]))
    reward = yfpo.yfpo_loss(pc, pr, rc, rr, torch.tensor([m]), beta=0.1, lam=0.5, gamma=2.0, yoke="reward")[0]
    assert torch.allclose(reward, torch.tensor([-math.log(1 / (1 + math.exp(-(0.1 * h + 0.5 * 2 * m))))]))
    dpo = yfpo.dpo_loss(pc, pr, rc, rr, 0.1)[0]
    assert torch.equal(yfpo.yfpo_loss(pc, pr, rc, rr, None, beta=0.1, lam=0.0)[0], dpo)


def test_completion_logps_matches_a_direct_log_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]).float()
    direct = (logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)
    assert torch.allclose(yfpo.completion_logps(logits, labels, mask), direct, atol=1e-6)


def test_neuron_scores_normalize_align_with_the_saved_direction_and_average():
    acts = torch.tensor([[[3.0, -4.0], [5.0, -2.0], [100.0, 100.0]]])  # [B=1, T=3, K=2]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 1.0])
    # direction (1, -1): z = [[1, 2], [2, 0]] -> per-token means [1.5, 1.0] -> 1.25 (the masked token is ignored)
    assert torch.allclose(yfpo.neuron_scores(acts, mask, mean, std, torch.tensor([1.0, -1.0])), torch.tensor([1.25]))
    # the direction, not the sign of the mean: neuron 2 raising the logits as it grows gives z = [-2, 0] there
    assert torch.allclose(yfpo.neuron_scores(acts, mask, mean, std, torch.tensor([1.0, 1.0])), torch.tensor([0.25]))


def test_completion_logps_reads_several_label_sets_off_one_logits_tensor():
    torch.manual_seed(0)
    logits, labels, mask = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4, 2)), torch.randint(0, 2, (2, 4, 2)).float()
    both = yfpo.completion_logps(logits, labels, mask)
    assert both.shape == (2, 2)
    for j in (0, 1):
        assert torch.allclose(both[:, j], yfpo.completion_logps(logits, labels[..., j], mask[..., j]))


def test_collate_pairs_packs_prompt_once_with_a_block_mask():
    batch = yfpo.collate_pairs([([1, 2], [3, 4], [5]), ([6], [7], [8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert batch["attention_mask"][0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                    [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]  # rejected skips chosen
    assert batch["loss_mask"][0].T.tolist() == [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert batch["labels"][0, 1].tolist() == [3, 5]  # the last prompt token predicts both first tokens
    assert batch["loss_mask"][1].T.tolist() == [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0]]
    assert batch["labels"][1, 2, 1] == 9
    # neuron scores read each completion's own tokens: not the shared last prompt position
    assert batch["neuron_mask"][0].T.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert batch["neuron_mask"][1].T.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 0]]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_pairs_give_the_log_probs_and_neuron_scores_of_separate_sequences(attention, tiny, pairs_file):
    model, tokenizer = tiny
    model.config._attn_implementation = attention
    pairs = yfpo.tokenize_pairs(tokenizer, yfpo.load_pairs(pairs_file)[:3], 256)
    neurons, stats = [(0, 3), (1, 5), (1, 100)], [torch.tensor(v) for v in ([0.1, -0.2, 0.3], [1.0, 2.0, 0.5], [1.0, -1.0, 1.0])]
    with yfpo.NeuronCapture(model, neurons, *stats) as capture:
        logps, scores = yfpo.pair_forward(model, yfpo.collate_pairs(pairs, tokenizer.pad_token_id), capture)
        for j in (0, 1):  # chosen, then rejected, as ordinary right-padded sequences
            separate = yfpo.collate([(pair[0], pair[j + 1]) for pair in pairs], tokenizer.pad_token_id)
            expected = yfpo.forward_logps(model, separate)
            own_tokens = torch.nn.functional.pad(separate["loss_mask"], (1, 0))[:, :-1]  # the completion's tokens
            expected_scores = capture.scores(own_tokens)
            assert torch.allclose(logps[:, j], expected, rtol=1e-5)
            assert torch.allclose(scores[:, j], expected_scores, rtol=1e-4, atol=1e-6)


def test_capture_hooks_take_exactly_the_down_proj_inputs(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:2])
    seen = {}
    hooks = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i in (0, 1)]
    neurons = [(1, 7), (0, 3), (1, 2), (0, 100)]
    with yfpo.NeuronCapture(model, neurons) as capture:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        acts = capture.activations()
    for h in hooks:
        h.remove()
    expected = torch.stack([seen[layer][..., index] for layer, index in neurons], dim=-1)
    assert torch.equal(acts, expected) and acts.requires_grad


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def test_train_cli_logs_trl_metrics_and_saves_a_loadable_model(tiny_dir, pairs_file, neurons_file, tmp_path):
    rows = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--max-steps", "3", "--warmup-ratio", "0.5")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(yfpo.PAIR_METRICS) | {"grad_norm", "learning_rate", "step_time_s", "tokens_per_s", "mfu"} <= set(rows[0])
    assert [r["learning_rate"] for r in rows] == [5e-4, 1e-3, 1e-3] and all(r["mfu"] > 0 for r in rows)
    assert abs(rows[0]["rewards/margins"]) < 1e-4  # step 1: the policy is the reference
    assert all({"grad_norm/dpo", "grad_norm/neuron", "neuron/share", "grad_cosine"} <= set(r) for r in rows)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 2 and (tmp_path / "model" / "trainer_state.pt").is_file()


def test_logged_term_gradient_norms_equal_norms_computed_by_hand(tiny_dir, pairs_file, neurons_file, tmp_path):
    (row,) = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--lam", "0.5", "--gamma", "2",
                   "--batch-size", "8", "--max-steps", "1", "--balance", "none")  # one step over all 8 pairs
    model, tokenizer = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)
    neurons = yfpo.load_neurons(neurons_file, model)
    batch = yfpo.collate_pairs(yfpo.tokenize_pairs(tokenizer, yfpo.load_pairs(pairs_file), 256), tokenizer.pad_token_id)
    with yfpo.NeuronCapture(model, neurons, *(torch.tensor([n[k] for n in neurons]) for k in (3, 4, 5))) as capture:
        logps, scores = yfpo.pair_forward(model, batch, capture)  # at step 1 the policy is the reference
    ref = logps.detach()
    dpo = yfpo.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.1)[0].mean()
    neuron = 0.5 * -torch.nn.functional.logsigmoid(2 * (scores[:, 0] - scores[:, 1])).mean()

    def norm(loss):
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        return torch.cat([g.flatten() for g in grads if g is not None]).norm().item()
    assert math.isclose(row["grad_norm/dpo"], norm(dpo), rel_tol=1e-4)
    assert math.isclose(row["grad_norm/neuron"], norm(neuron), rel_tol=1e-4)
    assert math.isclose(row["grad_norm"], norm(dpo + neuron), rel_tol=1e-4)


@pytest.mark.parametrize("yoke, margin", [("loss", "policy"), ("reward", "policy"), ("reward", "relative")])
def test_calibration_makes_the_step_1_share_equal_lam(yoke, margin, tiny_dir, pairs_file, neurons_file, tmp_path):
    # one step over all 8 pairs, which are also the calibration pairs: the probe measures exactly lam
    (row,) = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--lam", "0.3", "--yoke", yoke,
                   "--neuron-margin", margin, "--batch-size", "8", "--max-steps", "1")
    assert abs(row["neuron/share"] - 0.3) < 1e-4 and row["c"] == torch.load(tmp_path / "reference.pt")["c"]
    assert row["c"] != 1 and -1 <= row["grad_cosine"] <= 1
    state = torch.load(tmp_path / "model" / "trainer_state.pt", weights_only=False)
    assert state["c"] == row["c"]  # saved with the checkpoint


def test_balance_none_is_the_raw_loss(tiny_dir, pairs_file, neurons_file, tmp_path):
    args = ("--neurons", neurons_file, "--lam", "0.5", "--gamma", "2", "--batch-size", "8", "--max-steps", "1")
    (raw,) = train(tiny_dir, pairs_file, tmp_path / "raw", *args, "--balance", "none")
    (share,) = train(tiny_dir, pairs_file, tmp_path / "share", *args)
    # step 1, policy = reference: h = 0, so loss = log 2 + lam * c * loss/neuron, with c = 1 for none
    assert raw["c"] == 1 and math.isclose(raw["loss"], math.log(2) + 0.5 * raw["loss/neuron"], rel_tol=1e-6)
    assert math.isclose(share["loss"], math.log(2) + 0.5 * share["c"] * share["loss/neuron"], rel_tol=1e-6)
    assert math.isclose(share["neuron/share"], 0.5, rel_tol=1e-4)
    assert math.isclose(share["neuron/share"] / raw["neuron/share"], share["c"], rel_tol=1e-4)


def test_gamma_auto_is_one_over_the_std_of_the_reference_margins(tiny_dir, pairs_file, neurons_file, tmp_path):
    rows = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--max-steps", "2")
    reference = torch.load(tmp_path / "reference.pt")["neuron"]
    expected = 1 / (reference[:, 0] - reference[:, 1]).std().item()
    assert all(math.isclose(r["gamma"], expected, rel_tol=1e-6) for r in rows)
    assert train(tiny_dir, pairs_file, tmp_path / "fixed", "--neurons", neurons_file, "--max-steps", "1",
                 "--gamma", "2.5")[0]["gamma"] == 2.5


def test_relative_margin_is_the_policy_margin_minus_the_reference_one(tiny_dir, pairs_file, neurons_file, tmp_path):
    args = ("--neurons", neurons_file, "--lam", "1", "--gamma", "3", "--max-steps", "1")
    (policy,) = train(tiny_dir, pairs_file, tmp_path / "policy", *args)
    (relative,) = train(tiny_dir, pairs_file, tmp_path / "relative", *args, "--neuron-margin", "relative")
    # step 1: the policy is the reference, so m - m_ref = 0 and the neuron loss is -log sigmoid(0) = log 2
    assert math.isclose(relative["loss/neuron"], math.log(2), rel_tol=1e-6)
    assert abs(policy["loss/neuron"] - math.log(2)) > 1e-3 and policy["neuron/margin"] == relative["neuron/margin"]


def test_dropout_is_off_in_training(tiny_dir, pairs_file, tmp_path):
    import shutil
    shutil.copytree(tiny_dir, tmp_path / "dropout")
    config = json.loads((tmp_path / "dropout" / "config.json").read_text())
    (tmp_path / "dropout" / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    (row,) = train(str(tmp_path / "dropout"), pairs_file, tmp_path / "out", "--lam", "0", "--max-steps", "1")
    # the training forward gives the reference pass's (eval mode) log-probs: no dropout in either
    assert abs(row["rewards/chosen"]) < 1e-6 and abs(row["rewards/rejected"]) < 1e-6


def test_train_refuses_attention_that_cannot_take_the_packed_mask(tiny_dir, pairs_file, tmp_path, capsys, monkeypatch):
    load = yfpo.load_model

    def load_with_flex_attention(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.config._attn_implementation = "flex_attention"
        return model, tokenizer
    monkeypatch.setattr(yfpo, "load_model", load_with_flex_attention)
    assert_user_error(capsys, str(tmp_path / "out"), "train", "--model", tiny_dir, "--pairs", pairs_file,
                      "--lam", "0", "--out", str(tmp_path / "out"), says="flex_attention attention cannot take")


def test_gradient_accumulation_is_invariant(tiny_dir, pairs_file, neurons_file, tmp_path, monkeypatch):
    # batch 1 x accum 4 == batch 4 x accum 1: the same loss and the same gradients (the neuron term included)
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(parameters, max_norm):
        parameters = list(parameters)
        grads.append([p.grad.clone() for p in parameters])
        return clip(parameters, max_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    (a,) = train(tiny_dir, pairs_file, tmp_path / "a", "--batch-size", "1", "--grad-accum", "4", "--max-steps", "1", "--neurons", neurons_file)
    (b,) = train(tiny_dir, pairs_file, tmp_path / "b", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "1", "--neurons", neurons_file)
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        assert math.isclose(a[key], b[key], rel_tol=1e-5), key
    # every gradient tensor agrees to 1e-5 of its own scale (measured: 1.6e-6; padding changes the sums' order)
    assert len(grads) == 2 and all((x - y).abs().max() <= 1e-5 * y.abs().max() for x, y in zip(*grads))


def test_lambda_zero_is_plain_dpo(tiny_dir, pairs_file, neurons_file, tmp_path):
    from safetensors.torch import load_file
    train(tiny_dir, pairs_file, tmp_path / "plain", "--lam", "0", "--max-steps", "3")
    train(tiny_dir, pairs_file, tmp_path / "zero", "--lam", "0", "--neurons", neurons_file, "--max-steps", "3")
    plain, zero = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("plain", "zero"))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)


def test_neuron_term_raises_the_neuron_margin(tiny_dir, pairs_file, neurons_file, tmp_path):
    base = train(tiny_dir, pairs_file, tmp_path / "dpo", "--lam", "0", "--neurons", neurons_file, "--epochs", "3")
    yoked = train(tiny_dir, pairs_file, tmp_path / "yfpo", "--lam", "1", "--gamma", "5", "--neurons", neurons_file, "--epochs", "3")
    assert base[0]["neuron/margin"] == yoked[0]["neuron/margin"]  # the same start
    gain = lambda rows: sum(r["neuron/margin_gain"] for r in rows[-4:]) / 4  # margin over the reference's, late in training
    assert gain(yoked) > gain(base) + 0.05


def test_gradient_checkpointing_keeps_loss_and_gradient(tiny_dir, pairs_file, neurons_file, tmp_path):
    # non-reentrant checkpointing keeps the hooked activations, and so the neuron term, differentiable
    args = ("--lam", "1", "--neurons", neurons_file, "--max-steps", "1")
    (plain,) = train(tiny_dir, pairs_file, tmp_path / "plain", *args)
    (checkpointed,) = train(tiny_dir, pairs_file, tmp_path / "gc", *args, "--gradient-checkpointing")
    for key in ("loss", "loss/neuron", "grad_norm"):
        assert math.isclose(plain[key], checkpointed[key], rel_tol=1e-5), key


def test_resume_equals_an_uninterrupted_run(tiny_dir, pairs_file, neurons_file, tmp_path, monkeypatch):
    full = train(tiny_dir, pairs_file, tmp_path / "full", "--neurons", neurons_file, "--epochs", "2", "--save-every", "2")
    saves = []
    real_save = yfpo.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        saves.append(args[-1])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint
    monkeypatch.setattr(yfpo, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dir, pairs_file, tmp_path / "killed", "--neurons", neurons_file, "--epochs", "2", "--save-every", "2")
    monkeypatch.setattr(yfpo, "save_checkpoint", real_save)
    resumed = train(tiny_dir, pairs_file, tmp_path / "killed", "--neurons", neurons_file, "--epochs", "2", "--save-every", "2", "--resume")
    assert len(resumed) == len(full) == 8
    timing = {"step_time_s", "tokens_per_s", "mfu"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in timing} for r in full]


def test_ddp_two_processes_equal_one_process_with_doubled_accumulation(tiny_dir, pairs_file, neurons_file, tmp_path):
    common = ["train", "--model", tiny_dir, "--pairs", pairs_file, "--neurons", neurons_file, "--lr", "1e-3",
              "--batch-size", "1", "--max-steps", "2", "--max-length", "256", "--device", "cpu"]
    assert run(*common, "--grad-accum", "4", "--out", str(tmp_path / "one")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(HERE / "yfpo.py"), *common, "--grad-accum", "2", "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, timeout=300)
    assert len(metrics(tmp_path / "one")) == len(metrics(tmp_path / "two")) == 2
    for one, two in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in ("loss", "loss/neuron", "grad_norm", "grad_norm/dpo", "grad_norm/neuron"):
            assert math.isclose(one[key], two[key], rel_tol=1e-4), key


@pytest.mark.parametrize("case", ["missing field", "empty file", "all truncated", "lam without neurons",
                                  "negative lam without neurons", "neurons shape", "resume without checkpoint",
                                  "no such device", "empty prompt", "gamma auto with one pair", "empty folder",
                                  "overlap"])
def test_train_bad_input(case, tiny_dir, pairs_file, neurons_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["train", "--model", tiny_dir, "--pairs", pairs_file, "--out", out, "--lam", "0", "--device", "cpu"]
    bad = tmp_path / "bad.jsonl"
    if case == "missing field":
        lines = Path(pairs_file).read_text().splitlines()
        row = json.loads(lines[2])
        del row["rejected"]
        bad.write_text("\n".join(lines[:2] + [json.dumps(row)]) + "\n")
        argv[4], says = str(bad), "bad.jsonl:3: missing field 'rejected'"
    elif case == "empty file":
        bad.write_text("")
        argv[4], says = str(bad), "holds no pairs"
    elif case == "all truncated":
        argv, says = argv + ["--max-length", "8"], "every pair was truncated away"
    elif case == "lam without neurons":
        argv, says = argv + ["--lam", "0.3"], "--lam 0.3 needs --neurons"
    elif case == "negative lam without neurons":
        argv, says = argv + ["--lam", "-0.3"], "--lam -0.3 needs --neurons"
    elif case == "empty prompt":
        lines = Path(pairs_file).read_text().splitlines()
        bad.write_text("\n".join(lines[:1] + [json.dumps({**json.loads(lines[1]), "prompt": []})]) + "\n")
        argv[4], says = str(bad), "bad.jsonl:2: empty prompt"
    elif case == "gamma auto with one pair":
        bad.write_text(Path(pairs_file).read_text().splitlines()[0] + "\n")
        argv, says = argv + ["--pairs", str(bad), "--neurons", neurons_file, "--lam", "0.3", "--batch-size", "1",
                             "--grad-accum", "1"], \
            "--gamma auto (1 / std of the pairs' reference neuron margins) needs 2 pairs"
    elif case == "no such device":
        argv, says = argv + ["--device", "gpu"], "--device gpu is not a device"
    elif case == "neurons shape":
        saved = json.loads(Path(neurons_file).read_text())
        saved["num_layers"] = 5
        (tmp_path / "n.json").write_text(json.dumps(saved))
        argv, says = argv + ["--neurons", str(tmp_path / "n.json")], "was made for 5 layers x 128 neurons"
    elif case == "empty folder":  # a first try: the pairs are named first, with the command that makes them
        argv, says = ["train", "--lam", "0.3", "--out", out], "pairs file missing: " + str(Path(out) / "pairs.jsonl") + \
            "; make one with `python yfpo.py pairs`"
    elif case == "overlap":  # pairs on the questions identify selected the neurons on (rows 4 to 11)
        rows = [{**json.loads(line), "question_index": i} for i, line in enumerate(Path(pairs_file).read_text().splitlines())]
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv, says = argv + ["--pairs", str(bad), "--neurons", neurons_file], \
            f"{bad} uses 4 questions (first: 4) that {neurons_file} was selected on; pair other questions, or pass " \
            "--allow-overlap"
    else:
        argv, says = argv + ["--resume"], "--resume: no checkpoint"
    assert_user_error(capsys, out, *argv, says=says)


def test_allow_overlap_trains_on_the_selection_questions(tiny_dir, pairs_file, neurons_file, tmp_path):
    rows = [{**json.loads(line), "question_index": i} for i, line in enumerate(Path(pairs_file).read_text().splitlines())]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(train(tiny_dir, str(tmp_path / "p.jsonl"), tmp_path / "out", "--neurons", neurons_file,
                     "--max-steps", "1", "--allow-overlap")) == 1


def test_resume_refuses_a_checkpoint_of_other_pairs(tiny_dir, pairs_file, tmp_path, capsys):
    train(tiny_dir, pairs_file, tmp_path, "--lam", "0", "--max-steps", "1")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(Path(pairs_file).read_text().splitlines(keepends=True)[:6]))
    assert run("train", "--model", tiny_dir, "--pairs", str(fewer), "--lam", "0", "--batch-size", "2", "--grad-accum", "1",
               "--max-length", "256", "--device", "cpu", "--resume", "--out", str(tmp_path)) == 2
    assert "was trained with other pairs" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, pairs_file, tmp_path, capsys):
    code = run("train", "--model", tiny_dir, "--pairs", pairs_file, "--lam", "0", "--lr", "1e30", "--warmup-ratio", "0",
               "--batch-size", "2", "--grad-accum", "1", "--save-every", "1", "--device", "cpu", "--out", str(tmp_path))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after the progress bars
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: non-finite loss or gradient at step 2"), errors
    state = torch.load(tmp_path / "model" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and len(metrics(tmp_path)) == 1


def test_plot_draws_the_training_curves(tiny_dir, pairs_file, tmp_path):
    pytest.importorskip("matplotlib")
    train(tiny_dir, pairs_file, tmp_path, "--max-steps", "2", "--lam", "0")
    assert run("plot", str(tmp_path)) == 0
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Reproduce: every stage in one restartable command, and its report
# ---------------------------------------------------------------------------------------------
REPRODUCE = ["--num-samples", "4", "--top-k", "16", "--ablate-samples", "4", "--random-seeds", "2", "--num-questions", "8",
             "--samples-per-question", "2", "--max-new-tokens", "16", "--lr", "1e-4", "--train-batch-size", "2",
             "--grad-accum", "1", "--epochs", "2", "--max-length", "256", "--save-every", "2", "--eval-limit", "6",
             "--device", "cpu", "--control"]
MODELS = ["base", "dpo", "yfpo", "yfpo_random"]
STAGES = ["identify", "ablate", "pairs", "train_dpo", "train_yfpo", "train_yfpo_random", "eval_base", "eval_dpo",
          "eval_yfpo", "eval_yfpo_random", "heldout", "score_base", "score_dpo", "score_yfpo", "score_yfpo_random"]


def reproduce(tiny_dir, data_file, out, *extra):
    return run("reproduce", "--model", tiny_dir, "--data", data_file, *REPRODUCE, data_file, "--out", str(out), *extra)


def without_wall_times(report):
    return report.split("| stage | wall time")[0]


def stages_run(printed):  # (stages run, stages skipped) by reproduce's screen lines
    return re.findall(r"\[reproduce\] (\w+)(?: \(resuming its checkpoint\))? ->", printed), \
        re.findall(r"\[reproduce\] (\w+): done with these settings, skipped", printed)


@pytest.fixture(scope="session")
def reproduced(tiny_dir, data_file, tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("reproduce")
    assert reproduce(tiny_dir, data_file, out) == 0
    return out


def test_reproduce_report_holds_every_model_run_and_stage(reproduced):
    report = (reproduced / "report.md").read_text()
    for column in ("accuracy", "95% CI", "strict", "correct / total", "vs base", "vs DPO", "detectable",
                   "share first / middle / last", "cosine first / middle / last", "reward accuracy",
                   "reward margin", "neuron margin", "its gain over the reference", "grad norm DPO first / last",
                   "grad norm neuron first / last", "Held-out endpoints", "wall time"):
        assert column in report, column
    for name in MODELS:
        s = json.loads((reproduced / f"eval_{name}" / "summary.json").read_text())
        assert f"| {name} | {s['accuracy']:.4f} | [{s['ci_low']:.4f}, {s['ci_high']:.4f}] | " \
               f"{s['accuracy_strict']:.4f} | {s['correct']} / 6 |" in report
    rows = {name: yfpo.read_jsonl(reproduced / f"eval_{name}" / "eval.jsonl") for name in MODELS}
    for name in ("yfpo", "yfpo_random"):  # against DPO, the last column
        d = yfpo.paired_difference([(a["correct"], b["correct"]) for a, b in zip(rows[name], rows["dpo"])])
        assert f"{d['difference']:+.4f} (p {d['mcnemar_p']:.3g}; {d['only_this_correct']} vs " \
               f"{d['only_other_correct']}; detectable" in report.split(f"| {name} |")[1].split("\n")[0]
    for run_name in MODELS[1:]:
        steps = metrics(reproduced / f"train_{run_name}")
        last = steps[-1]
        assert f"| {run_name} | {last['step']} | {last['c']:.4g} | " in report
        assert f"| {last['rewards/accuracies']:.3f} | {last['rewards/margins']:.4f} | {last['neuron/margin']:.4f} | " \
               f"{last['neuron/margin_gain']:+.4f} | " in report
    dpo_steps = metrics(reproduced / "train_dpo")  # lam = 0: the DPO term's gradient is the whole gradient
    assert f"| {dpo_steps[0]['grad_norm']:.4g} / {dpo_steps[-1]['grad_norm']:.4g} | — |\n" in report
    probes = [m for m in metrics(reproduced / "train_yfpo") if "neuron/share" in m]  # first, middle, last
    assert [m["step"] for m in probes] == [1, 5, 8]
    assert " / ".join(f"{m['neuron/share']:.3g}" for m in probes) in report
    ablation = json.loads((reproduced / "ablate" / "ablation.json").read_text())
    assert f"Ablation on math text" in report and f"rise {ablation['random_matched']['rise']:+.4f}" in report
    assert f"Ablation on control text" in report and f"rise {ablation['control']['rise']:+.4f}" in report
    assert all(f"| {stage} |" in report.split("| stage | wall time")[1] for stage in STAGES)
    assert (reproduced / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_heldout_pairs_are_the_base_models_wrong_answers_with_gold_as_chosen(reproduced):
    evaluated = yfpo.read_jsonl(reproduced / "eval_base" / "eval.jsonl")
    pairs = yfpo.read_jsonl(reproduced / "heldout" / "pairs.jsonl")
    wrong = [e for e in evaluated if not e["correct"]]
    assert [p["question_index"] for p in pairs] == [e["index"] for e in wrong] and pairs
    for p, e in zip(pairs, wrong):
        assert p["rejected"][0]["content"] == e["completion"]
        assert p["chosen"][0]["content"] == yfpo.gold_solution(yfpo.DEMO_PROBLEMS[e["index"]][1])


def test_heldout_table_is_the_scores_against_the_base_model(reproduced):
    report = (reproduced / "report.md").read_text()
    scores = {name: yfpo.read_jsonl(reproduced / f"score_{name}" / "scores.jsonl") for name in MODELS}
    base = scores["base"]
    margin = torch.tensor([r["neurons"]["neurons"][0] - r["neurons"]["neurons"][1] for r in base], dtype=torch.float64)
    low, high = yfpo.bootstrap_ci(margin, seed=0)
    nll = torch.tensor([-r["logps"][0] / r["chosen_tokens"] for r in base], dtype=torch.float64)
    assert f"| base | — | — | {nll.mean():.4f} [" in report and f"{margin.mean():.4f} [{low:.4f}, {high:.4f}]" in report
    h = torch.tensor([(y["logps"][0] - b["logps"][0]) - (y["logps"][1] - b["logps"][1])
                      for y, b in zip(scores["yfpo"], base)], dtype=torch.float64)
    low, high = yfpo.bootstrap_ci((h > 0).double(), seed=0)
    assert f"| yfpo | {(h > 0).double().mean():.4f} [{low:.4f}, {high:.4f}] | {h.mean():.4f} [" in report


def test_the_random_arm_trains_on_the_matched_set_with_its_own_c(reproduced):
    def argv(stage):
        return json.loads((reproduced / stage / "stage.json").read_text())["argv"]
    assert str(reproduced / "identify" / "random_neurons.json") in argv("train_yfpo_random")
    assert [a for a in argv("train_yfpo_random") if a != str(reproduced / "identify" / "random_neurons.json")] == \
        [a for a in argv("train_yfpo") if a != str(reproduced / "identify" / "neurons.json")]  # the same otherwise
    c = {run: torch.load(reproduced / f"train_{run}" / "reference.pt")["c"] for run in ("yfpo", "yfpo_random")}
    assert c["yfpo"] != c["yfpo_random"] and metrics(reproduced / "train_yfpo_random")[0]["c"] == c["yfpo_random"]


def test_reproduce_passes_each_flag_to_its_stage(reproduced):
    def value(stage, flag):  # the flag's last value on the stage's command line, as argparse reads it
        argv = json.loads((reproduced / stage / "stage.json").read_text())["argv"]
        return argv[len(argv) - argv[::-1].index(flag)]
    assert [value("identify", f) for f in ("--num-samples", "--top-k", "--max-length")] == ["4", "16", "256"]
    assert [value("ablate", f) for f in ("--num-samples", "--random-seeds", "--max-new-tokens")] == ["4", "2", "16"]
    assert [value("pairs", f) for f in ("--num-questions", "--samples-per-question", "--temperature")] == ["8", "2", "0.8"]
    assert [value("train_yfpo", f) for f in ("--lam", "--lr", "--batch-size", "--grad-accum", "--epochs", "--save-every")] \
        == ["0.3", "0.0001", "2", "1", "2", "2"]
    assert value("train_dpo", "--lam") == "0.0" and value("eval_yfpo", "--limit") == "6"
    assert value("eval_yfpo", "--model") == str(reproduced / "train_yfpo" / "model")
    assert json.loads((reproduced / "ablate" / "ablation.json").read_text())["random_seeds"] == 2


def test_reproduce_again_skips_every_stage_and_writes_the_same_report(tiny_dir, data_file, reproduced, capsys):
    before = (reproduced / "report.md").read_text()
    capsys.readouterr()
    assert reproduce(tiny_dir, data_file, reproduced) == 0
    assert stages_run(capsys.readouterr().out) == ([], STAGES)
    assert (reproduced / "report.md").read_text() == before


def test_changing_lam_reruns_only_the_yfpo_training_and_its_eval(tiny_dir, data_file, reproduced, tmp_path, capsys):
    shutil.copytree(reproduced, tmp_path / "copy")  # a moved folder keeps its stages: OUT is not part of a key
    (tmp_path / "copy" / "train_dpo_seed7").mkdir()  # a stage of other settings (another --seeds) leaves
    (tmp_path / "copy" / "train_dpo_seed7" / "stage.json").write_text("{}")
    capsys.readouterr()
    assert reproduce(tiny_dir, data_file, tmp_path / "copy", "--lam", "0.5") == 0
    ran, skipped = stages_run(capsys.readouterr().out)
    assert ran == [s for s in STAGES if s.split("_", 1)[-1] in ("yfpo", "yfpo_random")]  # train, eval, score
    assert skipped == [s for s in STAGES if s not in ran]
    assert "lam=0.5" in (tmp_path / "copy" / "report.md").read_text() and not (tmp_path / "copy" / "train_dpo_seed7").exists()


@pytest.mark.parametrize("where", ["after pairs", "inside training"])
def test_an_interrupted_run_started_again_gives_the_same_report(where, tiny_dir, data_file, reproduced, tmp_path,
                                                                monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    real = yfpo.save_checkpoint
    if where == "after pairs":
        monkeypatch.setattr(yfpo, "cmd_train", interrupt)
    else:  # killed right after train_dpo's first checkpoint (step 2 of 6)
        monkeypatch.setattr(yfpo, "save_checkpoint", lambda *args: (real(*args), interrupt()))
    with pytest.raises(KeyboardInterrupt):
        reproduce(tiny_dir, data_file, tmp_path)
    monkeypatch.undo()
    capsys.readouterr()
    assert reproduce(tiny_dir, data_file, tmp_path) == 0
    printed = capsys.readouterr().out
    assert stages_run(printed) == (STAGES[3:], ["identify", "ablate", "pairs"])
    assert ("train_dpo (resuming its checkpoint)" in printed) == (where == "inside training")
    assert without_wall_times((tmp_path / "report.md").read_text()) == \
        without_wall_times((reproduced / "report.md").read_text())


@pytest.mark.parametrize("case", ["eval-limit 0", "seeds 0", "unreadable control", "missing data"])
def test_reproduce_bad_input_fails_before_any_stage(case, tiny_dir, data_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["reproduce", "--model", tiny_dir, "--data", data_file, "--out", out, "--device", "cpu"]
    if case in ("eval-limit 0", "seeds 0"):
        with pytest.raises(SystemExit) as e:
            run(*argv, "--" + case.split()[0], "0")
        assert e.value.code == 2 and f"--{case.split()[0]}: must be a positive int" in capsys.readouterr().err
    elif case == "unreadable control":
        (tmp_path / "control.jsonl").write_text("{oops\n")
        assert_user_error(capsys, out, *argv, "--control", str(tmp_path / "control.jsonl"),
                          says="control.jsonl:1: not valid JSON")
    else:
        assert_user_error(capsys, out, *argv, "--data", str(tmp_path / "none.jsonl"), says="data file missing")
    assert not Path(out).exists()


def test_demo_is_reproduce_on_a_tiny_model(tmp_path, capsys):
    assert run("demo", "--out", str(tmp_path)) == 0
    for path in ("identify/neurons.json", "ablate/ablation.json", "pairs/pairs.jsonl", "train_dpo/metrics.jsonl",
                 "train_yfpo/model/model.safetensors", "eval_base/summary.json", "eval_yfpo/summary.json", "report.md",
                 "report.png"):
        assert (tmp_path / path).is_file(), path
    assert "accuracy means nothing" in capsys.readouterr().out


def test_plot_overlays_the_runs_of_several_folders(reproduced, tmp_path):
    assert run("plot", str(reproduced), str(reproduced / "train_dpo"), "--out", str(tmp_path / "both.pdf")) == 0
    assert (tmp_path / "both.pdf").read_bytes()[:4] == b"%PDF"  # the format the name asks for
    assert run("plot", str(tmp_path)) == 2  # no runs in it


def test_reproduce_refuses_torchrun(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        monkeypatch.setenv(name, value)
    assert_user_error(capsys, str(tmp_path / "out"), "reproduce", "--model", tiny_dir, "--data", data_file, "--out",
                      str(tmp_path / "out"), "--device", "cpu", says="reproduce runs in one process: no torchrun")


# ---------------------------------------------------------------------------------------------
# Optional: a real model (YFPO_SMOLLM2=/path/to/SmolLM2-135M-Instruct)
# ---------------------------------------------------------------------------------------------
SMOLLM2 = os.environ.get("YFPO_SMOLLM2")
GSM8K_TEST = HERE.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.skipif(not SMOLLM2 or not GSM8K_TEST.is_file(), reason="set YFPO_SMOLLM2 and have ../shared/data/gsm8k")
def test_smollm2_eval_and_identify(tmp_path):
    assert run("eval", "--model", SMOLLM2, "--data", str(GSM8K_TEST), "--limit", "2", "--max-new-tokens", "64",
               "--out", str(tmp_path / "eval")) == 0
    assert run("identify", "--model", SMOLLM2, "--data", str(GSM8K_TEST), "--num-samples", "2", "--top-k", "30",
               "--out", str(tmp_path / "identify")) == 0
    assert json.loads((tmp_path / "identify" / "neurons.json").read_text())["num_layers"] == 30
