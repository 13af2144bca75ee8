"""The specification of yfpo.py: one behaviour per test, on a tiny random model built from a config.

Run: python -m pytest -q test_yfpo.py
Optional, on a real model:
    YFPO_SMOLLM2=/path/to/SmolLM2-135M-Instruct python -m pytest -q -k smollm2
"""
import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach for the hub
import yfpo  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO_ROWS = [{"question": q, "answer": a, "gold": yfpo.parse_gold(a)}
             for q, a in yfpo.DEMO_PROBLEMS]
MODELS = ["base", "dpo", "yfpo", "yfpo_random"]  # what reproduce evaluates; all but base trained


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(yfpo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    return str(yfpo.build_tiny_model(path, model_type="llama"))


@pytest.fixture
def tiny(tiny_dir):
    return yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    path.write_text(jsonl(*DEMO_ROWS))
    return str(path)


@pytest.fixture(scope="session")
def neurons_file(tiny_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("identify")
    assert run("identify", "--model", tiny_dir, "--data", data_file, "--num-samples", "8",
               "--top-k", "12", "--out", str(out)) == 0
    return str(out / "neurons.json")


@pytest.fixture(scope="session")
def pairs_file(tiny_dir, data_file, tmp_path_factory):
    """Eight pairs in TRL's conversational format: chosen = the gold solution, rejected = a wrong
    number."""
    _, tokenizer = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)
    rows = []
    for row in yfpo.load_gsm8k(data_file, "train")[:8]:
        gold = yfpo.gold_solution(row["answer"])
        wrong = gold.replace(row["gold"], str(int(row["gold"]) + 1))
        rows.append({"prompt": yfpo.make_prompt(row["question"]),
                     "chosen": yfpo.make_completion(gold),
                     "rejected": yfpo.make_completion(wrong)})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    yfpo.write(path, rows)
    return str(path)


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib Figures saved while the test runs; each is still saved to its file."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    figures, save = [], Figure.savefig

    def keep_and_save(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep_and_save)
    return figures


def run(*argv):
    return yfpo.main(["--help"] if not argv else list(argv))


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def metrics(out):
    return yfpo.read_jsonl(Path(out) / "metrics.jsonl")


def train(tiny_dir, pairs_file, out, *extra):
    argv = ["train", "--model", tiny_dir, "--pairs", pairs_file, "--lr", "1e-3", "--batch-size",
            "2", "--grad-accum", "1", "--max-length", "256", "--device", "cpu", "--out", str(out),
            *extra]
    assert run(*argv) == 0
    return metrics(out)


def assert_user_error(capsys, out, *argv, says):
    """A user mistake: exit code 2, one line "error: ..." naming the problem, and no out folder."""
    try:
        code = run(*argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert says in err, err
    assert not Path(out).exists()


def sample_batch(tokenizer, rows, max_length=256):
    return yfpo.collate(yfpo.solution_examples(tokenizer, rows, max_length), tokenizer.pad_token_id)


def texts(completions):
    return [c["text"] for c in completions]


class LayerInputs(dict):
    """layer -> the input its down_proj got in the last forward; .grad: layer -> that input's
    gradient, once a backward pass has reached it."""

    def __init__(self):
        super().__init__()
        self.grad = {}


@contextlib.contextmanager
def down_proj_inputs(model, keep_grad=False, edit=None):
    """Within the block, each layer's down_proj input (the neurons' activations) by layer; with
    keep_grad their gradients too; with edit(layer, x), the input is replaced by what it returns."""
    seen = LayerInputs()

    def hook(layer, module, args):
        x = args[0] if edit is None else edit(layer, args[0])
        seen[layer] = x
        if keep_grad and x.requires_grad:
            x.register_hook(lambda grad: seen.grad.__setitem__(layer, grad))
        return None if edit is None else (x,)
    hooks = [block.mlp.down_proj.register_forward_pre_hook(functools.partial(hook, layer))
             for layer, block in enumerate(model.model.layers)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def own_token_mask(loss_mask):
    """The positions of the completion's own tokens (the mask predicts the next token)."""
    return torch.nn.functional.pad(loss_mask, (1, 0))[:, :-1]


PLOTTED = ("loss/dpo", "rewards/margins", "neuron/margin")  # plot's panels, one per y label


def curves(figure):
    """{y label: {line label: (steps, values)}} of plot's line panels."""
    return {ax.get_ylabel(): {line.get_label(): ([int(x) for x in line.get_xdata()],
                                                 [float(y) for y in line.get_ydata()])
                              for line in ax.get_lines()}
            for ax in figure.axes if ax.get_ylabel() in PLOTTED}


def legends(figure):
    """The legend labels of each of plot's line panels."""
    return [[t.get_text() for t in ax.get_legend().get_texts()]
            for ax in figure.axes if ax.get_ylabel() in PLOTTED]


def expected_curves(runs):
    """curves() as plot should draw the metrics.jsonl of runs {label: folder}."""
    return {key: {label: ([m["step"] for m in metrics(folder)], [m[key] for m in metrics(folder)])
                  for label, folder in runs.items()} for key in PLOTTED}


# ---------------------------------------------------------------------------------------------
# Files and data: loading, gold answers, prompts, tokenization, collate
# ---------------------------------------------------------------------------------------------

def test_gold_is_the_text_after_the_marker_without_commas():
    assert yfpo.parse_gold("He has 5.\n#### 1,234") == "1234"
    assert yfpo.parse_gold("#### -3.5 ") == "-3.5"


def test_gold_solution_drops_calculator_marks_and_states_the_answer():
    assert yfpo.gold_solution("4*12=<<4*12=48>>48 eggs.\n#### 48") == \
        "4*12=48 eggs.\nThe answer is 48."


def test_load_local_jsonl_adds_gold(data_file):
    rows = yfpo.load_gsm8k(data_file, "test")
    assert len(rows) == len(DEMO_ROWS) and rows[8]["gold"] == "14400"
    assert rows[0]["question"] == DEMO_ROWS[0]["question"]


def test_load_folder_picks_the_split_file(tmp_path):
    yfpo.write(tmp_path / "train.jsonl", DEMO_ROWS[:3])
    yfpo.write(tmp_path / "test.jsonl", DEMO_ROWS[3:5])
    assert [r["gold"] for r in yfpo.load_gsm8k(str(tmp_path), "test")] == ["15", "32"]


def test_data_that_is_not_jsonl_is_refused_naming_the_path(tmp_path):
    yfpo.write(tmp_path / "train.jsonl", DEMO_ROWS[:3])
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    for data, path in ((tmp_path / "rows.parquet", tmp_path / "rows.parquet"),
                       (tmp_path, tmp_path / "test.jsonl")):  # a folder without the split
        with pytest.raises(yfpo.UserError, match=f"^no .jsonl file at {re.escape(str(path))};"):
            yfpo.load_gsm8k(str(data), "test")


def test_chat_template_prompt_holds_question_instruction_and_generation_prompt(tiny):
    _, tokenizer = tiny
    text = yfpo.format_prompt(tokenizer, "What is 2+2?", system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?\n"
                    + yfpo.INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")


def test_control_rows_are_the_question_alone_and_their_answer_whole(tiny):
    _, tokenizer = tiny
    rows = [{"question": "How do I boil an egg?", "answer": "Put it in boiling water.",
             "gold": None}, DEMO_ROWS[0]]
    examples = yfpo.solution_examples(tokenizer, rows, 256)
    (control_prompt, control_answer), (math_prompt, _) = examples
    control = tokenizer.decode(control_prompt)
    assert control == yfpo.format_prompt(tokenizer, "How do I boil an egg?", instruction=False)
    assert yfpo.INSTRUCTION not in control and "boil an egg?<|im_end|>" in control
    assert tokenizer.decode(control_answer).startswith("Put it in boiling water.")
    assert yfpo.INSTRUCTION in tokenizer.decode(math_prompt)


def test_tokenize_example_splits_the_templated_conversation(tiny):
    _, tokenizer = tiny
    prompt = yfpo.make_prompt("What is 2+2?")
    completion = [{"role": "assistant", "content": "The answer is 4."}]
    prompt_ids, completion_ids = yfpo.tokenize_example(tokenizer, prompt, completion, 512)
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
    assert prompt_ids + completion_ids == whole
    assert tokenizer.decode(completion_ids) == "The answer is 4.<|im_end|>\n"
    short = yfpo.tokenize_example(tokenizer, prompt, completion, len(prompt_ids) + 3)
    assert short == (prompt_ids, completion_ids[:3])  # the completion's end is cut, not the prompt


def test_collate_masks_exactly_the_positions_that_predict_completion_tokens():
    batch = yfpo.collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 4, 5, 0], [7, 8, 9, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Grading (extract_answer, is_correct) and statistics
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
def test_extract_answer_reads_the_last_stated_answer_else_the_last_number(text, expected):
    assert yfpo.extract_answer(text)[0] == expected


def test_extract_answer_names_the_rule_that_fired():
    assert yfpo.extract_answer("so 4 then The answer is 5.") == ("5", "strict")
    assert yfpo.extract_answer("so 4 then 5") == ("5", "flexible")
    assert yfpo.extract_answer("nothing") == (None, None)


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


def test_wilson_interval_matches_known_values():
    low, high = yfpo.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert yfpo.wilson_interval(0, 10)[0] == 0.0


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert yfpo.mcnemar_exact(0, 0) == 1.0
    assert yfpo.mcnemar_exact(0, 5) == 2 / 32
    assert math.isclose(yfpo.mcnemar_exact(2, 8), 2 * (1 + 10 + 45) / 1024)


def test_mcnemar_detectable_difference_has_exactly_the_asked_power():
    d = yfpo.mcnemar_detectable(10, 100)  # 10 discordant of 100: significant: 0-10, 1-9, mirrors
    pi = (d * 100 / 10 + 1) / 2
    power = sum(math.comb(10, k) * pi ** k * (1 - pi) ** (10 - k) for k in range(11)
                if yfpo.mcnemar_exact(k, 10 - k) <= 0.05)
    assert math.isclose(power, 0.8, rel_tol=1e-6) and math.isclose(d, 0.0833, abs_tol=1e-4)


def test_mcnemar_detectable_is_none_when_no_split_can_be_significant():
    assert yfpo.mcnemar_detectable(5, 100) is None and yfpo.mcnemar_detectable(0, 100) is None


def test_mcnemar_detectable_difference_shrinks_as_the_same_discordance_spreads_over_more():
    assert yfpo.mcnemar_detectable(40, 200) > yfpo.mcnemar_detectable(40, 400)


def test_bootstrap_ci_is_reproducible_from_its_seed():
    values = torch.arange(50, dtype=torch.float64) ** 1.5
    a, b = yfpo.bootstrap_ci(values, seed=3), yfpo.bootstrap_ci(values, seed=3)
    assert a == b and a != yfpo.bootstrap_ci(values, seed=4)


def test_bootstrap_ci_brackets_the_mean_and_is_a_point_for_constant_values():
    values = torch.arange(50, dtype=torch.float64) ** 1.5
    low, high = yfpo.bootstrap_ci(values, seed=3)
    assert low < values.mean().item() < high
    assert yfpo.bootstrap_ci(torch.ones(20), seed=0) == (1.0, 1.0)


def test_paired_difference_counts_the_questions_only_one_run_got_right():
    d = yfpo.paired_difference([(False, True)] * 3 + [(True, True), (False, False)])
    assert d == {"shared": 5, "difference": -0.6, "only_this_correct": 0, "only_other_correct": 3,
                 "mcnemar_p": 0.25}


# ---------------------------------------------------------------------------------------------
# Generation: stopping, batch invariance, seeding, torchrun
# ---------------------------------------------------------------------------------------------

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
    """The tiny tokenizer, except that the first n generated tokens decode to SCRIPT[:n] (one
    character each)."""
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
    completions = yfpo.generate(model, ScriptedTokenizer(tokenizer), prompts, 2, max_new_tokens=60)
    assert completions == [{"text": "So 3 + 9 = 12. The answer is 12. ", "stop": "answer",
                            "tokens": 33}] * 3


def test_without_eos_or_a_stated_answer_the_length_ends_generation(tiny):
    model, tokenizer = tiny
    model.generation_config.eos_token_id = None
    tokenizer.eos_token = None
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS[:3]]
    short = yfpo.generate(model, ScriptedTokenizer(tokenizer), prompts[:1], 1, max_new_tokens=31)
    assert short == [{"text": "So 3 + 9 = 12. The answer is 12", "stop": "length", "tokens": 31}]
    assert yfpo.generate(model, ScriptedTokenizer(tokenizer), prompts, 2, max_new_tokens=1) == \
        [{"text": "S", "stop": "length", "tokens": 1}] * 3  # every sequence ends at its first token


def test_greedy_completions_do_not_depend_on_batch_size(tiny):
    model, tokenizer = tiny
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS]
    one = yfpo.generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=24)
    batch_size = yfpo.build_parser().parse_args(["eval"]).batch_size  # the default
    default = yfpo.generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=24)
    assert one == default and len(set(texts(one))) > 1


def test_rows_that_finish_early_leave_and_each_row_gets_its_own_completion(tiny):
    model, tokenizer = tiny
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS]
    alone = [yfpo.generate(model, tokenizer, [p], 1, max_new_tokens=40)[0] for p in prompts]
    # Make EOS a token these completions emit at different steps, so rows finish (and are refilled)
    # at different times.
    emitted = [t for c in alone for t in tokenizer(c["text"])["input_ids"]
               if "\ufffd" not in tokenizer.decode([t])]
    model.generation_config.eos_token_id = max(set(emitted), key=emitted.count)
    alone = [yfpo.generate(model, tokenizer, [p], 1, max_new_tokens=40)[0] for p in prompts]
    assert len({c["tokens"] for c in alone}) > 3 and {c["stop"] for c in alone} == {"eos", "length"}
    for batch_size in (3, 8):  # 3: finished rows take waiting prompts; 8: then the batch shrinks
        assert yfpo.generate(model, tokenizer, prompts, batch_size, max_new_tokens=40) == alone


def test_samples_are_seeded_per_sequence_not_per_batch(tiny):
    model, tokenizer = tiny
    prompts = [yfpo.format_prompt(tokenizer, r["question"]) for r in DEMO_ROWS[:5]]

    def sample(batch_size, seed):
        return yfpo.generate(model, tokenizer, prompts, batch_size, 16, temperature=0.8,
                             num_samples=3, seed=seed)
    one = sample(1, seed=7)
    assert sample(4, seed=7) == one and sample(4, seed=8) != one
    assert len(set(texts(one))) == 15  # three different samples of each prompt


def free_port():
    with socket.socket() as s:  # a port nobody listens on, once closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), str(HERE / "yfpo.py"), *argv]


def test_eval_pairs_and_ablate_under_torchrun_write_what_one_process_writes(
        tiny_dir, data_file, neurons_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    generation = ["--max-new-tokens", "12", "--batch-size", "2"]
    for argv in (["eval", "--limit", "7", *generation],
                 ["pairs", "--num-questions", "7", "--samples-per-question", "2", *generation],
                 ["ablate", "--neurons", neurons_file, "--num-samples", "7", "--nll-batch-size",
                  "2", "--random-seeds", "2"]):
        argv = [*argv, "--model", tiny_dir, "--data", data_file, "--device", "cpu"]
        assert run(*argv, "--out", str(tmp_path / "one")) == 0
        subprocess.run(torchrun(*argv, "--out", str(tmp_path / "two")), check=True, env=env,
                       capture_output=True, timeout=300)
    for name in ("eval.jsonl", "pairs.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    one, two = (json.loads((tmp_path / d / "ablation.json").read_text()) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:  # each rank sums its own NLL batches: equal up to the order of the sums
        close = isinstance(one[key], (float, list))
        assert two[key] == (pytest.approx(one[key], rel=1e-6) if close else one[key]), key


# ---------------------------------------------------------------------------------------------
# Neurons: relevance, selection, identify, the random control set, activation moments, ablation
# ---------------------------------------------------------------------------------------------

def test_relevance_is_finite_and_leaves_the_weights_grad_alone(tiny):
    model, tokenizer = tiny
    with yfpo.attnlrp(model):
        relevance, gradient = yfpo.neuron_relevance(model, **sample_batch(tokenizer, DEMO_ROWS[:4]))
    assert relevance.shape == gradient.shape == (4, 2, 128)
    assert torch.isfinite(relevance).all() and relevance.abs().max() > 0
    assert torch.isfinite(gradient).all()
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
    long = sample_batch(tokenizer, [{**DEMO_ROWS[0],
                                     "answer": f"{reasoning} {reasoning} {reasoning}\n####{gold}"}])
    assert long["loss_mask"].sum() > 1.8 * short["loss_mask"].sum()

    def relevance(model, **batch):  # 1 per solution token in one sample, 3 in the other: scores 2
        per_token = 1.0 if batch["loss_mask"].sum() == short["loss_mask"].sum() else 3.0
        tokens = batch["loss_mask"].sum(1)[:, None, None].expand(-1, 2, 128)
        return per_token * tokens, -torch.ones(1, 2, 128)
    monkeypatch.setattr(yfpo, "neuron_relevance", relevance)
    scores, directions = yfpo.score_neurons(model, [short, long])
    assert torch.allclose(scores, torch.full((2, 128), 2.0)) and (directions == -1).all()


def test_relevance_is_conserved_from_logit_to_input(tiny_llama_dir):
    # AttnLRP is conservative up to the bias terms of its softmax rule (and norm epsilons): the
    # input relevance of one explained logit sums to that logit. Measured on this tiny Llama (no
    # biases), |sum R - logit| / sum |R| = 1.3%, 1.9%, 4.1%, 1.4% for the four samples;
    # tolerance 5%.
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
    assert any(not torch.equal(a, b) for a, b in zip(before, patched))  # the patch changes grads
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(yfpo.UserError, match="'gpt2' is not supported.*llama, qwen2, qwen3"):
        with yfpo.attnlrp(model):
            pass


SCORES = torch.tensor([[0.1, 5.0, -1.0, 2.0], [3.0, 0.0, 4.0, -2.0], [1.0, 1.5, 0.2, 0.3]])


def test_select_neurons_global_top_k_is_exact():
    assert yfpo.select_neurons(SCORES, 3) == [(0, 1, 5.0), (1, 2, 4.0), (1, 0, 3.0)]


def test_select_neurons_rejects_k_beyond_the_model():
    with pytest.raises(yfpo.UserError,
                       match="--top-k 13 is not between 1 and the model's 12 neurons"):
        yfpo.select_neurons(torch.zeros(3, 4), 13)


def test_identify_writes_a_neuron_set_that_round_trips(neurons_file, tiny):
    model, _ = tiny
    saved = json.loads(Path(neurons_file).read_text())
    assert (saved["num_layers"], saved["intermediate_size"]) == (2, 128)
    assert len(saved["neurons"]) == 12 and sum(saved["counts_per_layer"]) == 12
    scores = [n["score"] for n in saved["neurons"]]
    assert scores == sorted(scores, reverse=True)
    assert all(n["act_std"] > 0 for n in saved["neurons"])
    assert {n["direction"] for n in saved["neurons"]} <= {-1, 1}
    assert saved["selection"]["num_selected"] == 12
    assert "per solution token, mean over samples" in saved["selection"]["score"]
    assert saved["direction_disagrees_with_mean_sign"] == sum(
        n["direction"] != (-1 if n["act_mean"] < 0 else 1) for n in saved["neurons"])
    loaded = yfpo.load_neurons(neurons_file, model)
    assert loaded == [(n["layer"], n["index"], n["score"], n["act_mean"], n["act_std"],
                       n["direction"]) for n in saved["neurons"]]


def test_identify_formats_every_control_row_as_control_text(tiny_dir, data_file, tmp_path,
                                                            monkeypatch):
    seen, batches = [], yfpo.solution_batches

    def record(tokenizer, rows, *args):
        seen.append(rows)
        return batches(tokenizer, rows, *args)
    monkeypatch.setattr(yfpo, "solution_batches", record)
    assert run("identify", "--model", tiny_dir, "--data", data_file, "--control", data_file,
               "--num-samples", "2", "--top-k", "4", "--out", str(tmp_path)) == 0
    # the control file here is GSM8K itself, with '####' markers: its rows still get no instruction.
    # identify reads the end of the train split (pairs reads its start), the control file its start.
    assert [r["gold"] for r in seen[0]] == ["32", "30"]
    assert [r["gold"] for r in seen[1]] == [None, None]
    assert [r["index"] for r in seen[0]] == [10, 11] and [r["index"] for r in seen[1]] == [0, 1]
    selection = json.loads((tmp_path / "neurons.json").read_text())["selection"]
    assert selection["question_indices"] == [10, 11]


def identify_batches(tokenizer, data_file):
    """identify's own batches of the fixture's run: the last 8 train rows, 4 at a time."""
    rows = yfpo.load_gsm8k(data_file, "train")[-8:]  # identify reads the end of the train split
    return [sample_batch(tokenizer, rows[i:i + 4], 512) for i in (0, 4)]


def test_identify_writes_a_random_control_set_matched_on_layer_and_scale(tiny, data_file,
                                                                         neurons_file):
    model, tokenizer = tiny
    selected = json.loads(Path(neurons_file).read_text())
    control = json.loads(Path(neurons_file).with_name("random_neurons.json").read_text())
    picked = {(n["layer"], n["index"]) for n in selected["neurons"]}
    drawn = [(n["layer"], n["index"]) for n in control["neurons"]]
    assert len(set(drawn)) == len(drawn) == len(picked) and not picked & set(drawn)
    assert sorted(layer for layer, _ in drawn) == sorted(layer for layer, _ in picked)  # per layer
    mean, std, mean_abs = yfpo.activation_moments(model, identify_batches(tokenizer, data_file))
    generator = torch.Generator().manual_seed(0)  # identify's seed: its matched random_neurons
    assert drawn == yfpo.random_neurons(yfpo.load_neurons(neurons_file, model), mean_abs, generator)
    for n in control["neurons"]:  # its own statistics, from the same pass
        layer, index = n["layer"], n["index"]
        assert math.isclose(n["act_mean"], mean[layer, index].item(), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(n["act_std"], std[layer, index].item(), rel_tol=1e-4)
    assert control["selection"]["question_indices"] == list(range(4, 12))


def test_identify_selects_the_top_of_score_neurons(tiny, data_file, neurons_file):
    model, tokenizer = tiny
    with yfpo.attnlrp(model):
        scores = yfpo.score_neurons(model, identify_batches(tokenizer, data_file))[0]
    expected = [(layer, index) for layer, index, _ in yfpo.select_neurons(scores, 12)]
    saved = json.loads(Path(neurons_file).read_text())["neurons"]
    assert [(n["layer"], n["index"]) for n in saved] == expected


def test_saved_direction_is_the_sign_of_the_summed_gradient(tiny, data_file, neurons_file):
    # the gradient the relevance is made of: AttnLRP's, at down_proj, of the gold logits of the
    # solution tokens of identify's own batches, by hand
    model, tokenizer = tiny
    grads = {0: 0, 1: 0}
    for batch in identify_batches(tokenizer, data_file):
        with yfpo.attnlrp(model), down_proj_inputs(model, keep_grad=True) as seen:
            x = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, attention_mask=batch["attention_mask"]).logits
            gold = logits.gather(-1, batch["labels"][..., None])[..., 0]
            torch.autograd.grad((gold * batch["loss_mask"]).sum(), x)
        own_tokens = own_token_mask(batch["loss_mask"])[..., None]  # the solution's tokens
        for i in (0, 1):
            grads[i] = grads[i] + (seen.grad[i] * own_tokens).sum((0, 1))
    for n in json.loads(Path(neurons_file).read_text())["neurons"]:
        assert n["direction"] == (1 if grads[n["layer"]][n["index"]] >= 0 else -1)


def test_activation_moments_match_a_direct_computation(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:3])
    mean, std, mean_abs = yfpo.activation_moments(model, [batch])
    assert mean.shape == std.shape == mean_abs.shape == (2, 128)
    with down_proj_inputs(model) as seen, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    own_tokens = own_token_mask(batch["loss_mask"]).bool()  # each solution token's own position
    for layer, index in [(1, 5), (0, 7), (1, 100)]:
        values = seen[layer][..., index][own_tokens].double()
        assert math.isclose(mean[layer, index].item(), values.mean().item(), rel_tol=1e-5)
        assert math.isclose(std[layer, index].item(), values.std(unbiased=False).item(),
                            rel_tol=1e-4)
        assert math.isclose(mean_abs[layer, index].item(), values.abs().mean().item(), rel_tol=1e-5)


def test_ablation_zeroes_inside_and_leaves_the_model_exactly_as_it_was(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=batch["input_ids"]).logits
    with yfpo.ablate_neurons(model, [(0, 3, 1.0), (0, 9, 0.5), (1, 0, 0.1)]):
        with down_proj_inputs(model) as seen:
            inside = model(input_ids=batch["input_ids"]).logits
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

    def zero(layer, x):  # the ablation by hand: the neurons' inputs set to 0
        return x.index_fill(-1, torch.tensor([i for j, i in neurons if j == layer]), 0.0)
    with down_proj_inputs(model, edit=zero):
        zeroed = yfpo.gold_nll(model, batches)
    with yfpo.ablate_neurons(model, neurons):
        assert yfpo.gold_nll(model, batches) == zeroed != base
    with yfpo.ablate_neurons(model, neurons, scale=1.1):
        assert yfpo.gold_nll(model, batches) not in (base, zeroed)


def test_matched_control_draws_from_the_selected_neurons_bins_and_never_a_selected_one():
    mean_abs = torch.stack([torch.arange(40.0), torch.arange(40.0).flip(0)])  # layer 1: 39 - i
    neurons = [(0, 39), (0, 38), (0, 0), (1, 0)]  # layer 0's top two and bottom one; layer 1's top
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        control = yfpo.random_neurons(neurons, mean_abs, generator, bins=4)
        # layer 0's 37 others (1..37) in 4 bins by |a|: 1-10, 11-19, 20-28, 29-37; layer 1's: 1-39
        layer0 = sorted(i for layer, i in control if layer == 0)
        assert len(layer0) == 3 and 1 <= layer0[0] <= 10 and all(29 <= i <= 37 for i in layer0[1:])
        layer1 = [i for layer, i in control if layer == 1]
        assert layer1[0] in range(1, 10)  # layer 1's top bin: |a| = 39 - i in 30..38
        assert not set(control) & set(neurons)


def test_unmatched_control_draws_from_every_scale_and_never_a_selected_one():
    mean_abs = torch.stack([torch.arange(40.0), torch.arange(40.0).flip(0)])
    neurons = [(0, 39), (0, 38), (0, 0), (1, 0)]
    drawn = {n for seed in range(20) for n in yfpo.random_neurons(
        neurons, mean_abs, torch.Generator().manual_seed(seed), bins=1)}
    layer0 = [i for layer, i in drawn if layer == 0]
    assert not drawn & set(neurons) and min(layer0) <= 10 and max(layer0) >= 29  # low |a| to high


def test_compare_with_random_gives_no_ratio_within_noise():
    clear = yfpo.compare_with_random(1.0, 2.0, [1.1, 1.3])  # rise 0.2; std 0.1414; 3 s.e. = 0.3
    assert clear["ratio"] is None and "within 3 standard errors" in clear["note"]
    assert math.isclose(clear["z"], (2.0 - 1.2) / math.sqrt(0.02))


def test_compare_with_random_gives_z_and_a_ratio_above_noise():
    above = yfpo.compare_with_random(1.0, 2.0, [1.19, 1.2, 1.21])  # rise 0.2, std 0.01
    assert math.isclose(above["ratio"], 1.0 / 0.2) and above["note"] is None
    assert math.isclose(above["std"], 0.01)


def test_ablate_compares_the_selected_neurons_with_random_controls(tiny_dir, data_file,
                                                                    neurons_file, tmp_path, capsys):
    assert run("ablate", "--model", tiny_dir, "--data", data_file, "--neurons", neurons_file,
               "--num-samples", "4", "--random-seeds", "3", "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert result["scale"] == 0 and result["random_seeds"] == 3
    assert result["nll_ablated"] != result["nll_base"]
    assert math.isclose(result["rise"], result["nll_ablated"] - result["nll_base"])
    for name in ("random_matched", "random_unmatched"):
        r = result[name]
        assert len(r["nll"]) == 3
        assert math.isclose(r["z"], (result["nll_ablated"] - r["mean"]) / r["std"])
        assert (r["ratio"] is None) == (r["note"] is not None) and r["mean_abs_ratio"] > 0
        assert r["ratio"] is None or math.isclose(r["ratio"], result["rise"] / r["rise"])
    assert result["random_matched"]["nll"] != result["random_unmatched"]["nll"]
    out = capsys.readouterr().out
    assert "random matched" in out and "random unmatched" in out
    controls = (result["random_matched"], result["random_unmatched"])
    assert all(r["note"] in out for r in controls if r["note"])


def test_ablate_control_text_nll_equals_a_hand_computation(tiny_dir, data_file, neurons_file,
                                                           tmp_path):
    assert run("ablate", "--model", tiny_dir, "--data", data_file, "--neurons", neurons_file,
               "--num-samples", "3", "--random-seeds", "2", "--control", data_file,
               "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())["control"]
    model, tokenizer = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)
    neurons = yfpo.load_neurons(neurons_file, model)

    def nll():  # the control rows one at a time: the question alone as the prompt, the answer whole
        total = count = 0
        for q, a in yfpo.DEMO_PROBLEMS[-3:]:  # the control file's last rows (identify: its first)
            question = [{"role": "user", "content": q}]
            prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": a}])
            with torch.no_grad():
                logp = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(full[len(prompt):])
            total -= logp[len(prompt) - 1:].gather(-1, targets[:, None]).sum().item()
            count += len(targets)
        return total / count
    assert result["rows"] == [9, 10, 11] and math.isclose(result["nll_base"], nll(), rel_tol=1e-5)
    with yfpo.ablate_neurons(model, neurons, 0.0):
        assert math.isclose(result["nll_ablated"], nll(), rel_tol=1e-5)
    assert len(result["random_matched"]["nll"]) == 2
    assert "mean_abs_ratio" in result["random_unmatched"]


def test_ablate_gives_no_mean_abs_ratio_when_the_neurons_never_fire(tiny_dir, data_file,
                                                                    neurons_file, tmp_path,
                                                                    monkeypatch):
    def silent(model, batches):  # every neuron's mean, std and mean |a|: 0
        return [torch.zeros(yfpo.model_shape(model))] * 3
    monkeypatch.setattr(yfpo, "activation_moments", silent)
    assert run("ablate", "--model", tiny_dir, "--data", data_file, "--neurons", neurons_file,
               "--num-samples", "2", "--random-seeds", "2", "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert result["random_matched"]["mean_abs_ratio"] is None


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------

def test_make_pairs_pairs_a_right_and_a_wrong_sample():
    rows = [dict(r, gold=yfpo.parse_gold(r["answer"])) for r in DEMO_ROWS[:3]]
    samples = [["The answer is 7.", "The answer is 8."],  # gold 8: one right, one wrong
               ["The answer is 1.", "no idea"],           # gold 48: none right -> gold is chosen
               ["The answer is 105.", "#### 105"]]        # gold 105: all right -> skipped
    pairs, counts = yfpo.make_pairs(rows, samples)
    assert counts == {"questions": 3, "samples": 6, "correct_samples": 3, "all_correct_skipped": 1,
                      "chosen_is_gold": 1, "pairs": 2}
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "The answer is 8."}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "The answer is 7."}]
    assert pairs[1]["chosen"][0]["content"] == yfpo.gold_solution(rows[1]["answer"])
    assert pairs[1]["chosen_is_gold"]
    assert pairs[1]["prompt"] == yfpo.make_prompt(rows[1]["question"])
    assert pairs[1]["question_index"] == 1


def test_pairs_writes_trl_conversational_rows(tiny_dir, data_file, tmp_path):
    assert run("pairs", "--model", tiny_dir, "--data", data_file, "--num-questions", "3",
               "--samples-per-question", "2", "--max-new-tokens", "8", "--out", str(tmp_path)) == 0
    rows = yfpo.load_pairs(tmp_path / "pairs.jsonl")
    assert len(rows) == 3  # a random model is always wrong
    assert [r["question_index"] for r in rows] == [0, 1, 2]
    assert all(r["chosen_is_gold"] and r["rejected"][0]["role"] == "assistant" for r in rows)


def test_pairs_from_eval_refuses_an_eval_row_outside_the_data(tiny_dir, data_file, tmp_path,
                                                              capsys):
    evaluated = tmp_path / "eval" / "eval.jsonl"
    evaluated.parent.mkdir()
    evaluated.with_name("summary.json").write_text(json.dumps({"split": "test"}))
    evaluated.write_text(jsonl({"index": -1, "question": DEMO_ROWS[-1]["question"],
                                "correct": False, "completion": "7"}))
    assert_user_error(capsys, tmp_path / "out", "pairs", "--model", tiny_dir, "--data", data_file,
                      "--from-eval", str(evaluated), "--out", str(tmp_path / "out"),
                      says="eval row -1 is not question -1")


# ---------------------------------------------------------------------------------------------
# Losses: dpo_loss, yfpo_loss, completion_logps, neuron_scores, packed pairs, capture hooks
# ---------------------------------------------------------------------------------------------

def test_dpo_loss_equals_a_hand_computation():
    losses, chosen, rejected = yfpo.dpo_loss(
        torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0]), torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]), beta=0.5)
    # h = (1) - (-1) = 2 -> -log sigmoid(1); h = 0 - 1 = -1 -> -log sigmoid(-0.5)
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))]
    assert torch.allclose(losses, torch.tensor(expected))
    assert torch.allclose(chosen, torch.tensor([0.5, 0.0]))
    assert torch.allclose(rejected, torch.tensor([-0.5, 0.5]))


# policy chosen, policy rejected, reference chosen, reference rejected: h = 1
LOGPS = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])


def neg_log_sigmoid(x):
    return -math.log(1 / (1 + math.exp(-x)))


def test_yfpo_loss_yoked_on_the_loss_adds_lam_times_the_neuron_loss():
    m = 0.2
    loss = yfpo.yfpo_loss(*LOGPS, torch.tensor([m]), beta=0.1, lam=0.5, gamma=2.0, yoke="loss")[0]
    expected = neg_log_sigmoid(0.1 * 1.0) + 0.5 * neg_log_sigmoid(2 * m)
    assert torch.allclose(loss, torch.tensor([expected]))


def test_yfpo_loss_yoked_on_the_reward_adds_lam_gamma_m_inside_the_sigmoid():
    m = 0.2
    loss = yfpo.yfpo_loss(*LOGPS, torch.tensor([m]), beta=0.1, lam=0.5, gamma=2.0, yoke="reward")[0]
    assert torch.allclose(loss, torch.tensor([neg_log_sigmoid(0.1 * 1.0 + 0.5 * 2 * m)]))


def test_yfpo_loss_at_lam_zero_without_a_margin_is_dpo_loss():
    dpo = yfpo.dpo_loss(*LOGPS, 0.1)[0]
    assert torch.equal(yfpo.yfpo_loss(*LOGPS, None, beta=0.1, lam=0.0)[0], dpo)


def test_completion_logps_matches_a_direct_log_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]).float()
    direct = (logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)
    assert torch.allclose(yfpo.completion_logps(logits, labels, mask), direct, atol=1e-6)


def test_completion_logps_reads_several_label_sets_off_one_logits_tensor():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4, 2))
    mask = torch.randint(0, 2, (2, 4, 2)).float()
    both = yfpo.completion_logps(logits, labels, mask)
    assert both.shape == (2, 2)
    for j in (0, 1):
        one = yfpo.completion_logps(logits, labels[..., j], mask[..., j])
        assert torch.allclose(both[:, j], one)


def test_neuron_scores_normalize_align_with_the_saved_direction_and_average():
    acts = torch.tensor([[[3.0, -4.0], [5.0, -2.0], [100.0, 100.0]]])  # [B=1, T=3, K=2]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 1.0])
    # direction (1, -1): z = [[1, 2], [2, 0]] -> per-token means [1.5, 1.0] -> 1.25 (the masked
    # token is ignored)
    scores = yfpo.neuron_scores(acts, mask, mean, std, torch.tensor([1.0, -1.0]))
    assert torch.allclose(scores, torch.tensor([1.25]))
    # the direction, not the sign of the mean: neuron 2 raising the logits as it grows: z = [-2, 0]
    scores = yfpo.neuron_scores(acts, mask, mean, std, torch.tensor([1.0, 1.0]))
    assert torch.allclose(scores, torch.tensor([0.25]))


def test_collate_pairs_packs_prompt_once_with_a_block_mask():
    batch = yfpo.collate_pairs([([1, 2], [3, 4], [5]), ([6], [7], [8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert batch["attention_mask"][0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1]]  # rejected skips chosen
    assert batch["loss_mask"][0].T.tolist() == [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert batch["labels"][0, 1].tolist() == [3, 5]  # the last prompt token predicts both firsts
    assert batch["loss_mask"][1].T.tolist() == [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0]]
    assert batch["labels"][1, 2, 1] == 9
    # neuron scores read each completion's own tokens: not the shared last prompt position
    assert batch["neuron_mask"][0].T.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert batch["neuron_mask"][1].T.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 0]]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_pairs_give_the_log_probs_and_neuron_scores_of_separate_sequences(attention, tiny,
                                                                                  pairs_file):
    model, tokenizer = tiny
    model.config._attn_implementation = attention
    pairs = yfpo.tokenize_pairs(tokenizer, yfpo.load_pairs(pairs_file)[:3], 256)
    neurons = [(0, 3, 0.0, 0.1, 1.0, 1.0), (1, 5, 0.0, -0.2, 2.0, -1.0),  # (layer, index, score,
               (1, 100, 0.0, 0.3, 0.5, 1.0)]  # mean, std, direction)
    with yfpo.NeuronCapture(model, neurons) as capture:
        packed = yfpo.collate_pairs(pairs, tokenizer.pad_token_id)
        logps, scores = yfpo.forward_logps(model, packed), capture.scores(packed["neuron_mask"])
        for j in (0, 1):  # chosen, then rejected, as ordinary right-padded sequences
            separate = yfpo.collate([(pair[0], pair[j + 1]) for pair in pairs],
                                    tokenizer.pad_token_id)
            expected = yfpo.forward_logps(model, separate)
            expected_scores = capture.scores(own_token_mask(separate["loss_mask"])[..., None])
            assert torch.allclose(logps[:, j], expected, rtol=1e-5)
            assert torch.allclose(scores[:, j], expected_scores[:, 0], rtol=1e-4, atol=1e-6)


def test_capture_hooks_take_exactly_the_down_proj_inputs(tiny):
    model, tokenizer = tiny
    batch = sample_batch(tokenizer, DEMO_ROWS[:2])
    neurons = [(1, 7), (0, 3), (1, 2), (0, 100)]
    with down_proj_inputs(model) as seen, yfpo.NeuronCapture(model, neurons) as capture:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        acts = capture.activations()
    expected = torch.stack([seen[layer][..., index] for layer, index in neurons], dim=-1)
    assert torch.equal(acts, expected) and acts.requires_grad


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def test_mfu_is_six_n_flops_per_trained_token_over_the_peak(tiny_dir, pairs_file, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(yfpo, "peak_flops", lambda device: 1e12)  # as if on a known GPU
    rows = train(tiny_dir, pairs_file, tmp_path, "--lam", "0", "--max-steps", "2")
    model = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)[0]
    num_params = sum(p.numel() for p in model.parameters())
    for r in rows:
        assert math.isclose(r["mfu"], 6 * num_params * r["tokens_per_s"] / 1e12, rel_tol=1e-9)


def test_train_logs_trl_metrics_and_saves_a_loadable_model(tiny_dir, pairs_file, neurons_file,
                                                           tmp_path):
    rows = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--max-steps", "3",
                 "--warmup-ratio", "0.5")
    assert [r["step"] for r in rows] == [1, 2, 3]
    logged = {"grad_norm", "learning_rate", "step_time_s", "tokens_per_s", "mfu"}
    assert set(yfpo.PAIR_METRICS) | logged <= set(rows[0])
    assert [r["learning_rate"] for r in rows] == [5e-4, 1e-3, 1e-3]
    assert all(r["mfu"] is None for r in rows)  # a CPU has no peak FLOP/s to divide by
    assert abs(rows[0]["rewards/margins"]) < 1e-4  # step 1: the policy is the reference
    probes = {"grad_norm/dpo", "grad_norm/neuron", "neuron/share", "grad_cosine"}
    assert all(probes <= set(r) for r in rows)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "model" / "trainer_state.pt").is_file()


def test_logged_term_gradient_norms_equal_norms_computed_by_hand(tiny_dir, pairs_file, neurons_file,
                                                                 tmp_path):
    (row,) = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--lam", "0.5",
                   "--gamma", "2", "--batch-size", "8", "--max-steps", "1", "--balance", "none",
                   "--yoke", "loss", "--neuron-margin", "policy")  # one step over all 8 pairs
    model, tokenizer = yfpo.load_model(tiny_dir, torch.device("cpu"), torch.float32)
    neurons = yfpo.load_neurons(neurons_file, model)
    pairs = yfpo.tokenize_pairs(tokenizer, yfpo.load_pairs(pairs_file), 256)
    batch = yfpo.collate_pairs(pairs, tokenizer.pad_token_id)
    with yfpo.NeuronCapture(model, neurons) as capture:
        # step 1: the policy is the reference
        logps, scores = yfpo.forward_logps(model, batch), capture.scores(batch["neuron_mask"])
    ref = logps.detach()
    dpo = yfpo.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.1)[0].mean()
    neuron = 0.5 * -torch.nn.functional.logsigmoid(2 * (scores[:, 0] - scores[:, 1])).mean()

    def norm(loss):
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True,
                                    allow_unused=True)
        return torch.cat([g.flatten() for g in grads if g is not None]).norm().item()
    assert math.isclose(row["grad_norm/dpo"], norm(dpo), rel_tol=1e-4)
    assert math.isclose(row["grad_norm/neuron"], norm(neuron), rel_tol=1e-4)
    assert math.isclose(row["grad_norm"], norm(dpo + neuron), rel_tol=1e-4)


@pytest.mark.parametrize("yoke, margin", [("loss", "policy"), ("reward", "policy"),
                                          ("reward", "relative")])
def test_calibration_makes_the_step_1_share_equal_lam(yoke, margin, tiny_dir, pairs_file,
                                                      neurons_file, tmp_path):
    # one step over all 8 pairs, which are also the calibration pairs: the probe measures lam
    (row,) = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--lam", "0.3",
                   "--yoke", yoke, "--neuron-margin", margin, "--batch-size", "8",
                   "--max-steps", "1")
    assert abs(row["neuron/share"] - 0.3) < 1e-4
    assert row["c"] == torch.load(tmp_path / "reference.pt")["c"]
    assert row["c"] != 1 and -1 <= row["grad_cosine"] <= 1
    state = torch.load(tmp_path / "model" / "trainer_state.pt", weights_only=False)
    assert state["c"] == row["c"]  # saved with the checkpoint


def test_balance_none_is_the_raw_loss(tiny_dir, pairs_file, neurons_file, tmp_path):
    args = ("--neurons", neurons_file, "--lam", "0.5", "--gamma", "2", "--batch-size", "8",
            "--max-steps", "1", "--yoke", "loss", "--neuron-margin", "policy")  # the paper's form
    (raw,) = train(tiny_dir, pairs_file, tmp_path / "raw", *args, "--balance", "none")
    (share,) = train(tiny_dir, pairs_file, tmp_path / "share", *args)
    # step 1, policy = reference: h = 0, so loss = log 2 + lam * c * loss/neuron; c = 1 for none
    assert raw["c"] == 1
    assert math.isclose(raw["loss"], math.log(2) + 0.5 * raw["loss/neuron"], rel_tol=1e-6)
    assert math.isclose(share["loss"], math.log(2) + 0.5 * share["c"] * share["loss/neuron"],
                        rel_tol=1e-6)
    assert math.isclose(share["neuron/share"], 0.5, rel_tol=1e-4)
    assert math.isclose(share["neuron/share"] / raw["neuron/share"], share["c"], rel_tol=1e-4)


def test_gamma_auto_is_one_over_the_std_of_the_reference_margins(tiny_dir, pairs_file, neurons_file,
                                                                 tmp_path):
    rows = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--max-steps", "2")
    reference = torch.load(tmp_path / "reference.pt")["neuron"]
    expected = 1 / (reference[:, 0] - reference[:, 1]).std().item()
    assert all(math.isclose(r["gamma"], expected, rel_tol=1e-6) for r in rows)


def test_a_given_gamma_is_used_as_it_is(tiny_dir, pairs_file, neurons_file, tmp_path):
    (row,) = train(tiny_dir, pairs_file, tmp_path, "--neurons", neurons_file, "--max-steps", "1",
                   "--gamma", "2.5")
    assert row["gamma"] == 2.5


def test_relative_margin_is_the_policy_margin_minus_the_reference_one(tiny_dir, pairs_file,
                                                                      neurons_file, tmp_path):
    args = ("--neurons", neurons_file, "--lam", "1", "--gamma", "3", "--max-steps", "1")
    (policy,) = train(tiny_dir, pairs_file, tmp_path / "policy", *args, "--neuron-margin", "policy")
    (relative,) = train(tiny_dir, pairs_file, tmp_path / "relative", *args, "--neuron-margin",
                        "relative")
    # step 1: the policy is the reference, so m - m_ref = 0 and the neuron loss is -log sigmoid(0)
    assert math.isclose(relative["loss/neuron"], math.log(2), rel_tol=1e-6)
    assert abs(policy["loss/neuron"] - math.log(2)) > 1e-3
    assert policy["neuron/margin"] == relative["neuron/margin"]


def test_dropout_is_off_in_training(tiny_dir, pairs_file, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "dropout")
    config = json.loads((tmp_path / "dropout" / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (tmp_path / "dropout" / "config.json").write_text(json.dumps(config))
    (row,) = train(str(tmp_path / "dropout"), pairs_file, tmp_path / "out", "--lam", "0",
                   "--max-steps", "1")
    # the training forward gives the reference pass's (eval mode) log-probs: no dropout in either
    assert abs(row["rewards/chosen"]) < 1e-6 and abs(row["rewards/rejected"]) < 1e-6


def test_gradient_accumulation_is_invariant(tiny_dir, pairs_file, neurons_file, tmp_path,
                                            monkeypatch):
    # batch 1 x accum 4 == batch 4 x accum 1: the same loss and gradients (the neuron term included)
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(parameters, max_norm):
        parameters = list(parameters)
        grads.append([p.grad.clone() for p in parameters])
        return clip(parameters, max_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    args = ("--max-steps", "1", "--neurons", neurons_file)
    (a,) = train(tiny_dir, pairs_file, tmp_path / "a", "--batch-size", "1", "--grad-accum", "4",
                 *args)
    (b,) = train(tiny_dir, pairs_file, tmp_path / "b", "--batch-size", "4", "--grad-accum", "1",
                 *args)
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        assert math.isclose(a[key], b[key], rel_tol=1e-5), key
    # every gradient tensor agrees to 1e-5 of its own scale (measured: 1.6e-6; padding changes the
    # sums' order)
    assert len(grads) == 2
    assert all((x - y).abs().max() <= 1e-5 * y.abs().max() for x, y in zip(*grads))


def test_lambda_zero_is_plain_dpo(tiny_dir, pairs_file, neurons_file, tmp_path):
    from safetensors.torch import load_file
    train(tiny_dir, pairs_file, tmp_path / "plain", "--lam", "0", "--max-steps", "3")
    train(tiny_dir, pairs_file, tmp_path / "zero", "--lam", "0", "--neurons", neurons_file,
          "--max-steps", "3")
    plain, zero = (load_file(tmp_path / d / "model" / "model.safetensors")
                   for d in ("plain", "zero"))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)


def test_neuron_term_raises_the_neuron_margin(tiny_dir, pairs_file, neurons_file, tmp_path):
    base = train(tiny_dir, pairs_file, tmp_path / "dpo", "--lam", "0", "--neurons", neurons_file,
                 "--epochs", "3")
    yoked = train(tiny_dir, pairs_file, tmp_path / "yfpo", "--lam", "1", "--gamma", "5",
                  "--neurons", neurons_file, "--epochs", "3")
    assert base[0]["neuron/margin"] == yoked[0]["neuron/margin"]  # the same start

    def gain(rows):  # the margin over the reference's, late in training
        return sum(r["neuron/margin_gain"] for r in rows[-4:]) / 4
    assert gain(yoked) > gain(base) + 0.05


def test_gradient_checkpointing_keeps_loss_and_gradient(tiny_dir, pairs_file, neurons_file,
                                                        tmp_path):
    # non-reentrant checkpointing keeps the hooked activations, so the neuron term, differentiable
    args = ("--lam", "1", "--neurons", neurons_file, "--max-steps", "1")
    (plain,) = train(tiny_dir, pairs_file, tmp_path / "plain", *args)
    (checkpointed,) = train(tiny_dir, pairs_file, tmp_path / "gc", *args,
                            "--gradient-checkpointing")
    for key in ("loss", "loss/neuron", "grad_norm"):
        assert math.isclose(plain[key], checkpointed[key], rel_tol=1e-5), key


def test_resume_equals_an_uninterrupted_run(tiny_dir, pairs_file, neurons_file, tmp_path,
                                            monkeypatch):
    args = ("--neurons", neurons_file, "--epochs", "2", "--save-every", "2")
    full = train(tiny_dir, pairs_file, tmp_path / "full", *args)
    saves = []
    real_save = yfpo.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        saves.append(args[-1])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint
    monkeypatch.setattr(yfpo, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dir, pairs_file, tmp_path / "killed", *args)
    monkeypatch.setattr(yfpo, "save_checkpoint", real_save)
    resumed = train(tiny_dir, pairs_file, tmp_path / "killed", *args, "--resume")
    assert len(resumed) == len(full) == 8
    timing = {"step_time_s", "tokens_per_s", "mfu"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in full]


def test_resume_refuses_a_checkpoint_of_other_pairs(tiny_dir, pairs_file, tmp_path, capsys):
    train(tiny_dir, pairs_file, tmp_path, "--lam", "0", "--max-steps", "1")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(Path(pairs_file).read_text().splitlines(keepends=True)[:6]))
    assert run("train", "--model", tiny_dir, "--pairs", str(fewer), "--lam", "0", "--batch-size",
               "2", "--grad-accum", "1", "--max-length", "256", "--device", "cpu", "--resume",
               "--out", str(tmp_path)) == 2
    assert "was trained with other pairs" in capsys.readouterr().err


def test_allow_overlap_trains_on_the_selection_questions(tiny_dir, pairs_file, neurons_file,
                                                         tmp_path):
    rows = [{**r, "question_index": i} for i, r in enumerate(yfpo.read_jsonl(pairs_file))]
    (tmp_path / "p.jsonl").write_text(jsonl(*rows))
    assert len(train(tiny_dir, str(tmp_path / "p.jsonl"), tmp_path / "out", "--neurons",
                     neurons_file, "--max-steps", "1", "--allow-overlap")) == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, pairs_file, tmp_path,
                                                                  capsys):
    code = run("train", "--model", tiny_dir, "--pairs", pairs_file, "--lam", "0", "--lr", "1e30",
               "--warmup-ratio", "0", "--batch-size", "2", "--grad-accum", "1", "--save-every", "1",
               "--device", "cpu", "--out", str(tmp_path))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # after the progress bars
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: non-finite loss or gradient at step 2"), errors
    state = torch.load(tmp_path / "model" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and len(metrics(tmp_path)) == 1


def test_ddp_two_processes_equal_one_process_with_doubled_accumulation(tiny_dir, pairs_file,
                                                                       neurons_file, tmp_path):
    common = ["train", "--model", tiny_dir, "--pairs", pairs_file, "--neurons", neurons_file,
              "--lr", "1e-3", "--batch-size", "1", "--max-steps", "2", "--max-length", "256",
              "--device", "cpu"]
    assert run(*common, "--grad-accum", "4", "--out", str(tmp_path / "one")) == 0
    subprocess.run(torchrun(*common, "--grad-accum", "2", "--out", str(tmp_path / "two")),
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                   timeout=300)
    assert len(metrics(tmp_path / "one")) == len(metrics(tmp_path / "two")) == 2
    for one, two in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in ("loss", "loss/neuron", "grad_norm", "grad_norm/dpo", "grad_norm/neuron"):
            assert math.isclose(one[key], two[key], rel_tol=1e-4), key


# ---------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------

def test_eval_writes_one_graded_row_per_question_and_a_summary(tiny_dir, data_file, tmp_path,
                                                               capsys):
    assert run("eval", "--model", tiny_dir, "--data", data_file, "--limit", "5", "--max-new-tokens",
               "8", "--out", str(tmp_path)) == 0
    rows = yfpo.read_jsonl(tmp_path / "eval.jsonl")
    assert [r["index"] for r in rows] == list(range(5))
    assert set(rows[0]) == {"index", "question", "gold", "completion", "extracted", "rule",
                            "correct", "stop", "tokens"}
    assert all(r["correct"] == yfpo.is_correct(r["completion"], r["gold"]) for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"] == 5 and summary["accuracy"] == summary["correct"] / 5
    assert summary["ci_low"] <= summary["accuracy"] <= summary["ci_high"]
    assert summary["model"] == tiny_dir and summary["limit"] == 5
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_gives_a_speed_even_when_the_clock_sees_no_time_pass(tiny, monkeypatch):
    stated = {"text": "The answer is 8.", "stop": "answer", "tokens": 5}
    monkeypatch.setattr(yfpo, "generate", lambda *args: [stated])
    monkeypatch.setattr(yfpo.time, "perf_counter", lambda: 1.0)
    args = argparse.Namespace(system=None, max_new_tokens=8, batch_size=1, seed=0)
    summary, _ = yfpo.evaluate(None, tiny[1], DEMO_ROWS[:1], args)
    assert summary["correct"] == 1 and summary["questions_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# Reproduce: every stage in one restartable command, and its report
# ---------------------------------------------------------------------------------------------
REPRODUCE = ["--num-samples", "4", "--top-k", "16", "--ablate-samples", "4", "--random-seeds",
             "2", "--num-questions", "8", "--samples-per-question", "2", "--max-new-tokens", "16",
             "--lr", "1e-4", "--train-batch-size", "2", "--grad-accum", "1", "--epochs", "2",
             "--max-length", "256", "--save-every", "2", "--eval-limit", "6", "--device", "cpu",
             "--control"]
# The base model's stages first, then each arm whole (trained, evaluated, scored) before the next
STAGES = ["identify", "ablate", "pairs", "eval_base", "heldout", "score_base",
          "train_dpo", "eval_dpo", "score_dpo", "train_yfpo", "eval_yfpo", "score_yfpo",
          "train_yfpo_random", "eval_yfpo_random", "score_yfpo_random"]


def reproduce(tiny_dir, data_file, out, *extra):
    return run("reproduce", "--model", tiny_dir, "--data", data_file, *REPRODUCE, data_file,
               "--out", str(out), *extra)


def without_wall_times(report):
    return report.split("| stage | wall time")[0]


def stages_run(printed):
    """(the stages run, the stages skipped), read off reproduce's screen lines."""
    return (re.findall(r"\[reproduce\] (\w+)(?: \(resuming its checkpoint\))? ->", printed),
            re.findall(r"\[reproduce\] (\w+): done with these settings, skipped", printed))


@pytest.fixture(scope="session")
def reproduced(tiny_dir, data_file, tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("reproduce")
    assert reproduce(tiny_dir, data_file, out) == 0
    return out


def test_reproduce_report_holds_every_model_run_and_stage(reproduced):
    report = (reproduced / "report.md").read_text()
    for column in ("accuracy", "95% CI", "strict", "correct / total", "vs base", "vs DPO",
                   "detectable", "share first / middle / last", "cosine first / middle / last",
                   "reward accuracy", "reward margin", "neuron margin",
                   "its gain over the reference",
                   "grad norm DPO first / last", "grad norm neuron first / last",
                   "Held-out endpoints", "wall time"):
        assert column in report, column
    for name in MODELS:
        s = json.loads((reproduced / f"eval_{name}" / "summary.json").read_text())
        assert f"| {name} | {s['accuracy']:.4f} | [{s['ci_low']:.4f}, {s['ci_high']:.4f}] | " \
               f"{s['accuracy_strict']:.4f} | {s['correct']} / 6 |" in report
    rows = {name: yfpo.read_jsonl(reproduced / f"eval_{name}" / "eval.jsonl") for name in MODELS}
    for name in ("yfpo", "yfpo_random"):  # against DPO, the last column
        d = yfpo.paired_difference([(a["correct"], b["correct"])
                                    for a, b in zip(rows[name], rows["dpo"])])
        row = report.split(f"| {name} |")[1].split("\n")[0]
        assert f"{d['difference']:+.4f} (p {d['mcnemar_p']:.3g}; {d['only_this_correct']} vs " \
               f"{d['only_other_correct']}; detectable" in row
    for run_name in MODELS[1:]:
        last = metrics(reproduced / f"train_{run_name}")[-1]
        assert f"| {run_name} | {last['step']} | {last['c']:.4g} | " in report
        assert f"| {last['rewards/accuracies']:.3f} | {last['rewards/margins']:.4f} | " \
               f"{last['neuron/margin']:.4f} | {last['neuron/margin_gain']:+.4f} | " in report
    dpo_steps = metrics(reproduced / "train_dpo")  # lam = 0: the DPO term's gradient is all of it
    first, last = dpo_steps[0]["grad_norm"], dpo_steps[-1]["grad_norm"]
    assert f"| {first:.4g} / {last:.4g} | — |\n" in report
    probes = [m for m in metrics(reproduced / "train_yfpo") if "neuron/share" in m]
    assert [m["step"] for m in probes] == [1, 5, 8]  # first, middle, last
    assert " / ".join(f"{m['neuron/share']:.3g}" for m in probes) in report
    ablation = json.loads((reproduced / "ablate" / "ablation.json").read_text())
    assert "Ablation on math text" in report
    assert f"rise {ablation['random_matched']['rise']:+.4f}" in report
    assert "Ablation on control text" in report
    assert f"rise {ablation['control']['rise']:+.4f}" in report
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
    scores = {name: yfpo.read_jsonl(reproduced / f"score_{name}" / "scores.jsonl")
              for name in MODELS}
    base = scores["base"]
    margin = torch.tensor([r["neurons"]["neurons"][0] - r["neurons"]["neurons"][1] for r in base],
                          dtype=torch.float64)
    low, high = yfpo.bootstrap_ci(margin, seed=0)
    nll = torch.tensor([-r["logps"][0] / r["chosen_tokens"] for r in base], dtype=torch.float64)
    assert f"| base | — | — | {nll.mean():.4f} [" in report
    assert f"{margin.mean():.4f} [{low:.4f}, {high:.4f}]" in report
    h = torch.tensor([(y["logps"][0] - b["logps"][0]) - (y["logps"][1] - b["logps"][1])
                      for y, b in zip(scores["yfpo"], base)], dtype=torch.float64)
    low, high = yfpo.bootstrap_ci((h > 0).double(), seed=0)
    reward_accuracy = (h > 0).double().mean()
    assert f"| yfpo | {reward_accuracy:.4f} [{low:.4f}, {high:.4f}] | {h.mean():.4f} [" in report


def test_the_random_arm_trains_on_the_matched_set_with_its_own_c(reproduced):
    def argv(stage):
        return json.loads((reproduced / stage / "stage.json").read_text())["argv"]
    selected = str(reproduced / "identify" / "neurons.json")
    matched = str(reproduced / "identify" / "random_neurons.json")
    assert matched in argv("train_yfpo_random")
    assert [a for a in argv("train_yfpo_random") if a != matched] == \
        [a for a in argv("train_yfpo") if a != selected]  # the same otherwise
    c = {run: torch.load(reproduced / f"train_{run}" / "reference.pt")["c"]
         for run in ("yfpo", "yfpo_random")}
    assert c["yfpo"] != c["yfpo_random"]
    assert metrics(reproduced / "train_yfpo_random")[0]["c"] == c["yfpo_random"]


def test_reproduce_passes_each_flag_to_its_stage(reproduced):
    def value(stage, flag):  # the flag's last value on the stage's command line, as argparse reads
        argv = json.loads((reproduced / stage / "stage.json").read_text())["argv"]
        return argv[len(argv) - argv[::-1].index(flag)]

    def values(stage, *flags):
        return [value(stage, f) for f in flags]
    assert values("identify", "--num-samples", "--top-k", "--max-length") == ["4", "16", "256"]
    assert values("ablate", "--num-samples", "--random-seeds", "--max-length") == ["4", "2", "256"]
    assert values("pairs", "--max-new-tokens", "--batch-size") == ["16", "64"]
    assert values("pairs", "--num-questions", "--samples-per-question", "--temperature") == \
        ["8", "2", "0.8"]
    assert values("train_yfpo", "--lam", "--lr", "--batch-size", "--grad-accum", "--epochs",
                  "--save-every") == ["0.3", "0.0001", "2", "1", "2", "2"]
    assert value("train_dpo", "--lam") == "0.0" and value("eval_yfpo", "--limit") == "6"
    assert value("eval_yfpo", "--model") == str(reproduced / "train_yfpo" / "model")
    assert json.loads((reproduced / "ablate" / "ablation.json").read_text())["random_seeds"] == 2


def test_reproduce_again_skips_every_stage_and_writes_the_same_report(tiny_dir, data_file,
                                                                      reproduced, capsys):
    before = (reproduced / "report.md").read_text()
    capsys.readouterr()
    assert reproduce(tiny_dir, data_file, reproduced) == 0
    assert stages_run(capsys.readouterr().out) == ([], STAGES)
    assert (reproduced / "report.md").read_text() == before


def test_changing_lam_reruns_only_the_yfpo_training_and_its_eval(tiny_dir, data_file, reproduced,
                                                                 tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(reproduced, copy)  # a moved folder keeps its stages: OUT is not part of a key
    (copy / "train_dpo_seed7").mkdir()  # a stage of other settings (another --seeds) leaves
    (copy / "train_dpo_seed7" / "stage.json").write_text("{}")
    capsys.readouterr()
    assert reproduce(tiny_dir, data_file, copy, "--lam", "0.5") == 0
    ran, skipped = stages_run(capsys.readouterr().out)
    # train, eval and score of the two runs with lam
    assert ran == [s for s in STAGES if s.split("_", 1)[-1] in ("yfpo", "yfpo_random")]
    assert skipped == [s for s in STAGES if s not in ran]
    assert "lam=0.5" in (copy / "report.md").read_text() and not (copy / "train_dpo_seed7").exists()


@pytest.mark.parametrize("where", ["before training", "inside training"])
def test_an_interrupted_run_started_again_gives_the_same_report(where, tiny_dir, data_file,
                                                                reproduced, tmp_path, monkeypatch,
                                                                capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    real = yfpo.save_checkpoint
    if where == "before training":
        monkeypatch.setattr(yfpo, "cmd_train", interrupt)
    else:  # killed right after train_dpo's first checkpoint (step 2 of 6)
        monkeypatch.setattr(yfpo, "save_checkpoint", lambda *args: (real(*args), interrupt()))
    with pytest.raises(KeyboardInterrupt):
        reproduce(tiny_dir, data_file, tmp_path)
    monkeypatch.undo()
    capsys.readouterr()
    assert reproduce(tiny_dir, data_file, tmp_path) == 0
    printed = capsys.readouterr().out
    assert stages_run(printed) == (STAGES[6:], STAGES[:6])
    assert ("train_dpo (resuming its checkpoint)" in printed) == (where == "inside training")
    assert without_wall_times((tmp_path / "report.md").read_text()) == \
        without_wall_times((reproduced / "report.md").read_text())


# ---------------------------------------------------------------------------------------------
# Demo and plot
# ---------------------------------------------------------------------------------------------

def test_demo_is_reproduce_on_a_tiny_model(tmp_path, capsys, drawn_figures):
    assert run("demo", "--out", str(tmp_path)) == 0
    for path in ("identify/neurons.json", "ablate/ablation.json", "pairs/pairs.jsonl",
                 "train_dpo/metrics.jsonl", "train_yfpo/model/model.safetensors",
                 "eval_base/summary.json", "eval_yfpo/summary.json", "report.md", "report.png"):
        assert (tmp_path / path).is_file(), path
    report = (tmp_path / "report.md").read_text()
    for name in MODELS:  # the accuracy table: every model
        s = json.loads((tmp_path / f"eval_{name}" / "summary.json").read_text())
        ci = f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
        assert f"| {name} | {s['accuracy']:.4f} | {ci} | " in report
    for run_name in MODELS[1:]:  # the training table: every run
        assert f"| {run_name} | {metrics(tmp_path / f'train_{run_name}')[-1]['step']} | " in report
    wall_times = report.split("| stage | wall time")[1]
    assert all(f"| {stage} |" in wall_times for stage in STAGES)
    (figure,) = drawn_figures  # report.png: every run's curves
    assert curves(figure) == expected_curves({r: tmp_path / f"train_{r}" for r in MODELS[1:]})
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'report.md'}" in printed
    assert re.search(rf"\[demo\] done in [\d.]+s in {re.escape(str(tmp_path))}; a random model: "
                     r"its accuracy means nothing\.", printed), printed


def test_plot_draws_the_training_curves_of_a_train_folder(tiny_dir, pairs_file, tmp_path,
                                                          drawn_figures):
    train(tiny_dir, pairs_file, tmp_path, "--max-steps", "2", "--lam", "0")
    assert run("plot", str(tmp_path)) == 0
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"  # by default in the folder
    (figure,) = drawn_figures
    run_name = tmp_path.name  # a train folder's run is named after the folder
    assert curves(figure) == expected_curves({run_name: tmp_path})  # loss, margins: every step
    assert legends(figure) == [[run_name]] * 3
    assert figure.axes[-1].get_xlabel() == "step"


def test_plot_overlays_the_runs_of_several_folders(reproduced, tmp_path, drawn_figures):
    assert run("plot", str(reproduced), str(reproduced / "train_dpo"), "--out",
               str(tmp_path / "both.pdf")) == 0
    assert (tmp_path / "both.pdf").read_bytes()[:4] == b"%PDF"  # the format the name asks for
    (figure,) = drawn_figures
    # with several folders a run is named folder/run: a reproduce folder's three, a train one's one
    runs = {f"{reproduced}/{r}": reproduced / f"train_{r}" for r in MODELS[1:]}
    runs[f"{reproduced / 'train_dpo'}/dpo"] = reproduced / "train_dpo"
    assert curves(figure) == expected_curves(runs) and legends(figure) == [list(runs)] * 3


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line "error: ...", and nothing written
# ---------------------------------------------------------------------------------------------
# Each case's argv and message name their files by placeholders: {tiny}, {data}, {pairs}, {neurons}
# (the session's model and files), {out} (a folder path not made yet), {tmp} (the test's folder),
# and each name in BAD_INPUTS: a bad file or folder made in tmp_path/NAME/ (or a patch) when named.

def pair_rows(get):
    return yfpo.read_jsonl(get("pairs_file"))


def written(name, text):
    """A BAD_INPUTS maker: the file `name` holding text(get), get = request.getfixturevalue."""
    def make(folder, get):
        (folder / name).write_text(text(get))
        return folder / name
    return make


def config_only_model(folder, get):
    """A model folder cut short after its config.json, as an interrupted download leaves it."""
    (folder / "config.json").write_text("{}")
    return folder


def no_template_model(folder, get):  # the tiny model, its chat template taken out
    shutil.copytree(get("tiny_dir"), folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").unlink()
    return folder


def neurons_with(**changed):
    return lambda get: json.dumps({**json.loads(Path(get("neurons_file")).read_text()), **changed})


def gpt2_model(folder, get):  # an architecture attnlrp does not support, with the tiny tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=400)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((Path(get("tiny_dir")) / name).read_bytes())
    return folder


def flex_attention_model(folder, get):  # tiny, loaded with an attention that takes no packed mask
    load = yfpo.load_model

    def load_with_flex_attention(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.config._attn_implementation = "flex_attention"
        return model, tokenizer
    get("monkeypatch").setattr(yfpo, "load_model", load_with_flex_attention)
    return get("tiny_dir")


BAD_INPUTS = {
    "not_json": written("bad.jsonl", lambda get: jsonl(DEMO_ROWS[0]) + "{oops\n"),
    "no_question": written("bad.jsonl", lambda get: jsonl({"answer": "#### 1"})),
    "answer_not_text": written("bad.jsonl", lambda get: jsonl({"question": "q", "answer": 5})),
    "no_marker": written("bad.jsonl",
                         lambda get: jsonl(DEMO_ROWS[0], {"question": "q", "answer": "5"})),
    "a_file": written("out", lambda get: "x"),
    "gpt2_model": gpt2_model,
    "config_only_model": config_only_model,
    "no_template_model": no_template_model,
    "neurons_99_wide": written("neurons.json", neurons_with(intermediate_size=99)),
    "neurons_5_layers": written("n.json", neurons_with(num_layers=5)),
    "no_rejected": written("bad.jsonl", lambda get: jsonl(*pair_rows(get)[:2], {
        k: v for k, v in pair_rows(get)[2].items() if k != "rejected"})),
    "no_pairs": written("bad.jsonl", lambda get: ""),
    "empty_prompt": written("bad.jsonl", lambda get: jsonl(pair_rows(get)[0],
                                                           {**pair_rows(get)[1], "prompt": []})),
    "text_pairs": written("bad.jsonl", lambda get: jsonl(
        {"prompt": "Question: 1+1?", "chosen": "The answer is 2.", "rejected": "3"})),
    "sharegpt_pairs": written("bad.jsonl", lambda get: jsonl({**pair_rows(get)[0], "chosen": [
        {"from": "gpt", "value": "The answer is 2."}]})),  # ShareGPT's keys, not role/content
    "one_pair": written("bad.jsonl", lambda get: jsonl(pair_rows(get)[0])),
    # pairs on the questions identify selected the neurons on (rows 4 to 11)
    "selection_pairs": written("bad.jsonl", lambda get: jsonl(
        *({**r, "question_index": i} for i, r in enumerate(pair_rows(get))))),
    "flex_attention_model": flex_attention_model,
    "not_json_control": written("control.jsonl", lambda get: "{oops\n"),
}


def placeholder(name, request, tmp_path):
    fixtures = {"tiny": "tiny_dir", "data": "data_file", "pairs": "pairs_file",
                "neurons": "neurons_file"}
    if name in fixtures:
        return request.getfixturevalue(fixtures[name])
    if name in BAD_INPUTS:
        (tmp_path / name).mkdir()
        return BAD_INPUTS[name](tmp_path / name, request.getfixturevalue)
    return {"out": tmp_path / "out", "tmp": tmp_path}[name]


def assert_bad_input(request, argv, says):
    """Run a case with its placeholders filled in: a user error (see assert_user_error) that leaves
    every file it named as it was."""
    tmp_path, capsys = request.getfixturevalue("tmp_path"), request.getfixturevalue("capsys")
    names = set(re.findall(r"\{(\w+)\}", argv + says))
    order = sorted(names, key=lambda name: (name in BAD_INPUTS, name))  # fixtures before patches
    filled = {name: str(placeholder(name, request, tmp_path)) for name in order}
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()  # what making the fixtures printed
    assert_user_error(capsys, tmp_path / "out", *[a.format(**filled) for a in argv.split()],
                      says=says.format(**filled))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == inputs


EVAL = "eval --model {tiny} --data {data} --out {out} "
IDENTIFY = "identify --model {tiny} --data {data} --out {out} "
ABLATE = "ablate --model {tiny} --data {data} --neurons {neurons} --out {out} "
TRAIN = "train --model {tiny} --pairs {pairs} --out {out} --lam 0 --device cpu "
REPRODUCE_CPU = "reproduce --model {tiny} --data {data} --out {out} --device cpu "
BAD_INPUT = [  # (case, argv: a good command line and the bad part last, what the error line says)
    # data files, models, the out folder
    ("eval: no data file", EVAL + "--data {tmp}/nope.jsonl", "no .jsonl file at {tmp}/nope.jsonl"),
    ("eval: a line that is not JSON", EVAL + "--data {not_json}", "bad.jsonl:2: not valid JSON"),
    ("eval: a row without a question", EVAL + "--data {no_question}",
     "row 1 has no 'question' field"),
    ("eval: an answer that is not text", EVAL + "--data {answer_not_text}",
     "row 1: 'question' (not empty) and 'answer' must be text"),
    ("eval: an answer without its marker", EVAL + "--data {no_marker}",
     "row 2: the answer has no '#### N'"),
    ("eval: hub data, offline", EVAL + "--data no-such-org/no-such-data",
     "offline, pass --data /path/to/test.jsonl"),
    ("eval: --limit 0", EVAL + "--limit 0", "--limit: must be a positive int"),
    ("eval: a negative --limit", EVAL + "--limit -3", "--limit: must be a positive int"),
    ("eval: no model folder", EVAL + "--model {tmp}/no-model", "model path does not exist"),
    ("eval: a model folder without its tokenizer", EVAL + "--model {config_only_model}",
     "has no tokenizer_config.json; pass a complete Hugging Face model folder"),
    ("eval: a tokenizer without a chat template", EVAL + "--model {no_template_model}",
     "tokenizer has no chat template; set chat_template in its tokenizer_config.json"),
    ("eval: a hub model, offline", EVAL + "--model no-such-org/no-such-model",
     "offline, pass a local folder"),
    ("eval: out is an existing file", EVAL + "--out {a_file}", "is an existing file"),
    # identify and ablate
    ("identify: --num-samples 0", "identify --model {tiny} --num-samples 0 --out {out}",
     "--num-samples: must be a positive int"),
    ("identify: --top-k beyond the model", IDENTIFY + "--top-k 257",
     "--top-k 257 is not between 1 and the model's 256 neurons"),
    ("identify: an unsupported architecture", IDENTIFY + "--model {gpt2_model}",
     "supported: llama, qwen2, qwen3"),
    ("identify: hub data, offline, names the train split",
     IDENTIFY + "--data no-such-org/no-such-data",
     "offline, pass --data /path/to/train.jsonl"),
    ("ablate: neurons of another shape", ABLATE + "--neurons {neurons_99_wide}",
     "was made for 2 layers x 99 neurons but the model has 2 x 128"),
    ("ablate: one random seed", ABLATE + "--random-seeds 1",
     "--random-seeds 1: the controls' std needs at least 2"),
    # train
    ("train: no pairs file in an empty folder", "train --lam 0.3 --out {out}",
     "pairs file missing: {out}/pairs.jsonl; make one with `python yfpo.py pairs`"),
    ("train: a pair without its rejected", TRAIN + "--pairs {no_rejected}",
     "bad.jsonl:3: 'rejected' is missing, empty or not a list of role/content messages"),
    ("train: an empty pairs file", TRAIN + "--pairs {no_pairs}", "holds no pairs"),
    ("train: an empty prompt", TRAIN + "--pairs {empty_prompt}",
     "bad.jsonl:2: 'prompt' is missing, empty or not"),
    ("train: text pairs, not messages", TRAIN + "--pairs {text_pairs}",
     "bad.jsonl:1: 'prompt' is missing, empty or not a list of role/content messages"),
    ("train: messages without role and content", TRAIN + "--pairs {sharegpt_pairs}",
     "bad.jsonl:1: 'chosen' is missing, empty or not a list of role/content messages"),
    ("train: every pair truncated", TRAIN + "--max-length 8", "every pair was truncated away"),
    ("train: --lam without --neurons", TRAIN + "--lam 0.3", "--lam 0.3 needs --neurons"),
    ("train: a negative --lam without --neurons", TRAIN + "--lam -0.3",
     "--lam -0.3 needs --neurons"),
    ("train: neurons of another shape", TRAIN + "--neurons {neurons_5_layers}",
     "was made for 5 layers x 128 neurons"),
    ("train: --gamma auto with one pair",
     TRAIN + "--pairs {one_pair} --neurons {neurons} --lam 0.3 --batch-size 1 --grad-accum 1",
     "--gamma auto (1 / std of reference margins) needs 2 pairs; pass --gamma 1"),
    ("train: pairs on the selection questions",
     TRAIN + "--pairs {selection_pairs} --neurons {neurons}",
     "{selection_pairs} uses 4 questions (first: 4) that {neurons} was selected on; pair others or "
     "pass --allow-overlap"),
    ("train: --resume without a checkpoint", TRAIN + "--resume", "--resume: no checkpoint"),
    ("train: no such device", TRAIN + "--device gpu", "--device gpu is not a device"),
    ("train: attention that cannot take the packed mask", TRAIN + "--model {flex_attention_model}",
     "flex_attention attention cannot take"),
    # held-out endpoints
    ("pairs: --from-eval without an eval", "pairs --model {tiny} --data {data} --out {out} "
     "--from-eval {tmp}/none/eval.jsonl", "no eval.jsonl with its summary.json there"),
    ("score: no pairs file", "score --model {tiny} --neurons {neurons} --out {out} --pairs "
     "{tmp}/none.jsonl", "pairs file missing"),
    ("score: neurons of another shape", "score --model {tiny} --pairs {pairs} --out {out} "
     "--neurons {neurons_5_layers}", "was made for 5 layers x 128 neurons"),
    # reproduce: before any stage
    ("reproduce: identify and pairs questions that overlap", REPRODUCE_CPU +
     "--num-samples 8 --num-questions 8",
     "--num-samples 8 + --num-questions 8 overlap in the 12 train questions; lower one"),
    ("reproduce: --eval-limit 0", REPRODUCE_CPU + "--eval-limit 0",
     "--eval-limit: must be a positive int"),
    ("reproduce: --seeds 0", REPRODUCE_CPU + "--seeds 0", "--seeds: must be a positive int"),
    ("reproduce: a control file that is not JSON", REPRODUCE_CPU + "--control {not_json_control}",
     "control.jsonl:1: not valid JSON"),
    ("reproduce: no data file", REPRODUCE_CPU + "--data {tmp}/none.jsonl", "no .jsonl file at"),
    # plot
    ("plot: a folder without training runs", "plot {tmp}", "no training steps in {tmp}"),
]


@pytest.mark.parametrize("argv, says", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_no_output(argv, says, request):
    assert_bad_input(request, argv, says)


def test_reproduce_refuses_torchrun(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    assert_user_error(capsys, tmp_path / "out", "reproduce", "--model", tiny_dir, "--data",
                      data_file, "--out", str(tmp_path / "out"), "--device", "cpu",
                      says="reproduce runs in one process: no torchrun")


# ---------------------------------------------------------------------------------------------
# Optional: a real model (YFPO_SMOLLM2=/path/to/SmolLM2-135M-Instruct)
# ---------------------------------------------------------------------------------------------
SMOLLM2 = os.environ.get("YFPO_SMOLLM2")
GSM8K_TEST = HERE.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.skipif(not SMOLLM2 or not GSM8K_TEST.is_file(),
                    reason="set YFPO_SMOLLM2 and have ../shared/data/gsm8k")
def test_smollm2_eval_and_identify(tmp_path):
    assert run("eval", "--model", SMOLLM2, "--data", str(GSM8K_TEST), "--limit", "2",
               "--max-new-tokens", "64", "--out", str(tmp_path / "eval")) == 0
    assert run("identify", "--model", SMOLLM2, "--data", str(GSM8K_TEST), "--num-samples", "2",
               "--top-k", "30", "--out", str(tmp_path / "identify")) == 0
    assert json.loads((tmp_path / "identify" / "neurons.json").read_text())["num_layers"] == 30
