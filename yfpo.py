#!/usr/bin/env python
"""yfpo: Yoked Feature Preference Optimization (arXiv 2605.11906), the reference implementation.

DPO for math reasoning plus a reward read from the model's own "math neurons". Sections follow the
method and call only those above them (but reproduce and demo run their stages through main)."""
import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import types
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm  # comes with transformers

DEFAULT_MODEL, DEFAULT_DATA = "Qwen/Qwen2.5-0.5B-Instruct", "openai/gsm8k"
# Appended to every question; the strict extraction rule looks for exactly this phrase.
INSTRUCTION = ('Solve the problem step by step, then finish with "The answer is N." where N is the '
               'final number.')
LRP_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # the ones lxt's AttnLRP patches and we test


class UserError(Exception):
    """A mistake in the user's input. main() prints it as one line and exits with code 2."""


# --- Files: every output is written whole (a temporary name, then a rename) -----------------------
def rank_and_world():  # (rank, number of processes): (0, 1) unless launched by torchrun
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def check_out_dir(out):
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is an existing file; pass a folder path")
    return Path(out)


def write(path, content):
    """Write path whole on rank 0: text as is, a list to .jsonl a JSON row per line, else JSON."""
    if isinstance(content, list) and Path(path).suffix == ".jsonl":
        content = "".join(json.dumps(row) + "\n" for row in content)
    elif not isinstance(content, str):
        content = json.dumps(content, indent=2) + "\n"
    if rank_and_world()[0] == 0:  # under torchrun, rank 0 writes
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.tmp").write_text(content)
        os.replace(f"{path}.tmp", path)


def read_jsonl(path, numbered=False):
    """The rows of a JSONL file (blank lines skipped); numbered: as (line number, row)."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().split("\n"), 1):
        try:
            rows += [(lineno, json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix that line") from None
    return rows if numbered else [row for _, row in rows]


def looks_like_path(name):  # a name only a local file has (hub ids are 'org/name', no extension)
    suffixes = (".json", ".jsonl", ".parquet", ".pt")
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in suffixes


# --- Model and device -----------------------------------------------------------------------------
def pick_device(name, dtype):
    """(device, dtype) of --device and --dtype; auto: cuda if there is one, bfloat16 if it can."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    return device, getattr(torch, dtype)


def load_model(name, device, dtype, weights=True):
    """(model, tokenizer) of a hub id or a local Hugging Face folder; weights=False: model None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not Path(name).exists() and looks_like_path(name):
        raise UserError(f"model path does not exist: {name}; pass a Hugging Face folder or hub id")
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (Path(name) / f).exists()]
    if Path(name).is_dir() and missing:  # else transformers' first line can mislead (protobuf...)
        raise UserError(f"{name} has no {missing[0]}; pass a complete Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if not tokenizer.chat_template:  # prompts and pairs are chat messages (TRL's format)
            raise UserError(f"{name}'s tokenizer has no chat template; set chat_template in its "
                            "tokenizer_config.json")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype) if weights else None
    except (OSError, ValueError, ImportError) as e:  # unreachable hub, missing or unreadable files
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load model '{name}' ({first_line}); offline, pass a local "
                        "folder") from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model and model.to(device).eval(), tokenizer


def decoder_layers(model):  # the transformer blocks of a (possibly DDP-wrapped) causal LM
    return getattr(model, "module", model).get_decoder().layers


def model_shape(model):  # (layers, MLP neurons per layer)
    layers = decoder_layers(model)
    return len(layers), layers[0].mlp.down_proj.in_features


# --- Data: GSM8K rows, gold answers, prompts, tokenized batches -----------------------------------
def load_rows(data, split, config=None):
    """Rows of a local .jsonl file, a folder holding SPLIT.jsonl, or a hub dataset (or cache)."""
    path = Path(data) / f"{split}.jsonl" if Path(data).is_dir() else Path(data)
    if looks_like_path(data) or path.suffix == ".jsonl":
        if not (path.is_file() and path.suffix == ".jsonl"):
            raise UserError(f"no .jsonl file at {path}; pass one or a folder with {split}.jsonl")
        return read_jsonl(path)  # our reader: its errors name the line
    import datasets
    try:
        return list(datasets.load_dataset(data, config, split=split))
    except Exception as e:  # datasets raises many types for "unreachable", "unknown", "malformed"
        raise UserError(f"could not load '{data}' ({type(e).__name__}); offline, pass --data "
                        f"/path/to/{split}.jsonl") from None


def parse_gold(answer):  # the gold number of a GSM8K solution
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(data, split, require_gold=True):
    """GSM8K rows as dicts with question, answer (the solution, ending '#### N') and gold (N). With
    require_gold=False (control text for identify) answers need no '####' and gold is None."""
    rows = load_rows(data, split, config="main" if data == DEFAULT_DATA else None)
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("question", "answer") if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"{data}: row {i} has no '{missing[0]}' field; GSM8K rows need both")
        question, answer = row["question"], row["answer"]
        if not (isinstance(question, str) and isinstance(answer, str) and question.strip()):
            raise UserError(f"{data}: row {i}: 'question' (not empty) and 'answer' must be text")
        if require_gold and "####" not in answer:
            raise UserError(f"{data}: row {i}: the answer has no '#### N' gold marker; add one")
        row["gold"], row["index"] = parse_gold(answer) if require_gold else None, i - 1
    if not rows:
        raise UserError(f"{data}: no rows in split '{split}'")
    return rows


def gold_solution(answer):
    """A GSM8K solution as a model should write it: no <<...>> marks, ending "The answer is N."."""
    reasoning = re.sub(r"<<[^>]*>>", "", answer.rsplit("####", 1)[0]).strip()
    return f"{reasoning}\nThe answer is {parse_gold(answer)}."


def make_prompt(question, system=None, instruction=True):
    """A prompt in TRL's conversational format: [a system message,] the question (+ INSTRUCTION)."""
    content = f"{question}\n{INSTRUCTION}" if instruction else question
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def format_prompt(tokenizer, question, system=None, instruction=True):
    """make_prompt's prompt as text: the chat template with the assistant's generation prompt."""
    prompt = make_prompt(question, system, instruction)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def make_completion(text):  # a completion in TRL's conversational format
    return [{"role": "assistant", "content": text}]


def tokenize_example(tokenizer, prompt, completion, max_length):
    """(prompt_ids, completion_ids) as TRL's DPOTrainer makes them from messages: the chat template
    of the prompt (with the generation prompt), then the rest of the templated conversation. The
    completion is cut to fit max_length."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)  # token ids
    full_ids = tokenizer.apply_chat_template(prompt + completion)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise UserError("the tokenized prompt is not a prefix of prompt + completion; this "
                        "chat template cannot split them (TRL would fail the same way)")
    return prompt_ids, full_ids[len(prompt_ids):max(max_length, len(prompt_ids))]


def collate(examples, pad_id):
    """Right-padded batch from (prompt_ids, completion_ids) pairs: input_ids, attention_mask, labels
    and loss_mask, each [B, T]; labels[b, t] = input_ids[b, t + 1], and loss_mask[b, t] = 1 where
    that label is a completion token."""
    size = (len(examples), max(len(p) + len(c) for p, c in examples))
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention_mask, loss_mask = torch.zeros(size, dtype=torch.long), torch.zeros(size)
    for b, (p, c) in enumerate(examples):
        input_ids[b, :len(p) + len(c)], attention_mask[b, :len(p) + len(c)] = torch.tensor(p + c), 1
        loss_mask[b, len(p) - 1:len(p) + len(c) - 1] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                labels=F.pad(input_ids[:, 1:], (0, 1), value=pad_id), loss_mask=loss_mask)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def batches_of(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def solution_examples(tokenizer, rows, max_length, system=None):
    """Tokenized (prompt, gold solution) examples as training sees them. Control rows (gold None:
    non-math text) keep their own form: the question alone (no instruction), the answer whole."""
    examples = []
    for r in rows:
        math_row = r["gold"] is not None
        prompt = make_prompt(r["question"], system, instruction=math_row)
        answer = make_completion(gold_solution(r["answer"]) if math_row else r["answer"])
        examples.append(tokenize_example(tokenizer, prompt, answer, max_length))
    return examples


# --- Grading: answer extraction and exact match ---------------------------------------------------
# A number: optional sign, digits with or without thousands commas, optional decimals.
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
FLEXIBLE = re.compile(r"(?<![\w.])" + NUMBER)
# The number right after "The answer is", "####" or "\boxed{" (allowing ':', '*', '$' in between).
STRICT = re.compile(r"(?:answer is|####|\\boxed\{)[\s:*]*(?:\\?\$\s*)?(" + NUMBER + ")",
                    re.IGNORECASE)


def normalize_number(text):
    return text.replace(",", "").replace("$", "").replace("%", "").rstrip(".")


def extract_answer(text):
    """(answer, rule): the number right after the last "The answer is", "####" or "\\boxed{" and
    'strict', else the last number ('1234', '-3.5') and 'flexible'; (None, None) if none."""
    if strict := STRICT.findall(text):
        return normalize_number(strict[-1]), "strict"
    flexible = FLEXIBLE.findall(text)
    return (normalize_number(flexible[-1]), "flexible") if flexible else (None, None)


def is_correct(text, gold):
    """True when the extracted answer equals the gold number numerically ('18.00' == '18')."""
    try:
        answer, gold = float(extract_answer(text)[0]), float(normalize_number(gold))
    except (TypeError, ValueError):  # no answer, or not a number
        return False
    return abs(answer - gold) <= 1e-6 * max(1.0, abs(gold))


# --- Generation: batched greedy (or sampled) decoding with continuous batching --------------------
# Stated: the strict pattern, then a character that cannot continue it (not "is 1" of "is 12").
ANSWER_STATED = re.compile(STRICT.pattern + r"(?=[^\d.,]|[.,]\D)", re.IGNORECASE)
STOP_RULE = ('EOS, max_new_tokens, or the strict answer ("The answer is N", "#### N", "\\boxed{N") '
             'once N is complete')


class SlotCache:
    """Continuous batching's KV cache: keys and values [S, H, W, D] per layer, row s one sequence
    ending at the shared column `length`, valid [S, W] its columns; a step writes one, in place."""

    def __init__(self, prefill, rows, prompt_width, max_new_tokens):
        k, width = prefill[0][0], prompt_width + max_new_tokens + 64  # k: [1, H, P, D]
        shape = (rows, k.shape[1], width, k.shape[3])
        self.keys, self.values = ([k.new_zeros(shape) for _ in prefill] for _ in "kv")
        self.valid = torch.zeros(rows, width, dtype=torch.bool, device=k.device)
        self.length = self.prompt_width = prompt_width  # always room to the left for any prompt

    def update(self, keys, values, layer, cache_kwargs=None):  # the attention layers call this
        new = slice(self.length, self.length + keys.shape[2])
        self.keys[layer][:, :, new], self.values[layer][:, :, new] = keys, values
        return self.keys[layer][:, :, :new.stop], self.values[layer][:, :, :new.stop]

    def next_column(self):
        """Open column `length` to all rows, first dropping the unowned leading columns if >= 64."""
        start = min(int(self.valid.any(0).int().argmax()), self.length - self.prompt_width)
        if start >= 64:
            n = self.length - start
            for t in self.keys + self.values:
                t[:, :, :n] = t[:, :, start:self.length].clone()
            self.valid[:, :n], self.valid[:, n:] = self.valid[:, start:self.length].clone(), False
            self.length = n
        self.valid[:, self.length] = True

    def place(self, row, prefill):
        """Row `row` takes a prompt's prefilled [(keys, values) [1, H, P, D] per layer]."""
        span = slice(self.length - prefill[0][0].shape[2], self.length)
        self.valid[row], self.valid[row, span] = False, True
        for layer, (k, v) in enumerate(prefill):
            self.keys[layer][row, :, span], self.values[layer][row, :, span] = k[0], v[0]

    def keep(self, live):
        """Rows `live` (ascending) become rows 0..n-1 in place: only rows beyond n move, into the
        holes (no copy of the whole cache). Returns the old row of each new row."""
        n = len(live)
        holes, movers = (r for r in range(n) if r not in live), (r for r in live if r >= n)
        moves = dict(zip(holes, movers))  # hole -> the row that moves into it
        for t in self.keys + self.values + [self.valid]:
            t[list(moves)] = t[list(moves.values())]
        self.keys, self.values = [k[:n] for k in self.keys], [v[:n] for v in self.values]
        self.valid = self.valid[:n]
        return [moves.get(r, r) for r in range(n)]


def decode_attention(module, query, key, value, mask, scaling=None, dropout=0.0, **kwargs):
    """generate()'s attention: sdpa for a prompt; for one new token (query [B, H, 1, D], key and
    value [B, H_kv, T, D]) the query heads that share a key head become query rows of that head, so
    the cache is read in place, not copied n_rep times by repeat_kv at every step."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    batch, heads, length, dim = query.shape
    if length > 1:
        return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, **kwargs)
    grouped = query.view(batch, key.shape[1], heads // key.shape[1], dim)
    out = F.scaled_dot_product_attention(grouped, key, value, mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


@torch.no_grad()
def generate(model, tokenizer, prompts, batch_size, max_new_tokens, desc="generate",
             temperature=0.0, num_samples=1, seed=0):
    """num_samples completions per prompt text, in order, as {text, stop (eos, answer or length:
    STOP_RULE), tokens}. Greedy, or plain sampling at temperature > 0 with one seeded generator per
    sequence (no model generation defaults). Continuous batching: each prompt is prefilled alone,
    then decoded among batch_size rows; a row whose sequence ends takes the next waiting one, or
    leaves. Under torchrun each rank takes every world-th prompt."""
    from transformers import AttentionInterface
    (rank, world), device, config = rank_and_world(), model.device, model.config
    eos = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    mine = sorted(range(len(prompts)), key=lambda q: -len(ids[q]))[rank::world]  # longest first
    waiting = [(q, j) for q in mine for j in range(num_samples)][::-1]  # pop() takes the next
    rows, cache, results = [], None, {}

    def pick(logits, sequences):  # logits [S, V] -> next tokens [S]
        if not temperature:
            return logits.argmax(-1).tolist()
        probs = (logits.float() / temperature).softmax(-1)
        return [int(p.multinomial(1, generator=s["generator"])) for p, s in zip(probs, sequences)]

    def push(sequence, token):  # append a token; True when the sequence has ended (and is recorded)
        sequence["count"] += 1
        sequence["tokens"] += [] if token in eos else [token]
        text = tokenizer.decode(sequence["tokens"], skip_special_tokens=True)
        ended = {"eos": token in eos, "answer": ANSWER_STATED.search(text),
                 "length": sequence["count"] == max_new_tokens}
        stop = next((name for name, hit in ended.items() if hit), None)
        if stop:
            results[sequence["index"]] = {"text": text, "stop": stop, "tokens": sequence["count"]}
            bar.update(1)
        return stop is not None
    AttentionInterface.register("yfpo_decode", decode_attention)
    with tqdm(total=len(waiting), desc=desc, unit="q" if num_samples == 1 else "sample",
              disable=rank > 0) as bar, contextlib.ExitStack() as restore:
        restore.callback(setattr, config, "_attn_implementation", config._attn_implementation)
        config._attn_implementation = "yfpo_decode"
        while waiting or rows:
            free = [r for r, s in enumerate(rows) if s is None] + list(range(len(rows), batch_size))
            while free and waiting:  # refill: prefill the next prompt alone, take its first token
                q, j = waiting.pop()
                if j == 0:  # a prompt's samples are popped in a row: prefill it once for all
                    out = model(input_ids=torch.tensor([ids[q]], device=device), use_cache=True,
                                logits_to_keep=1)
                    kv, logits = [layer[:2] for layer in out.past_key_values], out.logits[0, -1]
                index = q * num_samples + j
                sequence = {"index": index, "tokens": [], "count": 0, "position": len(ids[q]) - 1,
                            "generator": torch.Generator(device) if temperature else None}
                if temperature:  # sampling only; the seed is the same on any rank and batch size
                    sequence["generator"].manual_seed((seed * 1_000_003 + index) % 2 ** 31)
                if not push(sequence, pick(logits[None], [sequence])[0]):
                    cache = cache or SlotCache(kv, min(batch_size, len(waiting) + 1),
                                               max(map(len, ids)), max_new_tokens)
                    cache.place(row := free.pop(0), kv)
                    rows[row:row + 1] = [sequence]
            live = [r for r, s in enumerate(rows) if s is not None]
            if not live:
                break
            if len(live) < len(rows):  # nothing waits: finished rows leave the batch
                rows = [rows[r] for r in cache.keep(live)]
            cache.next_column()  # where this step's keys go
            positions = [[s["position"] + len(s["tokens"])] for s in rows]
            out = model(input_ids=torch.tensor([[s["tokens"][-1]] for s in rows], device=device),
                        position_ids=torch.tensor(positions, device=device), past_key_values=cache,
                        attention_mask=cache.valid[:, None, None, :cache.length + 1],
                        cache_position=torch.tensor([cache.length], device=device))
            cache.length += 1
            for r, token in enumerate(pick(out.logits[:, -1], rows)):
                if push(rows[r], token):
                    rows[r], cache.valid[r] = None, False
    if world > 1:  # every rank's {index: completion}, merged
        parts = [None] * world
        dist.all_gather_object(parts, results)
        results = {k: v for part in parts for k, v in part.items()}
    return [results[i] for i in range(len(prompts) * num_samples)]


def sample_completions(model, tokenizer, rows, args, desc, temperature=0.0, num_samples=1):
    """generate() on the rows' questions: (completions, seconds, how they were made, ended, ran)."""
    start = time.perf_counter()
    prompts = [format_prompt(tokenizer, r["question"], args.system) for r in rows]
    completions = generate(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, desc,
                           temperature, num_samples, args.seed)
    seconds = max(time.perf_counter() - start, 1e-9)  # a coarse clock may see no time pass
    tokens = sum(c["tokens"] for c in completions)
    stops = dict(collections.Counter(c["stop"] for c in completions))
    return completions, seconds, {
        "stop_rule": STOP_RULE, "stops": stops, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "processes": rank_and_world()[1], "generated_tokens": tokens,
        "wall_time_s": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


# --- Statistics: what a difference in accuracy can show -------------------------------------------
def wilson_interval(correct, total, z=1.96):
    """95% Wilson score interval for a binomial proportion."""
    p = correct / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(only_a, only_b):
    """Two-sided exact McNemar p-value from the discordant counts (only a right, only b right):
    p = min(1, 2 * P(Binomial(only_a + only_b, 1/2) <= min(only_a, only_b)))."""
    n = only_a + only_b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n)


def mcnemar_detectable(discordant, total, alpha=0.05, power=0.8):
    """The smallest accuracy difference the exact McNemar test detects with `power` at `alpha`
    given `discordant` of `total` questions discordant: with only_a ~ Binomial(discordant, pi), it
    is (2 pi - 1) * discordant / total. None when no split is significant."""
    k = torch.arange(discordant + 1, dtype=torch.float64)
    log_comb = math.lgamma(discordant + 1) - torch.lgamma(k + 1) - torch.lgamma(discordant - k + 1)

    def pmf(pi):  # P(only_a = k) for every k
        return (log_comb + k * math.log(pi) + (discordant - k) * math.log1p(-pi)).exp()
    edge = int((2 * pmf(0.5).cumsum(0)[:discordant // 2 + 1] <= alpha).sum()) - 1  # -1: nowhere
    region = (k <= edge) | (k >= discordant - edge)  # mcnemar_exact(k, discordant - k) <= alpha
    lo, hi = 0.5, 1 - 1e-12
    if pmf(hi)[region].sum() < power:  # also when no split is significant (region empty)
        return None
    for _ in range(50):  # bisection: power rises with pi
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pmf(mid)[region].sum() >= power else (mid, hi)
    return (2 * hi - 1) * discordant / total


def bootstrap_ci(values, seed=0, resamples=2000):
    """95% percentile bootstrap interval of the mean of values [N], resampled from seed: the same
    resamples for any statistic of the same N, so a difference's interval is a paired one."""
    values = torch.as_tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = values[torch.randint(len(values), (resamples, len(values)), generator=g)].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def paired_difference(shared):
    """Accuracy difference of two runs on the same questions, shared = [(this, other correct)]."""
    only_this, only_other = sum(a and not b for a, b in shared), sum(b and not a for a, b in shared)
    return {"shared": len(shared), "difference": (only_this - only_other) / len(shared),
            "only_this_correct": only_this, "only_other_correct": only_other,
            "mcnemar_p": mcnemar_exact(only_this, only_other)}


# --- Evaluation: teacher-forced log-probs and NLL, greedy accuracy --------------------------------
def completion_logps(logits, labels, mask):
    """[B] float32: sum_t mask[b, t] * log softmax(logits[b, t])[labels[b, t]], the summed log-probs
    of the completion tokens; logits [B, T, V], labels and mask [B, T] (labels[b, t]: the token t
    predicts). labels and mask [B, T, S] read S label sets off the same logits into [B, S], with one
    log-normalizer and no [B, T, V] log-prob tensor."""
    if labels.dim() == 2:
        return completion_logps(logits, labels[..., None], mask[..., None])[:, 0]
    logits = logits.float()
    return ((logits.gather(-1, labels) - logits.logsumexp(-1, keepdim=True)) * mask).sum(1)


def forward_logps(model, batch):
    """Completion log-probs from one forward: [B] for a collate batch, [B, 2] for packed pairs.
    Logits start at the first position that predicts a completion: no lm_head on the prompt."""
    attention, mask = batch["attention_mask"], batch["loss_mask"]
    if attention.dim() == 3:  # packed pairs: each row has its own [T, T] mask
        attention = attention[:, None]
        if getattr(model, "module", model).config._attn_implementation == "eager":  # eager adds it
            attention = torch.where(attention, 0.0, -torch.inf)
    predicts = mask.amax(-1) if mask.dim() == 3 else mask  # [B, T]: t predicts a completion token
    first = int(predicts.argmax(1).min())
    logits = model(input_ids=batch["input_ids"], attention_mask=attention,
                   position_ids=batch.get("position_ids"), logits_to_keep=mask.shape[1] - first,
                   use_cache=False).logits
    return completion_logps(logits, batch["labels"][:, first:], mask[:, first:])


@torch.no_grad()
def gold_nll(model, batches):
    """Mean NLL per completion token over batches; under torchrun each rank takes every world-th."""
    (rank, world), sums = rank_and_world(), torch.zeros(2, dtype=torch.float64, device=model.device)
    for batch in batches[rank::world]:  # sums: -sum log p, and the tokens
        sums += torch.stack([-forward_logps(model, batch).sum(), batch["loss_mask"].sum()]).double()
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def evaluate(model, tokenizer, rows, args):
    """Greedy GSM8K exact match on rows: (summary dict, per-question rows)."""
    completions, seconds, speed = sample_completions(model, tokenizer, rows, args, "eval")
    answers = [extract_answer(c["text"]) for c in completions]
    results = [{"index": i, "question": r["question"], "gold": r["gold"], "completion": c["text"],
                "extracted": answer, "rule": rule, "correct": is_correct(c["text"], r["gold"]),
                "stop": c["stop"], "tokens": c["tokens"]}
               for i, (r, c, (answer, rule)) in enumerate(zip(rows, completions, answers))]
    correct = sum(r["correct"] for r in results)
    low, high = wilson_interval(correct, len(results))
    strict = sum(r["correct"] and r["rule"] == "strict" for r in results)  # answered as instructed
    return {"accuracy": correct / len(results), "accuracy_strict": strict / len(results),
            "correct": correct, "total": len(results), "ci_low": low, "ci_high": high, **speed,
            "system": args.system, "questions_per_s": round(len(results) / seconds, 3)}, results


def start_command(args, split, limit):
    """(out, device, rows, model, tokenizer), the out folder checked and the seed set."""
    out, (device, dtype) = check_out_dir(args.out), pick_device(args.device, args.dtype)
    torch.manual_seed(args.seed)
    rows = load_gsm8k(args.data, split)[limit if isinstance(limit, slice) else slice(limit)]
    return out, device, rows, *load_model(args.model, device, dtype)


# --- Neurons: AttnLRP relevance, selection, the saved set, the causal check (ablation) ------------
# A "neuron" is one coordinate of an MLP's hidden layer, i.e. of the input of down_proj:
# a = act(gate_proj(x)) * up_proj(x), shape [B, T, intermediate_size], in every layer.
@contextlib.contextmanager
def attnlrp(model):
    """Inside the block, lxt's AttnLRP rules (Achtibat et al., 2024, "AttnLRP: Attention-Aware
    Layer-wise Relevance Propagation for Transformers") patch the modeling module (its MLP, its
    RMSNorm) and torch's Dropout process-wide; on exit all is put back: training runs unpatched."""
    if model.config.model_type not in LRP_ARCHITECTURES:
        raise UserError(f"model type '{model.config.model_type}' is not supported; supported: "
                        f"{', '.join(LRP_ARCHITECTURES)}")
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import get_default_map
    patch_map = get_default_map(sys.modules[type(model).__module__])
    saved = {target: dict(vars(target)) for target in patch_map}
    monkey_patch(sys.modules[type(model).__module__], patch_map)
    try:
        yield model
    finally:
        for target, attrs in saved.items():
            for name in set(vars(target)) - set(attrs):
                delattr(target, name)
            for name, value in attrs.items():
                if vars(target).get(name) is not value:
                    setattr(target, name, value)


def neuron_relevance(model, input_ids, attention_mask, labels, loss_mask):
    """AttnLRP relevance of every MLP neuron for the gold next-token logits z_t, per sample, over
    the solution's tokens t; inputs [B, T] (see collate), a_l the input of layer l's down_proj:
        F = sum_{t : loss_mask[t] = 1} z_t[labels[t]],   R_{l,i} = sum_t a_{l,t,i} * dF/da_{l,t,i}
    Inside attnlrp(model) dF/da follows the AttnLRP rules, outside R is gradient x input (float32;
    the weights get no gradient). Returns (R, G), each [B, L, I], G = sum_t dF/da."""
    layers, found = decoder_layers(model), {}  # found: down_proj module -> (relevance, gradient)
    keep = F.pad(loss_mask, (1, 0))[:, :-1, None].float()  # solution tokens: t + 1 holds label t

    def pre_hook(module, args):
        a = args[0].detach()  # not args[0] itself: that cycle would never be freed

        def on_grad(grad):  # called during backward with dF/da, shape [B, T, I]
            found[module] = ((a.float() * grad.float() * keep).sum(1), (grad.float() * keep).sum(1))
        args[0].register_hook(on_grad)
    with torch.enable_grad(), contextlib.ExitStack() as undo:  # undoes the hooks and requires_grad
        for layer in layers:
            undo.enter_context(layer.mlp.down_proj.register_forward_pre_hook(pre_hook))
        for p in model.parameters():
            undo.callback(p.requires_grad_, p.requires_grad)
        model.requires_grad_(False)  # activation gradients only: nothing kept for the weights'
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask)[0]
        # Only the gold logit of each position: z_t[y] = h_t . W_y (+ b_y), no vocabulary matmul.
        head = model.get_output_embeddings()
        bias = 0 if head.bias is None else head.bias[labels]
        logits = (hidden * head.weight[labels]).sum(-1) + bias
        torch.autograd.grad((logits * loss_mask).sum(), embeds)
    relevance, gradient = zip(*[found[layer.mlp.down_proj] for layer in layers])
    return torch.stack(relevance, dim=-2), torch.stack(gradient, dim=-2)


def score_neurons(model, batches):
    """(scores, directions), each [L, I] float32, over the samples of batches (see collate):
        score = the mean over samples (with any solution token) of R / the sample's solution tokens
    (R, G of neuron_relevance); direction = sign(sum of G), +1 at 0: the way raising it moves F."""
    score, gradient, count = 0.0, 0.0, 0
    for batch in batches:
        relevance, grad = neuron_relevance(model, **batch)
        tokens = batch["loss_mask"].sum(1)
        score = score + (relevance / tokens.clamp_min(1)[:, None, None]).double().sum(0)
        gradient, count = gradient + grad.double().sum(0), count + int((tokens > 0).sum())
    return (score / count).float(), torch.where(gradient < 0, -1.0, 1.0)


def select_neurons(scores, k):
    """The top k of scores [L, I] over all layers: [(layer, index, score)], highest first."""
    width, k_max = scores.shape[1], scores.numel()
    if not 1 <= k <= k_max:
        raise UserError(f"--top-k {k} is not between 1 and the model's {k_max} neurons; lower it")
    top = scores.flatten().topk(k)
    return [(int(i) // width, int(i) % width, float(v)) for v, i in zip(top.values, top.indices)]


@contextlib.contextmanager
def ablate_neurons(model, neurons, scale=0.0):
    """Inside the block, neurons [(layer, index, ...)] x scale at down_proj's input (0 ablates)."""
    layers, masks = decoder_layers(model), {}
    for n in neurons:
        masks.setdefault(n[0], torch.ones(model_shape(model)[1]))[n[1]] = scale
    with contextlib.ExitStack() as hooks:  # a hook's handle removes the hook on exit
        for layer, mask in masks.items():
            def pre_hook(module, args, mask=mask):
                return (args[0] * mask.to(args[0]),) + args[1:]
            hooks.enter_context(layers[layer].mlp.down_proj.register_forward_pre_hook(pre_hook))
        yield model


def load_neurons(path, model):
    """The [(layer, index, score, act_mean, act_std, direction)] of a neurons.json for model."""
    if not Path(path).is_file():
        raise UserError(f"neurons file missing: {path}; run `python yfpo.py identify` first")
    try:
        saved = json.loads(Path(path).read_text())
        shape = (saved["num_layers"], saved["intermediate_size"])
        fields = ("layer", "index", "score", "act_mean", "act_std", "direction")
        neurons = [tuple(n[k] for k in fields) for n in saved["neurons"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a neurons file of identify ({e!r}); rerun it") from None
    if shape != model_shape(model):
        raise UserError("{} was made for {} layers x {} neurons but the model has {} x {}; run "
                        "identify with this model".format(path, *shape, *model_shape(model)))
    if not neurons:
        raise UserError(f"{path} lists no neurons; run identify with --top-k of at least 1")
    return neurons


@torch.no_grad()
def activation_moments(model, batches):
    """Mean, std and mean |a| of every neuron over the solutions' tokens in batches: 3 x [L, I]."""
    layers, sums, keep = decoder_layers(model), {}, []

    def pre_hook(module, args):  # sums of a, a^2 and |a| over this batch's solution positions
        a = args[0].double()
        moments = [(x * keep[-1]).sum((0, 1)) for x in (a, a * a, a.abs())]
        sums[module] = sums.get(module, 0) + torch.stack(moments)
    with contextlib.ExitStack() as hooks:  # a hook's handle removes the hook on exit
        for layer in layers:
            hooks.enter_context(layer.mlp.down_proj.register_forward_pre_hook(pre_hook))
        for batch in batches:  # the decoder alone: no logits. Position t + 1 holds label t.
            keep.append(F.pad(batch["loss_mask"], (1, 0))[:, :-1, None].double())
            model.get_decoder()(batch["input_ids"], attention_mask=batch["attention_mask"])
    tokens = sum(k.sum() for k in keep)
    mean, mean_sq, mean_abs = torch.stack([sums[l.mlp.down_proj] for l in layers], 1) / tokens
    return mean.float(), (mean_sq - mean ** 2).clamp_min(0).sqrt().float(), mean_abs.float()


def random_neurons(neurons, mean_abs, generator, bins=10):
    """A random control for neurons: [(layer, index)], as many in each layer, none of them. The
    layer's other neurons are cut by mean_abs [L, I] into `bins` equal-count bins (fewer if under
    bins x its count); each selected neuron is matched by a draw, without replacement, from its own
    bin. bins=1: matched on layer only."""
    chosen, control = {(n[0], n[1]) for n in neurons}, []
    for layer in sorted({n[0] for n in neurons}):
        picked = torch.tensor([n[1] for n in neurons if n[0] == layer])
        pool = torch.tensor([i for i in range(mean_abs.shape[1]) if (layer, i) not in chosen])
        if len(pool) < len(picked):
            raise UserError(f"layer {layer}: {len(picked)} chosen, {len(pool)} left; lower --top-k")
        num_bins = max(1, min(bins, len(pool) // len(picked)))
        chunks = pool[mean_abs[layer, pool].argsort()].tensor_split(num_bins)
        edges = mean_abs[layer, [int(c[-1]) for c in chunks[:-1]]]  # each bin's top but the last's
        of_bin = torch.bucketize(mean_abs[layer, picked], edges)
        for b, need in zip(*of_bin.unique(return_counts=True)):
            draw = torch.randperm(len(chunks[b]), generator=generator)[:need]
            control += [(layer, int(i)) for i in chunks[b][draw]]
    return control


def compare_with_random(nll_base, nll_selected, nll_random):
    """The selected set's NLL against random controls' (one per seed): their mean, std (n - 1),
    rise = mean - nll_base, z = (nll_selected - mean) / std, and ratio = (nll_selected - nll_base)
    / rise when the random rise is over 3 standard errors (3 std / sqrt(n)) of zero, else a note."""
    mean = sum(nll_random) / len(nll_random)
    std = torch.tensor(nll_random, dtype=torch.float64).std().item()
    rise, noise = mean - nll_base, 3 * std / math.sqrt(len(nll_random))
    note = None if abs(rise) > noise else (f"random rise {rise:+.3g} is within 3 standard errors "
                                           f"({noise:.3g}) of zero: no ratio")
    return {"nll": nll_random, "mean": mean, "std": std, "rise": rise,
            "z": (nll_selected - mean) / std if std else None,
            "ratio": None if note else (nll_selected - nll_base) / rise, "note": note}


def solution_batches(tokenizer, rows, args, device, batch_size):
    examples = solution_examples(tokenizer, rows, args.max_length, args.system)
    return [to_device(collate(chunk, tokenizer.pad_token_id), device)
            for chunk in batches_of(examples, batch_size)]


def cmd_identify(args):
    """identify: score every MLP neuron with AttnLRP on the gold solutions of the last --num-samples
    train questions; keep the top k, and a random control matched per layer and activation scale."""
    control = load_gsm8k(args.control, "train", False)[:args.num_samples] if args.control else []
    last = slice(-args.num_samples, None)  # the end of train; pairs take its start
    out, device, rows, model, tokenizer = start_command(args, "train", last)
    with attnlrp(model):  # checks the architecture first
        (num_layers, width), start = model_shape(model), time.perf_counter()
        select_neurons(torch.zeros(num_layers, width), args.top_k)  # k first
        math_batches = solution_batches(tokenizer, rows, args, device, args.batch_size)
        scores, directions = score_neurons(model, tqdm(math_batches, desc="identify", unit="batch"))
        if control:  # keep what is specific to math, not what any text uses
            batches = solution_batches(tokenizer, control, args, device, args.batch_size)
            scores -= score_neurons(model, tqdm(batches, desc="control", unit="batch"))[0]
    seconds = time.perf_counter() - start
    neurons = select_neurons(scores, args.top_k)
    mean, std, mean_abs = activation_moments(model, math_batches)
    matched = random_neurons(neurons, mean_abs, torch.Generator().manual_seed(args.seed))
    counts = [sum(n[0] == layer for n in neurons) for layer in range(num_layers)]
    disagree = sum(int(directions[l, i]) != (-1 if mean[l, i] < 0 else 1) for l, i, _ in neurons)
    selection = {"rule": "global_top_k", "top_k": args.top_k, "num_selected": len(neurons),
                 "score": "AttnLRP relevance at the down_proj input per solution token, mean over "
                          "samples" + (", minus the same on the control text" if control else ""),
                 "direction": "sign of the summed AttnLRP gradient on solution tokens",
                 "data": args.data, "split": "train", "num_samples": len(rows),
                 "question_indices": [r["index"] for r in rows], "control": args.control,
                 "num_control_samples": len(control), "max_length": args.max_length}
    random_rule = {"rule": "random control: as many per layer as neurons.json, matched on mean "
                           "|a| (10 bins), none of its neurons", "seed": args.seed}
    for name, chosen, extra in (
            ("random_neurons.json", matched, {"selection": {**selection, **random_rule}}),
            ("neurons.json", neurons, {"selection": selection, "counts_per_layer": counts,
                                       "direction_disagrees_with_mean_sign": disagree})):
        entries = [{"layer": l, "index": i, "score": float(scores[l, i]),
                    "direction": int(directions[l, i]), "act_mean": float(mean[l, i]),
                    "act_std": float(std[l, i])} for l, i, *_ in chosen]
        write(out / name, {"model": args.model, "num_layers": num_layers,
                           "intermediate_size": width, **extra,
                           "scoring_seconds": round(seconds, 2), "neurons": entries})
    print(f"scored {len(rows) + len(control)} samples in {seconds:.1f}s; neurons per layer: "
          f"{counts}; wrote {out / 'neurons.json'} and its random control")


def cmd_ablate(args):
    """ablate: does scaling the neurons (0: ablating them) raise the gold NLL more than scaling
    random, matched ones? With --control, also on non-math text (its last rows)."""
    if args.random_seeds < 2:
        raise UserError(f"--random-seeds {args.random_seeds}: the controls' std needs at least 2")
    control = load_gsm8k(args.control, "train", False)[-args.num_samples:] if args.control else []
    out, device, rows, model, tokenizer = start_command(args, args.split, args.num_samples)
    neurons = load_neurons(args.neurons, model)
    texts = {text: solution_batches(tokenizer, r, args, device, args.nll_batch_size)
             for text, r in (("math", rows), ("control", control)) if r}
    mean_abs = activation_moments(model, texts["math"])[2]  # per neuron, for the matched control
    seeds = range(args.seed, args.seed + args.random_seeds)
    controls = {name: [random_neurons(neurons, mean_abs, torch.Generator().manual_seed(s), bins)
                       for s in seeds] for name, bins in (("matched", 10), ("unmatched", 1))}

    def mean_abs_of(selection):
        return float(sum(mean_abs[n[0], n[1]] for n in selection)) / len(selection)

    def scaled(selection):  # the gold NLL of each text with the selection scaled
        with ablate_neurons(model, selection, args.scale):
            return {text: gold_nll(model, batches) for text, batches in texts.items()}
    base, ablated = scaled([]), scaled(neurons)
    random = {name: [scaled(c) for c in tqdm(sets, desc=f"ablate random {name}", unit="set")]
              for name, sets in controls.items()}
    selected = mean_abs_of(neurons)  # 0 if they never fire: then the controls' ratio is None
    result = {"neurons": args.neurons, "data": args.data, "split": args.split,
              "num_samples": len(rows), "num_neurons": len(neurons), "scale": args.scale,
              "random_seeds": args.random_seeds}
    for text in texts:  # math's fields go in result, the control text's in result["control"]
        part = result
        if text == "control":
            part = result["control"] = {"data": args.control, "num_samples": len(control),
                                        "rows": [r["index"] for r in control]}
        part.update(nll_base=base[text], nll_ablated=ablated[text], rise=ablated[text] - base[text])
        print(f"{text} NLL per solution token: base {base[text]:.4f}, neurons x {args.scale:g} "
              f"{ablated[text]:.4f} (rise {part['rise']:+.4f})")
        for name, sets in controls.items():
            c = compare_with_random(base[text], ablated[text], [nll[text] for nll in random[name]])
            ratio = sum(map(mean_abs_of, sets)) / len(sets) / selected if selected else None
            part["random_" + name] = {**c, "mean_abs_ratio": ratio}
            print(f"  random {name:9s} {c['mean']:.4f} +- {c['std']:.4f} (rise {c['rise']:+.4f}, "
                  f"mean |a| x {'?' if ratio is None else f'{ratio:.2f}'}), "
                  f"z {c['z'] and round(c['z'], 2)}, " + (c["note"] or f"ratio {c['ratio']:.2f}"))
    write(out / "ablation.json", result)
    print(f"wrote {out / 'ablation.json'}")


# --- Preference pairs: sampled and graded, or held-out from an eval's wrong answers ---------------
def make_pairs(rows, samples, system=None):
    """TRL-format pairs and counts from graded samples (samples[q]: rows[q]'s completions): chosen =
    a right one, else the gold solution (chosen_is_gold); rejected = a wrong one, or no pair."""
    pairs, counts = [], collections.Counter(questions=len(rows))
    for q, (row, texts) in enumerate(zip(rows, samples)):
        right = [t for t in texts if is_correct(t, row["gold"])]
        wrong = [t for t in texts if t not in right]
        counts.update(samples=len(texts), correct_samples=len(right), all_correct_skipped=not wrong,
                      chosen_is_gold=bool(wrong and not right))
        if wrong:
            chosen = right[0] if right else gold_solution(row["answer"])
            pairs.append({"prompt": make_prompt(row["question"], system),
                          "chosen": make_completion(chosen), "rejected": make_completion(wrong[0]),
                          "question_index": q, "chosen_is_gold": not right})
    return pairs, dict(counts, pairs=len(pairs))


def load_pairs(path):
    """Rows of a pairs JSONL in TRL's conversational format: prompt, chosen, rejected messages."""
    if not Path(path).is_file():
        raise UserError(f"pairs file missing: {path}; make one with `python yfpo.py pairs`")
    rows = read_jsonl(path, numbered=True)
    if not rows:
        raise UserError(f"{path} holds no pairs; write a row of prompt, chosen, rejected per pair")
    for lineno, row in rows:  # an empty prompt would leave no position to predict the first token
        for field in ("prompt", "chosen", "rejected"):
            messages = row.get(field) if isinstance(row, dict) else None
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)):
                raise UserError(f"{path}:{lineno}: '{field}' is missing, empty or not a list of "
                                "role/content messages; fix the row")
    return [row for _, row in rows]


def cmd_pairs(args):
    """pairs: sample the model on the start of GSM8K train, grade with is_correct, pair a right and
    a wrong answer. With --from-eval: held-out pairs from an eval's wrong answers."""
    if args.from_eval:
        summary = Path(args.from_eval).with_name("summary.json")
        if not (Path(args.from_eval).is_file() and summary.is_file()):
            raise UserError(f"--from-eval {args.from_eval}: no eval.jsonl with its summary.json "
                            "there; run `python yfpo.py eval` first")
        split, out = json.loads(summary.read_text())["split"], check_out_dir(args.out)
        rows = load_gsm8k(args.data, split)
        answers = [[] for _ in rows]  # the eval's answer to each question; none: no pair
        for e in read_jsonl(args.from_eval):
            if not 0 <= e["index"] < len(rows) or rows[e["index"]]["question"] != e["question"]:
                raise UserError(f"eval row {e['index']} is not question {e['index']} of the data; "
                                "pass the --data the eval ran on")
            answers[e["index"]] = [e["completion"]]
        pairs = make_pairs(rows, answers, args.system)[0]  # wrong ones against gold
        print(f"{len(pairs)} held-out pairs from the wrong answers of {args.from_eval} ({split})")
    else:
        out, device, rows, model, tokenizer = start_command(args, "train", args.num_questions)
        samples, seconds, speed = sample_completions(model, tokenizer, rows, args, "pairs",
                                                     args.temperature, args.samples_per_question)
        texts = batches_of([s["text"] for s in samples], args.samples_per_question)
        pairs, counts = make_pairs(rows, texts, args.system)
        print(" ".join(f"{k}={v}" for k, v in counts.items()), f"in {speed['wall_time_s']}s",
              f"({len(samples) / seconds:.3f} samples/s, {speed['tokens_per_s']} tokens/s); "
              f"stops {speed['stops']}")
    write(out / "pairs.jsonl", pairs)
    print(f"wrote {out / 'pairs.jsonl'}")


# --- Losses: DPO, the neuron score and margin, YFPO -----------------------------------------------
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO loss (Rafailov et al., 2023, "Direct Preference Optimization") of [B] log-probs:
        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L = -log sigmoid(beta * h)
    Returns losses, chosen and rejected rewards beta * log(pi/pi_ref) (detached), all [B]."""
    chosen_logratio, rejected_logratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def neuron_scores(activations, mask, mean, std, direction):
    """The YFPO neuron score s(x, y) (arXiv 2605.11906): how strongly each completion fires the math
    neurons. activations: [B, T, K] of the K selected neurons; mask: [B, T], 1 at the completion's
    own tokens; mean, std, direction d (+1 or -1: the way a neuron raises the logits): [K], saved.
        z_k = d_k * (a_k - mean_k) / std_k   ("more than usual, the helpful way" is positive)
        s   = mean over masked t and over k of z   ([B] float32)"""
    z = (activations.float() - mean) / std.clamp_min(1e-6) * direction
    return (z.mean(-1) * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def yfpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, neuron_margin=None,
              beta=0.1, lam=0.3, gamma=1.0, yoke="loss"):
    """The YFPO loss (arXiv 2605.11906): DPO (h as in dpo_loss) yoked to the neuron margin [B]
    m = s(x, y_w) - s(x, y_l) (--neuron-margin policy) or m - m_ref, anchored as h is (relative).
        yoke "loss":    L = -log sigmoid(beta * h) + lam * (-log sigmoid(gamma * m))
        yoke "reward":  L = -log sigmoid(beta * h + lam * gamma * m)
    lam: the neuron term's whole weight (train's lam * c); 0 gives DPO itself (margin may be None).
    Returns (losses, dpo_losses, neuron_losses or None, chosen_rewards, rejected_rewards) [B]."""
    dpo_losses, *rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    neuron_losses = None if neuron_margin is None else -F.logsigmoid(gamma * neuron_margin)
    if lam == 0:
        losses = dpo_losses
    elif yoke == "loss":
        losses = dpo_losses + lam * neuron_losses
    else:  # "reward"
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        losses = -F.logsigmoid(beta * h + lam * gamma * neuron_margin)
    return losses, dpo_losses, neuron_losses, *rewards


class NeuronCapture(contextlib.ExitStack):
    """Forward pre-hooks that keep the selected neurons' activations (the down_proj inputs). Inside
    `with NeuronCapture(model, neurons) as capture:` (neurons: load_neurons' tuples) each forward
    makes capture.activations() [B, T, K], in the order given and still attached to the graph, and
    capture.scores(masks [B, T, S]) the neuron scores [B, S] (packed pairs: chosen, rejected). Keep
    it open through backward: gradient checkpointing runs the hooks again there."""

    def __init__(self, model, neurons):
        super().__init__()  # it holds the hooks: leaving the `with` removes them
        self.layers, self.captured = decoder_layers(model), {}
        self.stats = torch.tensor([n[3:] for n in neurons], dtype=torch.float32).T  # mean, std, d
        layers = sorted({n[0] for n in neurons})
        self.index = {l: torch.tensor([n[1] for n in neurons if n[0] == l]) for l in layers}
        # Hooks fill the columns layer by layer; this permutation restores the order given.
        self.order = torch.tensor([n[0] for n in neurons]).argsort(stable=True).argsort()

    def __enter__(self):
        for layer, index in self.index.items():
            def pre_hook(module, args, layer=layer, index=index):
                self.captured[layer] = args[0][..., index.to(args[0].device)]
            down_proj = self.layers[layer].mlp.down_proj
            self.enter_context(down_proj.register_forward_pre_hook(pre_hook))
        self.callback(self.captured.clear)
        return self

    def activations(self):
        acts = torch.cat([self.captured[layer] for layer in self.index], dim=-1)
        return acts[..., self.order.to(acts.device)]

    def scores(self, masks):
        acts = self.activations()
        stats = self.stats.to(acts.device)
        return torch.stack([neuron_scores(acts, m, *stats) for m in masks.unbind(-1)], dim=-1)


# --- Training: packed pairs, the reference pass, lambda as a share, the loop ----------------------
# Logged per optimizer step (TRL's names first), averaged over the step's pairs on all ranks.
PAIR_METRICS = ("loss", "loss/dpo", "loss/neuron", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "neuron/chosen", "neuron/rejected", "neuron/margin", "neuron/margin_gain")


def tokenize_pairs(tokenizer, rows, max_length):
    """[(prompt_ids, chosen_ids, rejected_ids)]; pairs whose prompt fills max_length are dropped."""
    pairs = [(*tokenize_example(tokenizer, r["prompt"], r["chosen"], max_length),
              tokenize_example(tokenizer, r["prompt"], r["rejected"], max_length)[1]) for r in rows]
    return [(p, c, r) for p, c, r in pairs if c and r]


def collate_pairs(pairs, pad_id):
    """B preference pairs, one per row: [prompt | chosen | rejected | padding], the prompt computed
    once (TRL: once per completion). Rejected tokens see the prompt and earlier rejected tokens, at
    positions continuing the prompt's: each completion sees its own context. Returns input_ids,
    position_ids [B, T]; attention_mask [B, T, T] (True: query t may see key s); labels, loss_mask
    [B, T, 2] for (chosen, rejected): t predicts labels[b, t, j] where loss_mask[b, t, j] = 1, the
    last prompt position both first tokens; neuron_mask [B, T, 2]: each completion's own tokens."""
    size = (len(pairs), max(len(p) + len(c) + len(r) for p, c, r in pairs))
    input_ids, position_ids = torch.full(size, pad_id, dtype=torch.long), torch.zeros(size).long()
    segment = torch.full(size, -1)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    labels, loss_mask = torch.zeros(*size, 2, dtype=torch.long), torch.zeros(*size, 2)
    for b, (p, c, r) in enumerate(pairs):
        P, C, R = len(p), len(c), len(r)
        input_ids[b, :P + C + R] = torch.tensor(p + c + r)
        position_ids[b, :P + C + R] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        segment[b, :P], segment[b, P:P + C], segment[b, P + C:P + C + R] = 0, 1, 2
        chosen_at = torch.arange(P - 1, P + C - 1)
        rejected_at = torch.cat([torch.tensor([P - 1]), torch.arange(P + C, P + C + R - 1)])
        labels[b, chosen_at, 0], labels[b, rejected_at, 1] = torch.tensor(c), torch.tensor(r)
        loss_mask[b, chosen_at, 0], loss_mask[b, rejected_at, 1] = 1, 1
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(size[1], size[1], dtype=torch.bool).tril()
    # Every position sees itself, so padding rows are never all-masked (that would make NaNs).
    attention = (causal & ((key == query) | (key == 0)) & (key >= 0)) | torch.eye(size[1]).bool()
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention,
            "labels": labels, "loss_mask": loss_mask,
            "neuron_mask": torch.stack([segment == 1, segment == 2], dim=-1).float()}


def pair_forward(job, net, indices):
    """One forward of pairs[indices], packed: log-probs and neuron scores (or None), [b, 2]."""
    batch = to_device(collate_pairs([job.pairs[i] for i in indices], job.tokenizer.pad_token_id),
                      job.device)
    with job.autocast:
        logps = forward_logps(net, batch)
        return logps, None if job.capture is None else job.capture.scores(batch["neuron_mask"])


def train_setup(args):
    """Everything the training loop reads, checked before any long work: the run as a namespace."""
    job = types.SimpleNamespace(args=args, out=check_out_dir(args.out))
    job.rank, job.world = rank_and_world()  # torchrun: each rank takes every world-th micro-batch
    job.master, job.ddp = job.rank == 0, job.world > 1
    job.device, dtype = pick_device(args.device, args.dtype)
    if job.device.type == "cuda":  # this rank's GPU under torchrun
        job.device = torch.device("cuda", torch.cuda.current_device())
    if dtype == torch.float16:
        raise UserError("train takes --dtype float32 or bfloat16 (float16 needs loss scaling)")
    job.autocast = torch.autocast(job.device.type, dtype=dtype, enabled=dtype != torch.float32)
    pairs_path = args.pairs or job.out / "pairs.jsonl"
    rows = load_pairs(pairs_path)  # the pairs first: without them nothing matters
    if not args.neurons and (job.out / "neurons.json").is_file():
        args.neurons = str(job.out / "neurons.json")
    if args.lam != 0 and not args.neurons:
        raise UserError(f"--lam {args.lam} needs --neurons (from identify); --lam 0 is plain DPO")
    job.checkpoint, job.cache = job.out / "model", job.out / "reference.pt"
    resumable = (job.checkpoint / "trainer_state.pt").is_file() and job.cache.is_file()
    if args.resume and not resumable:
        raise UserError(f"--resume: no checkpoint ({job.checkpoint}, {job.cache}); drop --resume")
    torch.manual_seed(args.seed)
    job.model, job.tokenizer = load_model(str(job.checkpoint) if args.resume else args.model,
                                          job.device, torch.float32)
    if (attention := job.model.config._attn_implementation) not in ("eager", "sdpa"):
        raise UserError(f"{attention} attention cannot take packed pairs; use eager or sdpa")
    job.neurons = load_neurons(args.neurons, job.model) if args.neurons else []
    saved = json.loads(Path(args.neurons).read_text()).get("selection", {}) if job.neurons else {}
    asked = {r.get("question_index") for r in rows}
    shared = sorted(asked.intersection(saved.get("question_indices", [])))
    if shared and not args.allow_overlap:  # on its selection questions, m measures the fit
        raise UserError(f"{pairs_path} uses {len(shared)} questions (first: {shared[0]}) that "
                        f"{args.neurons} was selected on; pair others or pass --allow-overlap")
    job.pairs = tokenize_pairs(job.tokenizer, rows, args.max_length)
    if not job.pairs:
        raise UserError(f"every pair was truncated away (--max-length {args.max_length}); raise it")
    if args.gamma == "auto" and job.neurons and args.lam and len(job.pairs) < 2:
        raise UserError("--gamma auto (1 / std of reference margins) needs 2 pairs; pass --gamma 1")
    job.pairs_per_step = args.batch_size * args.grad_accum * job.world
    job.steps_per_epoch = len(job.pairs) // job.pairs_per_step
    if job.steps_per_epoch == 0:
        raise UserError(f"{len(job.pairs)} pairs are fewer than one step's {job.pairs_per_step} "
                        "(batch x accum x processes); lower --batch-size or --grad-accum")
    job.total_steps = min(args.epochs * job.steps_per_epoch, args.max_steps or math.inf)
    job.orders = [torch.randperm(len(job.pairs), generator=torch.Generator().manual_seed(seed))
                  for seed in range(args.seed, args.seed + args.epochs)]  # each epoch's order
    # What a checkpoint must share with the run that resumes it: data order, reference and loss.
    run = [job.pairs, job.neurons, job.pairs_per_step, args.seed, args.lam, args.beta, args.gamma,
           args.yoke, args.neuron_margin, args.balance, args.calibration_pairs]
    job.run_id = hashlib.sha256(json.dumps(run).encode()).hexdigest()
    return job


def pair_losses(job, net, indices, weight, path=None):
    """(log-probs [b, 2], neuron scores [b, 2] or None, yfpo_loss(...)) of pairs[indices] through
    net, the neuron term weighted lam * c; path "dpo" or "neuron": the gradient through it alone."""
    logps, scores = pair_forward(job, net, indices)
    margin = None if scores is None else scores[:, 0] - scores[:, 1]
    if margin is not None and job.args.neuron_margin == "relative":  # m - m_ref, as h anchors logps
        margin = margin - job.ref_margins[indices]
    if path == "dpo":
        margin = margin.detach()
    elif path == "neuron":
        logps = logps.detach()
    ref = job.ref_logps[indices]  # columns: chosen, rejected
    return logps, scores, yfpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], margin,
                                    beta=job.args.beta, lam=weight, gamma=job.gamma,
                                    yoke=job.args.yoke)


def term_gradients(params, loss_of, chunks):
    """How each term of the loss pulls, without touching .grad. loss_of(indices, path): the loss of
    pairs `indices`, its gradient through "dpo" (the log-probs) or "neuron" (the neuron scores)
    alone; chunks: micro-batches of indices. Returns grad_norm/dpo, grad_norm/neuron, neuron/share =
    ||g_neuron|| / ||g_dpo||, grad_cosine = cos(g_dpo, g_neuron) (parallel: it re-weights DPO)."""
    grads = {}
    for path in ("dpo", "neuron"):
        grads[path] = [torch.zeros_like(p) for p in params]
        for indices in chunks:
            pulls = torch.autograd.grad(loss_of(indices, path), params, materialize_grads=True)
            for g, d in zip(grads[path], pulls):  # zeros where a parameter does not pull
                g += d

    def dot(x, y):
        return sum(float((a.double() * b).sum()) for a, b in zip(grads[x], grads[y]))
    dpo, neuron = math.sqrt(dot("dpo", "dpo")), math.sqrt(dot("neuron", "neuron"))
    return {"grad_norm/dpo": dpo, "grad_norm/neuron": neuron,
            "neuron/share": neuron / (dpo or math.nan),
            "grad_cosine": dot("dpo", "neuron") / (dpo * neuron or math.nan)}


def measure_terms(job, chunk, weight):
    """term_gradients on the pairs `chunk` (rank 0's model), normalized as a step's loss is."""
    def loss_of(indices, path):
        return pair_losses(job, job.model, indices, weight, path)[2][0].sum() / len(chunk)
    params = [p for p in job.model.parameters() if p.requires_grad]
    return term_gradients(params, loss_of, batches_of(chunk, job.args.batch_size))


def calibrate(lam, share_at, linear):
    """The constant c that makes lam a share (--balance share): with the neuron term weighted lam *
    c, its gradient at step 1 is |lam| times the DPO term's, c = ||grad L_dpo|| / ||grad L_neuron||
    on the reference model (the policy before step 1); share_at(weight) measures that share. Linear
    in c (--yoke loss; at step 1 also the relative margin, m - m_ref = 0), one measurement is exact;
    --yoke reward with the policy margin moves the sigmoid with c: repeated to 1e-4."""
    c = 1.0
    for _ in range(1 if linear else 8):
        share = share_at(lam * c)
        if not share > 0:
            raise UserError("no neuron-term gradient: check --neurons or pass --balance none")
        if abs(share / abs(lam) - 1) < 1e-4:
            break
        c *= abs(lam) / share
    return c


def reference_pass(job):
    """Before step 1, on rank 0: the reference log-probs and neuron scores of every pair (no second
    model in memory), gamma and the calibration c; OUT/reference.pt, read by all ranks, --resume."""
    args = job.args
    if job.master and not args.resume:  # (load_model returns the model in eval mode)
        chunks = batches_of(range(len(job.pairs)), args.batch_size)
        with torch.no_grad():
            ref = [pair_forward(job, job.model, chunk)
                   for chunk in tqdm(chunks, desc="reference", unit="batch")]
        job.ref_logps = torch.cat([lp for lp, _ in ref])
        neuron = torch.cat([lp * 0 if s is None else s for lp, s in ref])
        job.ref_margins, job.gamma, job.c = neuron[:, 0] - neuron[:, 1], args.gamma, 1.0
        if args.gamma == "auto":  # gamma * m of order 1, as beta * h is (1 where m does not vary)
            spread = job.ref_margins.std().item() if job.neurons else 0.0
            job.gamma = 1 / spread if spread > 0 else 1.0
        if job.neurons and args.lam and args.balance == "share":
            job.model.train()
            chunk = job.orders[0][:args.calibration_pairs]
            job.c = calibrate(args.lam, lambda w: measure_terms(job, chunk, w)["neuron/share"],
                              linear=args.yoke == "loss" or args.neuron_margin == "relative")
        job.out.mkdir(parents=True, exist_ok=True)
        torch.save({"logps": job.ref_logps.cpu(), "neuron": neuron.cpu(), "gamma": job.gamma,
                    "c": job.c}, job.cache)
    if job.ddp:
        dist.barrier()
    ref = torch.load(job.cache, map_location=job.device)
    job.ref_logps, job.gamma, job.c = ref["logps"], ref["gamma"], ref["c"]
    job.ref_margins = ref["neuron"][:, 0] - ref["neuron"][:, 1]
    if job.master and job.neurons:
        print(f"gamma {job.gamma:.4g} (--gamma {args.gamma}), lam x c = {args.lam:g} x {job.c:.4g}")


def disable_dropout(model):
    """No dropout, as TRL's disable_dropout: policy and reference are one network."""
    for module in model.modules():  # nn.Dropout's p, and rates such as attention_dropout
        for name, value in list(vars(module).items()):
            is_p = name == "p" and isinstance(module, torch.nn.Dropout)
            if isinstance(value, float) and ("dropout" in name or is_p):
                setattr(module, name, 0.0)


def peak_flops(device):
    """Peak bf16 dense FLOP/s of common GPUs, for MFU; None elsewhere (a CPU has no such figure)."""
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12,
             "A10": 125e12, "L4": 121e12}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in peaks.items() if k in name), None)


def save_checkpoint(job, optimizer, scheduler, step):
    """OUT/model: save_pretrained weights and tokenizer plus trainer_state.pt, swapped in whole."""
    tmp, old = job.out / "model.tmp", job.out / "model.old"
    shutil.rmtree(tmp, ignore_errors=True)
    job.model.save_pretrained(tmp)
    job.tokenizer.save_pretrained(tmp)
    torch.save({"run": job.run_id, "c": job.c, "step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
    if job.checkpoint.exists():
        os.replace(job.checkpoint, old)
    os.replace(tmp, job.checkpoint)
    shutil.rmtree(old, ignore_errors=True)


def optimizer_and_schedule(job):
    """(optimizer, scheduler, first step): AdamW and a linear warmup to 1 then a cosine decay to 0,
    restored with --resume; the metrics log started, or cut back to the checkpoint's step."""
    args = job.args
    optimizer = torch.optim.AdamW(job.model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = math.ceil(args.warmup_ratio * job.total_steps)

    def lr_factor(step):  # the learning rate's factor at optimizer step `step` (from 0)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, job.total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    state = {"step": 0}
    if args.resume:
        state = torch.load(job.checkpoint / "trainer_state.pt", "cpu", weights_only=False)
        if state["run"] != job.run_id:
            raise UserError(f"--resume: {job.checkpoint} was trained with other pairs, neurons, "
                            "seed, batch x accum x processes or loss; use those or a new --out")
        optimizer.load_state_dict(state["optimizer"])  # no RNG state: without dropout none draws
        scheduler.load_state_dict(state["scheduler"])
    if job.master:  # a new log, or the old one without the steps after the checkpoint (redone)
        kept = read_jsonl(job.out / "metrics.jsonl") if args.resume else []
        write(job.out / "metrics.jsonl", [m for m in kept if m["step"] <= state["step"]])
    return optimizer, scheduler, state["step"]


def accumulate(job, model, chunk, weight):
    """Forward and backward of this rank's micro-batches of `chunk`; PAIR_METRICS' all-rank sums."""
    args, sums = job.args, torch.zeros(len(PAIR_METRICS), device=job.device)
    for micro in range(args.grad_accum):  # this rank's: the same pairs for any world size
        indices = batches_of(chunk, args.batch_size)[micro * job.world + job.rank]
        sync = not job.ddp or micro == args.grad_accum - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            logps, scores, terms = pair_losses(job, model, indices, weight)
            # Sum / pairs per rank per step (batch 1 x accum 4 == batch 4 x accum 1); DDP: rank mean
            (terms[0].sum() / (args.batch_size * args.grad_accum)).backward()
        losses, dpo_losses, neuron_losses, chosen, rejected = terms
        if scores is None:  # the neuron metrics are 0 without neurons
            scores, neuron_losses = logps * 0, losses * 0
        m = scores[:, 0] - scores[:, 1]  # the neuron margin
        values = [losses, dpo_losses, neuron_losses, chosen, rejected, chosen > rejected,
                  chosen - rejected, *logps.T, *scores.T, m, m - job.ref_margins[indices]]
        sums += torch.stack([v.detach().float().sum() for v in values])  # PAIR_METRICS, in order
    if job.ddp:
        dist.all_reduce(sums)
    return sums


def train_loop(job):
    """The optimizer steps from the reference (or a checkpoint, --resume) to total_steps."""
    args, weight = job.args, job.args.lam * job.c  # weight: the neuron term's whole weight
    optimizer, scheduler, job.start_step = optimizer_and_schedule(job)
    model = job.model.train()
    if job.ddp:  # device_ids None: the model is on this rank's one device
        model = torch.nn.parallel.DistributedDataParallel(model)
    num_params = sum(p.numel() for p in job.model.parameters())  # job.model: never DDP-wrapped
    peak = peak_flops(job.device) if job.master else None
    # The steps whose terms' gradients are measured: every --probe-every-th, or first, middle; last
    every, total = args.probe_every, job.total_steps
    probes = set(range(0, total, every) if every else (0, total // 2)) | {total - 1}
    last_saved = job.start_step
    with tqdm(range(job.start_step, total), initial=job.start_step, total=total, desc="train",
              unit="step", disable=not job.master) as bar:  # closed before an error is printed
        for step in bar:
            epoch, nth = divmod(step, job.steps_per_epoch)
            chunk = job.orders[epoch][nth * job.pairs_per_step:(nth + 1) * job.pairs_per_step]
            probe = {}  # the gradient each term contributes, before this step's update
            if job.master and job.neurons and args.lam and step in probes:
                probe = measure_terms(job, chunk, weight)
                bar.write(f"step {step + 1}: " + " ".join(f"{k}={v:.4g}" for k, v in probe.items()))
            t0, learning_rate = time.perf_counter(), scheduler.get_last_lr()[0]
            sums = accumulate(job, model, chunk, weight)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not (torch.isfinite(sums[0]) and torch.isfinite(grad_norm)):
                raise UserError(f"non-finite loss or gradient at step {step + 1}; stopped. The "
                                f"last good checkpoint is {job.checkpoint} (step {last_saved}); "
                                "lower --lr or inspect this step's pairs")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            if job.master:
                tokens = sum(len(ids) for i in chunk for ids in job.pairs[i])  # all ranks' pairs
                row = {"step": step + 1, "epoch": epoch,
                       **dict(zip(PAIR_METRICS, (sums / job.pairs_per_step).tolist())),
                       "grad_norm": grad_norm.item(), **probe, "gamma": job.gamma, "c": job.c,
                       "learning_rate": learning_rate, "step_time_s": seconds,
                       "tokens_per_s": tokens / seconds,
                       # MFU: 6 N FLOPs per trained token (forward + backward), over all peaks
                       "mfu": peak and 6 * num_params * tokens / seconds / (peak * job.world)}
                with open(job.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                                neuron_margin=f"{row['neuron/margin']:.3f}")
            if step + 1 == total or args.save_every and (step + 1) % args.save_every == 0:
                if job.master:
                    save_checkpoint(job, optimizer, scheduler, step + 1)
                last_saved = step + 1


def cmd_train(args):
    """train: DPO + lam * c * neuron-margin loss; one flat loop, DDP when launched by torchrun."""
    job = train_setup(args)
    disable_dropout(job.model)
    if args.gradient_checkpointing:  # non-reentrant: hooked activations keep their gradients
        job.model.gradient_checkpointing_enable({"use_reentrant": False})
    capture = NeuronCapture(job.model, job.neurons) if job.neurons else contextlib.nullcontext()
    with capture as job.capture:  # None without neurons; it stays on: checkpointing re-runs it
        reference_pass(job)
        train_loop(job)
    if job.master:
        print(f"trained {job.total_steps - job.start_step} steps ({len(job.pairs)} pairs, "
              f"{job.pairs_per_step} per step); wrote metrics.jsonl and model/ in {job.out}")


# --- Eval and score: greedy accuracy, and teacher-forced endpoints of pairs -----------------------
def cmd_eval(args):
    """eval: GSM8K exact match with batched greedy decoding."""
    out, device, rows, model, tokenizer = start_command(args, args.split, args.limit)
    summary, results = evaluate(model, tokenizer, rows, args)
    summary.update(model=args.model, data=args.data, split=args.split, limit=args.limit,
                   seed=args.seed)
    write(out / "eval.jsonl", results)
    write(out / "summary.json", summary)
    print("accuracy {accuracy:.4f} ({correct}/{total}), 95% CI [{ci_low:.4f}, {ci_high:.4f}], "
          "{questions_per_s} questions/s".format(**summary))
    print(f"wrote {out / 'eval.jsonl'} and {out / 'summary.json'}")


def cmd_score(args):
    """score: per pair (held-out ones from `pairs --from-eval`) the log-probs of chosen and
    rejected, the chosen token count, and both neuron scores of every --neurons set: one forward."""
    out, (device, dtype) = check_out_dir(args.out), pick_device(args.device, args.dtype)
    rows = load_pairs(args.pairs)
    model, tokenizer = load_model(args.model, device, dtype)
    kept = [(row, p) for row in rows for p in tokenize_pairs(tokenizer, [row], args.max_length)]
    results = []
    with torch.no_grad(), contextlib.ExitStack() as hooks:
        captures = {Path(f).stem: hooks.enter_context(NeuronCapture(model, load_neurons(f, model)))
                    for f in args.neurons}
        for chunk in tqdm(batches_of(kept, args.batch_size), desc="score", unit="batch"):
            batch = to_device(collate_pairs([p for _, p in chunk], tokenizer.pad_token_id), device)
            logps = forward_logps(model, batch).tolist()
            scores = {name: c.scores(batch["neuron_mask"]).tolist() for name, c in captures.items()}
            results += [{"question_index": row.get("question_index"), "logps": logps[b],
                         "chosen_tokens": len(c), "neurons": {n: s[b] for n, s in scores.items()}}
                        for b, (row, (_, c, _)) in enumerate(chunk)]
    write(out / "scores.jsonl", results)
    print(f"scored {len(results)} of {len(rows)} pairs; wrote {out / 'scores.jsonl'}")


# --- Reproduce: the paper's experiment in one restartable command, its report and figure ----------
def reproduce_stages(args, out):
    """The experiment as [(stage, argv, the stages it reads)]; stage S writes OUT/S. Its runs, for
    every seed: DPO, YFPO, and YFPO on the matched random neurons (its own c: the same dose)."""
    def flags(*names, **values):  # --name value for args.name of every name, and every value given
        values = {**{name: getattr(args, name) for name in names}, **values}
        return [x for k, v in values.items() if v is not None
                for x in ("--" + k.replace("_", "-"), str(v))]
    common = flags("model", "data", "seed", "device", "dtype", "system")
    generation = common + flags("batch_size", "max_new_tokens")  # then a stage's own, which win
    sets = {stem: str(out / "identify" / f"{stem}.json") for stem in ("neurons", "random_neurons")}
    identify = flags("num_samples", "top_k", "max_length", "control")
    ablate = flags(neurons=sets["neurons"], num_samples=args.ablate_samples)
    ablate += flags("max_length", "random_seeds", "control")
    sample = flags("num_questions", "temperature", "samples_per_question")
    train = flags("lr", "beta", "gamma", "yoke", "neuron_margin", "balance", "calibration_pairs",
                  "epochs", "grad_accum", batch_size=args.train_batch_size)
    train += flags("max_length", "save_every")
    stages = [("identify", ["identify", *common, *identify], []),
              ("ablate", ["ablate", *common, *ablate], ["identify"]),
              ("pairs", ["pairs", *generation, *sample], [])]
    arms = (("dpo", 0.0, "neurons"), ("yfpo", args.lam, "neurons"),
            ("yfpo_random", args.lam, "random_neurons"))
    runs = []  # (run, its train command line)
    for seed in range(args.seed, args.seed + args.seeds):
        for arm, lam, stem in arms:
            own = flags(seed=seed, pairs=out / "pairs" / "pairs.jsonl", neurons=sets[stem], lam=lam)
            runs.append((arm + (f"_seed{seed}" if args.seeds > 1 else ""), [*common, *own, *train]))
    evaluate = flags(limit=args.eval_limit)  # then a trained model's --model: the last one wins
    score = flags(pairs=out / "heldout" / "pairs.jsonl", max_length=args.max_length)
    base_eval = out / "eval_base" / "eval.jsonl"  # held-out pairs: its wrong answers against gold
    stages += [("eval_base", ["eval", *generation, *evaluate], []),
               ("heldout", ["pairs", *common, "--from-eval", str(base_eval)], ["eval_base"]),
               ("score_base", ["score", *common, *score, "--neurons", *sets.values()],
                ["identify", "heldout"])]
    for run, train_argv in runs:  # each trained, evaluated, scored in turn: a cut run keeps arms
        model = flags(model=out / f"train_{run}" / "model")
        stages += [(f"train_{run}", ["train", *train_argv], ["identify", "pairs"]),
                   (f"eval_{run}", ["eval", *generation, *evaluate, *model], [f"train_{run}"]),
                   (f"score_{run}", ["score", *common, *score, *model, "--neurons", *sets.values()],
                    ["identify", "heldout", f"train_{run}"])]
    return stages


def write_report(out, args, seconds):
    """OUT/report.md: accuracies, paired tests, training, held-out endpoints, ablation, times."""
    def table(*columns):  # a Markdown table's header and rule, after a blank line
        return ["", "| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]

    def cell(values):  # mean [paired bootstrap 95% CI]
        return "{:.4f} [{:.4f}, {:.4f}]".format(values.mean(), *bootstrap_ci(values, args.seed))

    def tensors(rows):  # float64 over pairs: logps, tokens and each neuron set's scores
        rows = [{"logps": r["logps"], "tokens": r["chosen_tokens"], **r["neurons"]} for r in rows]
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}
    evals = {s[5:]: json.loads((out / s / "summary.json").read_text())
             for s in seconds if s.startswith("eval_")}
    dpo_of = {run: "dpo" + run[len(run.split("_seed")[0]):]  # lam 0: every run is DPO
              for run in evals if run != "base" and args.lam}

    def versus(name, other):  # name's accuracy minus other's on the same questions: McNemar, reach
        if other in (None, name):
            return "—"
        rows = [read_jsonl(out / f"eval_{run}" / "eval.jsonl") for run in (name, other)]
        d = paired_difference([(a["correct"], b["correct"]) for a, b in zip(*rows)])
        a, b = d["only_this_correct"], d["only_other_correct"]
        reach = mcnemar_detectable(a + b, d["shared"])
        reach = "none" if reach is None else f"{reach:.3f}"
        return f"{d['difference']:+.4f} (p {d['mcnemar_p']:.3g}; {a} vs {b}; detectable {reach})"
    settings = ", ".join(f"`{k}={v}`" for k, v in vars(args).items()
                         if k not in ("run", "command", "out"))
    lines = ["# YFPO reproduction", "", "Settings: " + settings, "", "Paired tests: exact McNemar "
             "p; the questions only this / only the other model got right; the smallest difference "
             "detectable at 80% power (alpha 0.05) given that discordance.", *table(
                 "model", "accuracy", "95% CI", "strict", "correct / total", "vs base", "vs DPO")]
    for name, s in evals.items():
        lines.append(f"| {name} | {s['accuracy']:.4f} | [{s['ci_low']:.4f}, {s['ci_high']:.4f}] | "
                     f"{s['accuracy_strict']:.4f} | {s['correct']} / {s['total']} | "
                     f"{versus(name, 'base')} | {versus(name, dpo_of.get(name))} |")
    for name in ("dpo", "yfpo", "yfpo_random") if args.seeds > 1 else ():
        acc = torch.tensor([s["accuracy"] for run, s in evals.items()
                            if run.rsplit("_seed", 1)[0] == name], dtype=torch.float64)
        lines.append(f"\n{name} over {args.seeds} seeds: accuracy {acc.mean():.4f} ± "
                     f"{acc.std():.4f} (std)")
    lines += table("training run", "steps", "c", "share first / middle / last",
                   "cosine first / middle / last", "reward accuracy", "reward margin",
                   "neuron margin", "its gain over the reference", "grad norm DPO first / last",
                   "grad norm neuron first / last")
    for stage in (s for s in seconds if s.startswith("train_")):
        steps = read_jsonl(out / stage / "metrics.jsonl")
        last, probes = steps[-1], [m for m in steps if "neuron/share" in m]
        probes = [probes[i] for i in (0, len(probes) // 2, -1)] if probes else []  # first/mid/last
        dpo = "grad_norm/dpo" if "grad_norm/dpo" in last else "grad_norm"  # lam 0: all is DPO's
        norms = " | ".join(f"{steps[0][k]:.4g} / {last[k]:.4g}" if k in last else "—"
                           for k in (dpo, "grad_norm/neuron"))
        share, cosine = (" / ".join(f"{p[k]:.3g}" for p in probes) or "—"
                         for k in ("neuron/share", "grad_cosine"))
        lines.append(f"| {stage[6:]} | {last['step']} | {last['c']:.4g} | {share} | {cosine} | "
                     f"{last['rewards/accuracies']:.3f} | {last['rewards/margins']:.4f} | "
                     f"{last['neuron/margin']:.4f} | {last['neuron/margin_gain']:+.4f} | {norms} |")
    scores = {s[6:]: read_jsonl(out / s / "scores.jsonl") for s in seconds if s.startswith("score")}
    if scores and scores["base"]:
        lines += ["", f"Held-out endpoints: {len(scores['base'])} test questions the base model "
                  "got wrong, gold solution as chosen, its own answer as rejected, teacher-forced, "
                  "the base model as the reference; mean [paired bootstrap 95% CI] over pairs. The "
                  "neuron-margin columns are the specificity test: the base row is the margin "
                  "itself, the others its gain over base.",
                  *table("model", "reward accuracy", "reward margin h", "gold NLL per token",
                         "neuron margin: selected set", "neuron margin: random set")]
        chosen_minus_rejected = torch.tensor([1.0, -1.0], dtype=torch.float64)
        base = tensors(scores["base"])
        for name, rows in scores.items():  # h: the reward margin (implicit, base the reference)
            t, gain = tensors(rows), name != "base"  # base's row: the margins; the others: gains
            h, selected, random = ((t[k] - base[k] if gain else t[k]) @ chosen_minus_rejected
                                   for k in ("logps", "neurons", "random_neurons"))
            reward = f"{cell((h > 0).double())} | {cell(h)}" if gain else "— | —"
            lines.append(f"| {name} | {reward} | {cell(-t['logps'][:, 0] / t['tokens'])} | "
                         f"{cell(selected)} | {cell(random)} |")
    ab = json.loads((out / "ablate" / "ablation.json").read_text())
    for text, r in [("math", ab), ("control", ab.get("control"))][:1 + ("control" in ab)]:
        m = r["random_matched"]
        lines += ["", f"Ablation on {text} text ({ab['num_neurons']} neurons x {ab['scale']:g}, "
                  f"{r.get('num_samples', ab['num_samples'])} solutions): NLL {r['nll_base']:.4f} "
                  f"-> {r['nll_ablated']:.4f} (rise {r['rise']:+.4f}); matched random neurons: "
                  f"rise {m['rise']:+.4f}, std {m['std']:.4f}, z {m['z'] and round(m['z'], 2)}"]
    lines += [*table("stage", "wall time (s)"), *(f"| {s} | {t} |" for s, t in seconds.items()),
              f"| all | {sum(seconds.values()):.1f} |"]
    write(out / "report.md", "\n".join(lines) + "\n")


def cmd_plot(args):
    """plot: figure 2 of train or reproduce folders: DPO loss, reward margin, neuron margin."""
    dirs = [Path(d) for d in args.dirs]
    prefix = {d: f"{d}/" if len(dirs) > 1 else "" for d in dirs}  # of its runs' labels
    runs = {prefix[d] + p.parent.resolve().name.removeprefix("train_"): read_jsonl(p) for d in dirs
            for p in [d / "metrics.jsonl", *sorted(d.glob("train_*/metrics.jsonl"))] if p.is_file()}
    if not runs or not all(runs.values()):
        raise UserError(f"no training steps in {' '.join(args.dirs)}; pass train/reproduce --out")
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, whatever the display
    fig = Figure(figsize=(7, 8), layout="tight")
    for row, key in enumerate(("loss/dpo", "rewards/margins", "neuron/margin")):
        ax = fig.add_subplot(3, 1, row + 1, xlabel="step" if row == 2 else None, ylabel=key)
        for label, steps in runs.items():
            ax.plot(*zip(*[(m["step"], m[key]) for m in steps]), label=label)
        ax.legend()
    out = Path(args.out or dirs[0] / "training.png")
    fig.savefig(tmp := out.with_name(f"{out.stem}.tmp{out.suffix}"), dpi=120)
    os.replace(tmp, out)
    print(f"wrote {out}")


def cmd_reproduce(args):
    """reproduce: every stage of reproduce_stages, each run as its command line, then the report."""
    out = check_out_dir(args.out)
    inputs = [(args.data, "train", True), (args.data, "test", True), (args.control, "train", False)]
    # Every input is read (and checked) before any stage runs; the first is the train split.
    train_rows = [load_gsm8k(data, split, gold) for data, split, gold in inputs if data][0]
    if args.num_samples + args.num_questions > len(train_rows):
        raise UserError(f"--num-samples {args.num_samples} + --num-questions {args.num_questions} "
                        f"overlap in the {len(train_rows)} train questions; lower one")
    load_model(args.model, None, None, weights=False)  # the model checked too, before any stage
    stages, keys, seconds = reproduce_stages(args, out), {}, {}
    for stale in {p.parent for p in out.glob("*/stage.json")} - {out / s for s, _, _ in stages}:
        shutil.rmtree(stale)  # a stage of other settings (another --seeds): not part of this report
    for stage, argv, reads in stages:
        # Skipped if OUT/stage/stage.json shows it done under this key (its command line, OUT aside,
        # and the keys of what it reads); a training cut short resumes; the rest is redone.
        line = ["OUT" + a[len(str(out)):] if a.startswith(str(out) + os.sep) else a for a in argv]
        stamp_of = json.dumps([line, [keys[r] for r in reads]]).encode()
        key = keys[stage] = hashlib.sha256(stamp_of).hexdigest()[:16]
        stamp_path, stamp = out / stage / "stage.json", {"key": key, "argv": argv}
        old = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
        if old.get("key") == key and "seconds" in old:
            print(f"[reproduce] {stage}: done with these settings, skipped")
            seconds[stage] = old["seconds"]
            continue
        resume = old.get("key") == key and (out / stage / "model" / "trainer_state.pt").is_file()
        if not resume:
            shutil.rmtree(out / stage, ignore_errors=True)
        write(stamp_path, stamp)
        print(f"\n[reproduce] {stage}{' (resuming its checkpoint)' * resume} -> {out / stage}")
        start = time.perf_counter()
        main([*argv, "--out", str(out / stage), *["--resume"] * resume], strict=True)
        seconds[stage] = stamp["seconds"] = round(time.perf_counter() - start, 1)
        write(stamp_path, stamp)
    write_report(out, args, seconds)
    cmd_plot(argparse.Namespace(dirs=[str(out)], out=out / "report.png"))
    print(f"wrote {out / 'report.md'}")


# --- Demo: every stage on a tiny random model, offline; it checks the install, not accuracy -------
# (question, GSM8K-style solution): the calculation, its <<calculator>> mark, "#### result".
DEMO_PROBLEMS = [(question, f"{calc}=<<{calc}={v}>>{v}.\n#### {v:,}") for question, calc, v in [
    ("Tom has 3 apples and buys 5 more. How many apples does he have?", "3+5", 8),
    ("A box holds 12 eggs. How many eggs are in 4 boxes?", "4*12", 48),
    ("Sara reads 15 pages a day. How many pages does she read in a week?", "15*7", 105),
    ("A shirt costs $20 and is 25% off. What does it cost now?", "20-20*0.25", 15),
    ("Ben had 50 marbles and gave away 18. How many are left?", "50-18", 32),
    ("A train travels 60 miles per hour for 3 hours. How far does it go?", "60*3", 180),
    ("Lily splits 36 candies among 4 friends. How many does each get?", "36/4", 9),
    ("A farm has 7 cows and 3 times as many hens. How many animals are there?", "7+7*3", 28),
    ("Max saves $1,200 a month. How much does he save in a year?", "1200*12", 14400),
    ("A 9 meter rope is cut into 3 equal parts. How long is each part?", "9/3", 3),
    ("Anna is 8 years old. Her mother is 4 times as old. How old is her mother?", "8*4", 32),
    ("A class has 14 girls and 16 boys. How many students are there?", "14+16", 30)]]


def build_tiny_model(path, seed=0, model_type="qwen2"):
    """A tiny random LM (2 layers, 128 neurons each) and a ChatML BPE tokenizer of DEMO_PROBLEMS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [*map("\n".join, DEMO_PROBLEMS), INSTRUCTION, "The answer is 0123456789."]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=400,
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"], chat_template=(  # ChatML
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    torch.manual_seed(seed)  # initializer_range 0.2 (above usual): greedy outputs differ by prompt
    AutoModelForCausalLM.from_config(AutoConfig.for_model(  # generation config: eos, pad too
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, head_dim=16,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=2048, initializer_range=0.2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cmd_demo(args):
    """demo: `reproduce` on a tiny random model and a dozen built-in problems, offline."""
    out, start = check_out_dir(args.out), time.perf_counter()
    model, data = str(build_tiny_model(out / "tiny-model", args.seed)), out / "gsm8k"
    write(data / "train.jsonl", [{"question": q, "answer": a} for q, a in DEMO_PROBLEMS[:8]])
    write(data / "test.jsonl", [{"question": q, "answer": a} for q, a in DEMO_PROBLEMS[8:]])
    small = (f"--device cpu --seed {args.seed} --num-samples 3 --top-k 16 --ablate-samples 4 "
             "--random-seeds 2 --lr 1e-4 --num-questions 5 --samples-per-question 2 "
             "--max-new-tokens 16 --train-batch-size 2 --grad-accum 1 --epochs 2 --save-every 2")
    main(["reproduce", "--model", model, "--data", str(data), *small.split(), "--out", str(out)],
         strict=True)
    print(f"[demo] done in {time.perf_counter() - start:.1f}s in {out}; a random model: its "
          "accuracy means nothing.")


# --- Command line ---------------------------------------------------------------------------------
def build_parser():
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit code 2
            self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def positive(kind, word=None):  # an argparse type: above zero, or the word (--gamma's auto)
        def parse(text):
            if text == word:
                return text
            with contextlib.suppress(ValueError):
                if kind(text) > 0:
                    return kind(text)
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got '{text}'")
        return parse

    def group(**flags):
        """A parent parser. A flag is its default, (default, help) or add_argument's keywords; the
        default sets its type (int or None: positive int, float: positive, False: a switch)."""
        parser = argparse.ArgumentParser(add_help=False)
        for flag, spec in flags.items():
            if not isinstance(spec, dict):
                default, text = spec if isinstance(spec, tuple) else (spec, None)
                kind = {str: str, float: positive(float)}.get(type(default), positive(int))
                spec = {"default": default, "help": text,
                        **({"action": "store_true"} if default is False else {"type": kind})}
            parser.add_argument("--" + flag.replace("_", "-"), **spec)
        return parser
    common = group(
        model=(DEFAULT_MODEL, "hub id or local Hugging Face folder"),
        data=(DEFAULT_DATA, "hub dataset, a local .jsonl file, or a folder with SPLIT.jsonl"),
        seed=dict(type=int, default=0), device=("auto", "auto: cuda if available, else cpu"),
        dtype=dict(default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 where the GPU supports it, else float32"),
        out="out", system=dict(help="system prompt (default: none)"))
    generation = group(max_new_tokens=512, batch_size=(64, "sequences decoded at once"))
    loss = group(
        calibration_pairs=(16, "pairs c is measured on"),
        lam=dict(type=float, default=0.3, help="weight of the neuron term; 0 is plain DPO"),
        gamma=dict(type=positive(float, "auto"), default="auto",
                   help="neuron margin scale; auto: 1 / std of the pairs' reference margins"),
        neuron_margin=dict(choices=["policy", "relative"], default="relative",
                           help="relative (default, see the README): m - m_ref; policy: m"),
        beta=dict(type=float, default=0.1, help="DPO temperature"),
        yoke=dict(choices=["loss", "reward"], default="reward",
                  help="reward (default, measured): inside DPO's sigmoid; loss: a second term"),
        balance=dict(choices=["share", "none"], default="share", help="share: the term weighs "
                     "lam * c, c set so that its step-1 gradient is lam x DPO's; none: c = 1"))
    # The defaults reproduce passes on to identify, pairs and train; max_length is every stage's.
    length, selection = group(max_length=512), group(num_samples=256, top_k=1000)
    sampling = group(num_questions=2000, samples_per_question=4, temperature=0.8)
    training = group(grad_accum=4, epochs=1, lr=5e-7)
    parser = Parser(prog="yfpo.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, run, help, *parents, **own):  # a subcommand; its own flags as in group
        commands.add_parser(name, parents=[*parents, group(**own)], help=help).set_defaults(run=run)
    command("identify", cmd_identify, "score MLP neurons with AttnLRP, save the top k", common,
            selection, length, batch_size=4,
            control=dict(help="non-math question/answer data; its mean relevance is subtracted"))
    command("ablate", cmd_ablate, "zero (or scale) the neurons: NLL vs random neurons", common,
            length, num_samples=200, random_seeds=10, nll_batch_size=8, split="test",
            scale=dict(type=float, default=0.0, help="on the neurons' activations: 0 ablates"),
            neurons=dict(required=True),
            control=dict(help="non-math question/answer data: the NLL rise there too (last rows)"))
    command("pairs", cmd_pairs, "sample, grade and pair GSM8K train answers", common, generation,
            sampling, from_eval=dict(help="an eval.jsonl: held-out pairs from its wrong answers"))
    command("train", cmd_train, "DPO + lam * neuron-margin loss", common, loss, training, length,
            max_steps=None, save_every=(None, "a checkpoint every N steps (always one at the end)"),
            warmup_ratio=dict(type=float, default=0.1), pairs=dict(help="default: OUT/pairs.jsonl"),
            neurons=dict(help="default: OUT/neurons.json if it exists"),
            batch_size=(2, "pairs per micro-batch per process"),
            resume=(False, "continue from OUT/model"), gradient_checkpointing=False,
            probe_every=(None, "the terms' gradients every N steps (default: first, middle, last)"),
            allow_overlap=(False, "train on questions the neurons were selected on"))
    command("eval", cmd_eval, "GSM8K exact match, greedy", common, generation,
            limit=(None, "the first N questions"), split="test")
    command("score", cmd_score, "teacher-forced log-probs and neuron scores of pairs", common,
            length, batch_size=8, pairs=dict(required=True, help="e.g. from `pairs --from-eval`"),
            neurons=dict(nargs="+", required=True, help="one or more neurons.json files"))
    command("reproduce", cmd_reproduce, "the paper's experiment, every stage, into OUT/report.md",
            common, generation, loss, selection, sampling, training, length, ablate_samples=200,
            random_seeds=10, seeds=1, train_batch_size=2, save_every=25, eval_limit=None,
            control=dict(help="identify's non-math question/answer data, subtracted"))
    command("plot", cmd_plot, "overlay the training dynamics of train or reproduce folders",
            out=dict(help="default: training.png in the first DIR"))
    commands.choices["plot"].add_argument("dirs", nargs="+")
    command("demo", cmd_demo, "all stages on a tiny random model, offline", out="demo",
            seed=dict(type=int, default=0))
    return parser


def main(argv=None, strict=False):
    """Run a command; a UserError becomes one line on stderr and exit code 2 (raised if strict)."""
    args = build_parser().parse_args(argv)
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()  # an unreachable hub: one UserError line, no retry log
    distributed = "RANK" in os.environ and hasattr(args, "device")
    with contextlib.ExitStack() as on_exit:
        if distributed:  # torchrun: one process per device; rank 0 prints and writes
            on_gpu = torch.cuda.is_available() and args.device != "cpu"
            if on_gpu:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            # Rank 0 alone makes train's reference pass while others wait: hours, not NCCL's 10 min
            dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(hours=6))
            on_exit.callback(dist.destroy_process_group)
            if dist.get_rank() > 0:
                devnull = on_exit.enter_context(open(os.devnull, "w"))
                on_exit.enter_context(contextlib.redirect_stdout(devnull))
        try:
            if distributed and args.command == "reproduce":  # every rank would run every stage
                raise UserError("reproduce runs in one process: no torchrun")
            args.run(args)
        except (UserError, OSError) as e:  # OSError: a path that cannot be written or read
            if strict:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
