"""Restoration under data parallelism: 2 CPU processes (gloo) with averaged losses, gradients and HVPs give the
same restored adapter as one process on all the batches."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asft_lightning.restoration import RestorationConfig, restore

# solver pinned: the default (auto) is cg on the ranks but the Fisher in the single-process reference
CONFIG = RestorationConfig(solver="cg", trust_region=0.02, max_steps=3, target_margin=-10.0, land_on_target=False)


def _setup(world):
    from asft_lightning.data import _load_tokenizer, load_samples, sample_batches
    from asft_lightning.tiny import lora_attack

    tok = _load_tokenizer(world["aligned"], None)
    harmful = load_samples(world["harmful"], "harmful_data", "prompt", "response")
    task = load_samples(world["task"], "task_data", "instruction", "output", "input")
    train = sample_batches(tok, harmful[:64] + task[:64], batch_size=16, max_length=64)
    # equal batch sizes, so the mean of per-rank means is the global mean
    hb = sample_batches(tok, harmful[100:164], batch_size=16, max_length=64)
    rb = sample_batches(tok, task[200:264], batch_size=16, max_length=64)
    # float64, so that the comparison measures the algorithm, not float32 round-off amplified by CG
    return lora_attack(world["aligned"], train).double(), hb, rb


def _worker(rank: int, world_size: int, port: int, world, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, hb, rb = _setup(world)

        def mean(t):
            t = t.clone()
            dist.all_reduce(t)
            return t / world_size

        result = restore(model, hb[rank::world_size], rb[rank::world_size], config=CONFIG, all_reduce=mean)
        if rank == 0:
            state = {k: v.numpy().copy() for k, v in model.state_dict().items() if "lora_" in k}  # plain pickles
            queue.put((state, [r.harmful_loss for r in result.records], result.reference_harmful_loss))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_restoration_matches_single_process(tiny_world):
    torch.set_num_threads(1)
    model, hb, rb = _setup(tiny_world)
    single = restore(model, hb, rb, config=CONFIG)
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, dict(tiny_world), queue)) for r in range(2)]
    for p in procs:
        p.start()
    state, losses, reference = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(losses) == len(single.records) == CONFIG.max_steps
    assert reference == pytest.approx(single.reference_harmful_loss, rel=1e-5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([r.harmful_loss for r in single.records]),
                               rtol=1e-9, atol=0)
    for key, value in expected.items():
        torch.testing.assert_close(torch.from_numpy(state[key]), value, rtol=1e-8, atol=1e-12, msg=key)
