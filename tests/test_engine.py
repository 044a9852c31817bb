"""Engine: accumulation, clipping, precision, state and wrappers (CPU); DDP via real torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddp_train.config import EngineConfig
from ddp_train.dist import DistInfo
from ddp_train.engine import Engine, StepOutput, build_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = DistInfo()  # one process on CPU


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def make_engine(model: nn.Module, precision: str = "fp32", lr: float = 0.1, **kwargs) -> Engine:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return build_engine(EngineConfig(precision=precision), model, optimizer, LOCAL, **kwargs)


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_step(engine: Engine, x: torch.Tensor, y: torch.Tensor) -> StepOutput | None:
    x, y = engine.to_device(x), engine.to_device(y)
    with engine.autocast():
        loss = F.cross_entropy(engine.model(x), y)
    engine.backward(loss)
    return engine.step()


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_auto_is_local_without_process_group():
    engine = make_engine(tiny_model())
    assert type(engine) is Engine and engine.name == "local" and engine.precision == "fp32"
    with pytest.raises(ValueError, match="process group"):
        build_engine(EngineConfig(name="ddp"), tiny_model(), torch.optim.SGD(
            tiny_model().parameters(), lr=0.1), LOCAL)


def test_grad_accum_matches_one_big_batch():
    x, y = data(8)
    big = make_engine(tiny_model())
    out = train_step(big, x, y)
    accum = make_engine(tiny_model(), grad_accum=2)
    assert accum.is_boundary is False
    assert train_step(accum, x[:4], y[:4]) is None  # off the boundary: no optimizer step
    assert params(accum.unwrapped).equal(params(tiny_model()))
    out_accum = train_step(accum, x[4:], y[4:])
    assert accum.micro_step == 2 and accum.is_boundary is False  # a new window starts
    assert torch.allclose(params(accum.unwrapped), params(big.unwrapped), atol=1e-6)
    assert out_accum.grad_norm == pytest.approx(out.grad_norm, rel=1e-5)
    assert all(p.grad is None for p in accum.unwrapped.parameters())  # zero_grad(set_to_none)


def test_clip_caps_update_and_reports_preclip_norm():
    x, y = data(8)
    before = params(tiny_model())
    free = make_engine(tiny_model(), lr=1.0)  # clip_grad=0: measure only
    norm = train_step(free, x, y).grad_norm
    step_free = params(free.unwrapped) - before
    assert step_free.norm().item() == pytest.approx(norm, rel=1e-5)  # SGD lr=1: update = -grad

    clip = norm / 4
    clipped = make_engine(tiny_model(), lr=1.0, clip_grad=clip)
    out = train_step(clipped, x, y)
    assert out.grad_norm == pytest.approx(norm, rel=1e-5) and out.skipped is False
    step_clipped = params(clipped.unwrapped) - before
    assert step_clipped.norm().item() == pytest.approx(clip, rel=1e-4)
    assert torch.allclose(step_clipped, step_free / 4, atol=1e-6)  # same direction, scaled


def test_bf16_autocast_on_cpu():
    engine = make_engine(tiny_model(), precision="bf16")
    x, y = data(8)
    with engine.autocast():
        logits = engine.model(engine.to_device(x))
        loss = F.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    engine.backward(loss)
    out = engine.step()
    assert out.skipped is False and out.grad_norm > 0
    assert engine.scaler.is_enabled() is False  # bf16 needs no loss scaling
    assert all(p.dtype == torch.float32 for p in engine.unwrapped.parameters())


def test_fp16_skips_inf_step_and_scaler_state_round_trips(tmp_path):
    with pytest.warns(UserWarning, match="slow"):
        engine = make_engine(tiny_model(), precision="fp16")
    x, y = data(8)
    assert train_step(engine, x, y).skipped is False
    before = params(engine.unwrapped)
    engine.backward(engine.unwrapped(x).sum() * float("inf"))  # inf grads: must skip
    out = engine.step()
    assert out.skipped is True and not torch.isfinite(torch.tensor(out.grad_norm))
    assert params(engine.unwrapped).equal(before)
    assert engine.scaler.get_scale() == 2.0 ** 16 / 2  # backed off once from the default

    torch.save(engine.state_dict(), tmp_path / "engine.pt")
    state = torch.load(tmp_path / "engine.pt", weights_only=True)
    with pytest.warns(UserWarning):
        fresh = make_engine(tiny_model(seed=5), precision="fp16")
    fresh.load_state_dict(state)
    assert fresh.scaler.state_dict() == engine.scaler.state_dict()
    assert params(fresh.unwrapped).equal(params(engine.unwrapped))
    assert fresh.optimizer.state_dict() == engine.optimizer.state_dict()


def test_fp32_checkpoint_loads_into_fp16_engine():
    state = make_engine(tiny_model()).state_dict()
    assert state["scaler"] == {}
    with pytest.warns(UserWarning):
        engine = make_engine(tiny_model(seed=3), precision="fp16")
    engine.load_state_dict(state)
    assert engine.scaler.get_scale() == 2.0 ** 16  # fresh scaler kept


def test_unwrapped_strips_compile_and_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    engine = make_engine(model, compile=True, channels_last=True)
    assert engine.model is not model and engine.model._orig_mod is model  # compiled wrapper
    assert engine.unwrapped is model
    keys = list(engine.state_dict()["model"])
    assert keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = engine.to_device(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_ddp_two_ranks_matches_single_process(tmp_path):
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tests", "dist_scripts", "engine_ddp.py"), str(result)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["engine"] == "ddp" and r["world_size"] == 2
    assert r["max_diff_vs_reference"] < 1e-6
    assert r["max_diff_between_ranks"] == 0.0
    # 2 optimizer steps x grad_accum 2: only the boundary micro-batches all-reduce.
    assert r["allreduces_per_micro_batch"] == [0, 1, 0, 1]
    assert r["grad_norms"] == pytest.approx(r["reference_grad_norms"], rel=1e-5)
    assert r["clean_keys"] is True
