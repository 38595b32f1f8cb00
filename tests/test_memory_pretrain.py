"""Recovery training (method.name=memory_pretrain): only the memory layers learn (query, keys, W1, W2
under the dense optimizer, value rows under the fused one), everything else stays bit-identical,
score gradients reach query and keys under sharding, and 2 ranks equal 1."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.config import load_config
from smft_dist.data.synthetic import WorldSize, generate
from smft_dist.distributed.parallelize import train_step
from tests.distributed_helpers import B, batch, build, dense_state, rank_slice, reference_step, tiny_job
from tests.multiproc import run_ranks
from tests.test_retrofit import tiny_hf

MEMORY_PARAMS = {"query.weight", "query.bias", "keys", "w1.weight", "w2.weight"}


def _engine(rank: int, world: int) -> None:
    job = tiny_job("memory_pretrain")
    job.model.memory.placement = "beside"
    reference, par = build(job)
    table = par.tables["mem_values_1"]
    dense0, rows0 = dense_state(par.model), table.full_weight().clone()
    assert {n.split(".ffn.")[-1].split(".memory.")[-1] for n, p in par.model.named_parameters() if p.requires_grad} == MEMORY_PARAMS
    ids, mask, labels = batch(world * B, step=0)
    losses = []
    for _ in range(3):  # the same batch: the loss must fall
        ref_loss = reference_step(reference, ids, mask, labels)
        losses.append(train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels))))
        assert losses[-1] == pytest.approx(ref_loss, rel=1e-5)
    assert losses[-1] < losses[0]
    after, expected = dense_state(par.model), dense_state(reference)
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], msg=name)
        if ".memory." in name:
            assert not torch.equal(after[name], dense0[name]), f"{name} did not train"
        else:
            assert torch.equal(after[name], dense0[name]), f"{name} is not memory but moved"
    torch.testing.assert_close(table.full_weight(), reference.value_tables["mem_values_1"].weight.detach())
    assert not torch.equal(table.full_weight(), rows0)


@pytest.mark.multirank
def test_memory_pretrain_trains_only_memory_and_two_ranks_equal_one_process():
    run_ranks(_engine, 2)


@pytest.fixture(scope="module")
def retrofitted(tmp_path_factory):
    """A synthetic world and a tiny random Llama retrofitted with memory beside the FFN of block 1."""
    from smft_dist.retrofit import main
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("retrofit")
    generate(out / "world", WorldSize(people=12, background_docs=60, heldout_docs=8), seed=0, vocab_size=300)
    tiny_hf("llama", out / "llama", vocab_size=320, max_position_embeddings=64)
    AutoTokenizer.from_pretrained(out / "world" / "tokenizer").save_pretrained(out / "llama")
    main(["--model", str(out / "llama"), "--layers", "1", "--out", str(out / "mem"), "n_keys=8", "topk=4", "heads=2", "k_dim=16"])
    return out


def _train(rank: int, world_size: int, cfg) -> dict:
    from smft_dist.train import train

    return train(cfg)


def _recover(root, out, world: int) -> dict[str, torch.Tensor]:
    cfg = load_config(None, [
        f"train.init_from={root}/mem", f"data.tokenizer={root}/mem", "method.name=memory_pretrain",
        "method.dense_lr=1e-2", "method.value_lr=0.5", "distributed.grad_clip=0",
        f"data.pretrain.source.path={root}/world/pretrain.jsonl", "data.pretrain.seq_len=32", "data.pretrain.batch_size=4",
        "data.pretrain.source.max_examples=3",  # a few sequences seen again: the loss must fall
        "train.stream=pretrain", "train.steps=8", "train.log_every=1", f"train.out_dir={out}", f"checkpoint.dir={out}/ckpt",
    ])
    run_ranks(_train, world, cfg)
    losses = [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["split"] == "train"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), f"loss did not decrease: {losses}"
    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.mark.multirank
def test_recovery_after_retrofit_moves_only_memory_on_one_and_two_ranks(retrofitted, tmp_path):
    start = load_file(str(retrofitted / "mem" / "model.safetensors"))
    one, two = _recover(retrofitted, tmp_path / "one", 1), _recover(retrofitted, tmp_path / "two", 2)
    assert one.keys() == two.keys() == start.keys()
    for name in start:
        for run in (one, two):
            if ".memory." in name or ".value_tables." in name:
                assert not torch.equal(run[name], start[name]), f"{name} did not train"
            else:
                assert torch.equal(run[name], start[name]), f"{name} is not memory but moved"
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
