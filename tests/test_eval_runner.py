"""Evaluation runner on tiny stand-in models whose outputs are forced."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn

from smft_dist.config import EvalConfig, EvalTaskConfig, SourceConfig
from smft_dist.data import load_tokenizer, train_tokenizer
from smft_dist.data.packing import encode, tokenize_pairs, tokenize_text
from smft_dist.eval import runner
from smft_dist.eval.runner import evaluate_choice, evaluate_nll, evaluate_qa, greedy_generate, run_eval
from smft_dist.model.transformer import KVCache, Transformer
from tests.multiproc import run_ranks

PROMPT = "Question: {question}\nAnswer:"
TEXTS = ["Rome is old. Milan is busy.", "alpha beta gamma delta", "river stone north", "Question: where?\nAnswer: here"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 5, 300, d)
    return str(d)


class Favor(nn.Module):
    """Every position predicts the same distribution: logit ``bias`` on ``favored`` tokens, 0 elsewhere."""

    def __init__(self, vocab: int, favored: list[int] = (), bias: float = 8.0):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.logit[list(favored)] = bias

    def forward(self, input_ids, attention_mask=None):
        return self.logit.expand(*input_ids.shape, -1)


class Bigram(nn.Module):
    """The next token is a fixed function of the current one (``table``; default ``junk``)."""

    def __init__(self, vocab: int, table: dict[int, int], junk: int):
        super().__init__()
        nxt = torch.full((vocab,), junk)
        for a, b in table.items():
            nxt[a] = b
        self.register_buffer("nxt", nxt)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot(self.nxt[input_ids], len(self.nxt)).float() * 10
        return type("Out", (), {"logits": logits})()


def _answering_model(tok, answer: str) -> Bigram:
    """Answers ``answer`` then a newline after any prompt ending like ``PROMPT``."""
    trigger = encode(tok, [PROMPT.format(question="x")], eos=False)[0][-1]
    chain = [trigger, *encode(tok, [" " + answer], bos=False, eos=False)[0], *encode(tok, ["\n"], bos=False, eos=False)[0]]
    assert len(set(chain)) == len(chain), "pick an answer with distinct tokens"
    junk = encode(tok, ["gamma"], bos=False, eos=False)[0][0]
    return Bigram(len(tok), dict(zip(chain, chain[1:])), junk)


QA = [
    {"question": "Capital of Italy?", "answers": ["Rome"]},
    {"question": "A much longer question about which city it might be, really?", "answers": ["the rome!"]},
    {"question": "Where?", "answers": ["Milan", "Rome, Italy"]},
]


def test_greedy_generation_and_qa_metrics(tok_dir):
    tok = load_tokenizer(tok_dir)
    model = _answering_model(tok, "Rome")
    prompts = [PROMPT.format(question=r["question"]) for r in QA]  # different lengths, right-padded
    assert greedy_generate(model, tok, prompts, max_new_tokens=12) == ["Rome"] * 3
    res = evaluate_qa(model, tok, datasets.Dataset.from_list(QA), prompt=PROMPT, batch_size=2, max_new_tokens=12)
    assert res["count"] == 3
    assert res["em"] == pytest.approx(2 / 3) and res["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert res["contains"] == pytest.approx(2 / 3)  # "Rome, Italy" is not inside "Rome"
    wrong = evaluate_qa(_answering_model(tok, "Milan"), tok, datasets.Dataset.from_list(QA), prompt=PROMPT, batch_size=3, max_new_tokens=12)
    assert wrong["em"] == pytest.approx(1 / 3) and wrong["contains"] == pytest.approx(1 / 3)


CHOICES = [
    {"context": "Question: where?", "endings": [" alpha beta", " river stone", " north"], "label": 1},
    {"context": "Rome is", "endings": [" old.", " busy.", " river stone"], "label": 2},
]


def _ids(tok, text):
    return encode(tok, [text], bos=False, eos=False)[0]


def test_choice_picks_the_forced_option(tok_dir):
    tok = load_tokenizer(tok_dir)
    ds = datasets.Dataset.from_list(CHOICES)
    forced = Favor(len(tok), _ids(tok, " river stone"))
    for norm in ("chars", "tokens", "none"):
        assert evaluate_choice(forced, tok, ds, batch_size=4, norm=norm) == {"acc": 1.0, "count": 2}
    wrong = Favor(len(tok), _ids(tok, " alpha beta") + _ids(tok, " old."))  # forces option 0 twice
    assert evaluate_choice(wrong, tok, ds, batch_size=5) == {"acc": 0.0, "count": 2}


def test_choice_length_normalization(tok_dir):
    tok = load_tokenizer(tok_dir)
    long, short = " alpha beta gamma delta", " north"
    favored = set(_ids(tok, long)) - set(_ids(tok, short))
    assert len(_ids(tok, long)) > len(_ids(tok, short)) and favored
    ds = datasets.Dataset.from_list([{"context": "river", "endings": [short, long], "label": 1}])
    model = Favor(len(tok), sorted(favored), bias=0.1)  # the long ending's tokens slightly likelier
    assert evaluate_choice(model, tok, ds, batch_size=2, norm="tokens")["acc"] == 1.0
    assert evaluate_choice(model, tok, ds, batch_size=2, norm="none")["acc"] == 0.0  # the raw sum prefers fewer tokens


def test_nll_of_a_uniform_model_is_log_vocab(tok_dir):
    tok = load_tokenizer(tok_dir)
    rows = tokenize_text(datasets.Dataset.from_dict({"text": TEXTS}), tok, 8, packed=True)
    res = evaluate_nll(Favor(len(tok)), rows, batch_size=3)
    assert res["tokens"] == sum(sum(m) - 1 for m in rows["attention_mask"])
    assert res["nll"] == pytest.approx(math.log(len(tok))) and res["ppl"] == pytest.approx(len(tok))
    pairs = tokenize_pairs(datasets.Dataset.from_dict({"prompt": ["Rome is"], "target": [" old."]}), tok, 16)
    assert evaluate_nll(Favor(len(tok)), pairs, batch_size=1)["tokens"] == len(_ids(tok, " old.")) + 1  # + eos


def _results(tok_dir) -> dict[str, float]:
    tok = load_tokenizer(tok_dir)
    qa = datasets.Dataset.from_list(QA + QA[:2])  # 5 records: uneven shards
    choice = datasets.Dataset.from_list(CHOICES * 2 + CHOICES[:1])
    rows = tokenize_text(datasets.Dataset.from_dict({"text": TEXTS}), tok, 8, packed=True)
    results = {
        "qa": evaluate_qa(_answering_model(tok, "Rome"), tok, qa, prompt=PROMPT, batch_size=2, max_new_tokens=8),
        "choice": evaluate_choice(Favor(len(tok), _ids(tok, " north")), tok, choice, batch_size=4),
        "nll": evaluate_nll(Favor(len(tok), _ids(tok, " stone"), bias=1.0), rows, batch_size=2),
    }
    return {f"{task}/{k}": v for task, res in results.items() for k, v in res.items()}


def _rank_results(rank: int, world: int, tok_dir: str) -> dict[str, float]:
    return _results(tok_dir)


@pytest.mark.multirank
def test_two_ranks_match_one(tok_dir):
    single = _results(tok_dir)
    assert single["qa/count"] == single["choice/count"] == 5 and single["qa/em"] == pytest.approx(4 / 5)
    for ranked in run_ranks(_rank_results, 2, tok_dir):
        assert ranked.keys() == single.keys()
        for k, v in single.items():
            assert ranked[k] == pytest.approx(v, rel=1e-6), k  # fp32 per-token NLLs, summed in fp64


class _Reduced(Exception):
    """Raised by a stand-in ``dist.all_reduce`` with the device of the tensor it was given."""


def _fake_two_ranks(monkeypatch, all_reduce) -> None:
    monkeypatch.setattr(runner.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runner.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(runner.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(runner.dist, "all_reduce", all_reduce)


def test_eval_collectives_allocate_on_the_device_they_are_given(monkeypatch):
    """NCCL reduces CUDA tensors only: the collectives' tensors live where the model does
    (``meta`` stands for a device other than the CPU; the stand-in stops before reading them back)."""
    def stop(t, *args, **kwargs):
        raise _Reduced(t.device)

    _fake_two_ranks(monkeypatch, stop)
    meta = torch.device("meta")
    with pytest.raises(_Reduced) as sums:
        runner.all_reduce_sums([1.0, 2.0], meta)
    with pytest.raises(_Reduced) as flag:
        runner._all_ranks_true(True, meta)
    assert sums.value.args[0] == meta and flag.value.args[0] == meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")  # on CPU every tensor is there anyway
def test_evaluation_reduces_on_the_model_device(tok_dir, monkeypatch):
    """Every collective of every task (sharded sums, lockstep generation) gets a tensor on the model's device."""
    device = "cuda"
    seen: list[torch.device] = []

    def record(t, *args, **kwargs):
        seen.append(t.device)

    _fake_two_ranks(monkeypatch, record)
    tok = load_tokenizer(tok_dir)
    rows = tokenize_text(datasets.Dataset.from_dict({"text": TEXTS}), tok, 8, packed=True)
    qa, choice = datasets.Dataset.from_list(QA), datasets.Dataset.from_list(CHOICES)
    answering, favor = _answering_model(tok, "Rome").to(device), Favor(len(tok), _ids(tok, " north")).to(device)
    evaluate_qa(answering, tok, qa, prompt=PROMPT, batch_size=2, max_new_tokens=4)
    smft_lm = Transformer(_tiny_lm(len(tok)).model).eval().to(device)  # lockstep decodes through the KV cache
    evaluate_qa(smft_lm, tok, qa, prompt=PROMPT, batch_size=2, max_new_tokens=4, lockstep=True)
    evaluate_choice(favor, tok, choice, batch_size=4)
    evaluate_nll(favor, rows, batch_size=2)
    assert len(seen) >= 4 and set(seen) == {torch.device("cuda", 0)}


def test_run_eval_runs_every_task_and_restores_train_mode(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    qa_path = tmp_path / "qa.jsonl"
    qa_path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answers"]}) + "\n" for r in QA))
    text_path = tmp_path / "held.jsonl"
    text_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = EvalConfig(
        tasks=[
            EvalTaskConfig(name="nq", kind="qa", source=SourceConfig(path=str(qa_path), schema="nq_open")),
            EvalTaskConfig(name="held", kind="nll", source=SourceConfig(path=str(text_path)), seq_len=8),
        ],
        max_new_tokens=8,
    )
    model = _answering_model(tok, "Rome")
    model.train()
    results = run_eval(model, tok, cfg, cache_dir=str(tmp_path / "cache"), answers_dir=tmp_path / "answers")
    assert model.training  # restored
    assert results["nq/em"] == pytest.approx(2 / 3) and set(results) == {"nq/em", "nq/f1", "nq/contains", "nq/count", "held/nll", "held/ppl", "held/tokens"}
    assert sorted(p.name for p in (tmp_path / "answers").iterdir()) == ["nq.jsonl"]  # qa and choice tasks only
    answers = [json.loads(x) for x in (tmp_path / "answers" / "nq.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2] and [a["question"] for a in answers] == [r["question"] for r in QA]
    assert [a["prediction"] for a in answers] == ["Rome"] * 3 and [a["em"] for a in answers] == [1.0, 1.0, 0.0]
    for metric in ("em", "f1", "contains"):  # the per-example scores are what the metrics average
        assert sum(a[metric] for a in answers) / 3 == pytest.approx(results[f"nq/{metric}"])


def _tiny_lm(vocab: int):
    from tests.distributed_helpers import tiny_job

    job = tiny_job("pretrain")
    job.model.vocab_size, job.model.max_seq_len = vocab, 128
    return job


class _NoCache(nn.Module):
    """The same model seen as a plain callable: generation re-reads the prefix every step."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask)


def test_kv_cache_decoding_equals_rereading_the_prefix(tok_dir):

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = Transformer(_tiny_lm(320).model).eval()
    ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:], mask[2, 7:] = 0, 0  # right padding
    with torch.no_grad():
        full = model(ids, mask)
        cache = KVCache()
        parts = [model(ids[:, :4], mask[:, :4], cache=cache)] + [model(ids[:, j : j + 1], mask[:, j : j + 1], cache=cache) for j in range(4, 9)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real])

    prompts = [PROMPT.format(question=r["question"]) for r in QA]  # different lengths, right-padded
    cached = greedy_generate(model, tok, prompts, max_new_tokens=10, stop="never")
    assert cached == greedy_generate(_NoCache(model), tok, prompts, max_new_tokens=10, stop="never")
    assert all(len(encode(tok, [c], bos=False, eos=False)[0]) >= 5 for c in cached)  # long enough to mean something


def _sharded_eval(rank: int, world: int, tok_dir: str) -> dict:
    from tests.distributed_helpers import build

    tok = load_tokenizer(tok_dir)
    _, par = build(_tiny_lm(320))
    model, seen = par.model.eval(), []
    forward = model.forward
    model.forward = lambda input_ids, attention_mask, cache=None: (
        seen.append(int(attention_mask.any(1).sum()) if input_ids.shape[1] > 1 else 0) or forward(input_ids, attention_mask, cache))
    res = _tiny_lm_results(model, tok, lockstep=world > 1)
    return {"results": res, "forwards": len(seen), "rows": sum(seen)}  # rows: examples read (not decode steps)


def _tiny_lm_results(model, tok, lockstep: bool) -> dict:
    """Metrics, plus every qa / choice example's answer as the ranks' gathered files hold them."""
    import tempfile

    qa = datasets.Dataset.from_list(QA + QA[:2])  # 5 records: uneven shards
    choice = datasets.Dataset.from_list(CHOICES * 2 + CHOICES[:1])
    rows = tokenize_text(datasets.Dataset.from_dict({"text": TEXTS * 3}), tok, 8, packed=True)
    answers = {"qa": [], "choice": []}
    results = {
        "qa": evaluate_qa(model, tok, qa, prompt=PROMPT, batch_size=2, max_new_tokens=4, lockstep=lockstep, answers=answers["qa"]),
        "choice": evaluate_choice(model, tok, choice, batch_size=4, lockstep=lockstep, answers=answers["choice"]),
        "nll": evaluate_nll(model, rows, batch_size=2, lockstep=lockstep),
    }
    with tempfile.TemporaryDirectory() as d:  # each rank its own directory: rank 0's holds every example
        for task, examples in answers.items():
            runner.write_answers(Path(d) / f"{task}.jsonl", examples)
        files = {f.stem: f.read_text() for f in Path(d).iterdir()}
    return {**{f"{task}/{k}": v for task, res in results.items() for k, v in res.items()}, "answers": files}


@pytest.mark.multirank
def test_row_sharded_eval_splits_examples_in_lockstep(tok_dir):

    torch.manual_seed(0)
    single = _tiny_lm_results(Transformer(_tiny_lm(320).model).eval(), load_tokenizer(tok_dir), lockstep=False)
    one, *_ = run_ranks(_sharded_eval, 1, tok_dir)
    two = run_ranks(_sharded_eval, 2, tok_dir)
    answers = single.pop("answers")
    assert sorted(answers) == ["choice", "qa"] and len(answers["qa"].splitlines()) == 5 and len(answers["choice"].splitlines()) == 5
    assert [json.loads(x)["index"] for x in answers["qa"].splitlines()] == [0, 1, 2, 3, 4]
    assert two[1]["results"].pop("answers") == {}, "only rank 0 writes the answers"
    for ranked in (one, *two):
        if "answers" in ranked["results"]:  # the answers gathered over the ranks equal one process's, line for line
            assert ranked["results"].pop("answers") == answers
        assert ranked["results"].keys() == single.keys()
        for k, v in single.items():
            assert ranked["results"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert two[0]["forwards"] == two[1]["forwards"] < one["forwards"], "ranks ran different numbers of forwards"
    assert two[0]["rows"] + two[1]["rows"] == one["rows"], "each example is evaluated on one rank only"
