"""Multi-process training on CPU with real gloo process groups (torch.multiprocessing, torchrun).

Oracles: the single-process MuonAdamW step on the averaged gradients; a single process
trained with the same global batch through gradient accumulation; an uninterrupted
2-rank run (for resume); torchrun's own failure handling (for a crashing rank)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rdn.config import validate_params
from tests.conftest import REPO, torch_threads

# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, **extra: str) -> dict[str, str]:
    # One intra-op thread in every subprocess (torchrun's default for its workers, set here
    # explicitly so that it holds whatever OMP_NUM_THREADS the suite runs under): the
    # bitwise comparisons below need the same thread count on every side.
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), RDN_PROJECT_ROOT=str(root),
               OMP_NUM_THREADS="1", LOGLEVEL="WARNING", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], root: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=_env(root, **env), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- the optimizer step

# Muon groups: 4 matrices (divisible by 2, not by 3), 3 (by 3, not 2), 5 batched 3-D
# weights (neither); AdamW: (12, 8) is sharded at 2 and 3 ranks, (10, 8) at 2 only and
# replicated at 3 (10 % 3), (8,) and (5, 8) are below shard_min_numel=48 -> replicated.
MUON_SHAPES = [[(8, 16)] * 4, [(16, 8)] * 3, [(2, 8, 8)] * 5]
ADAMW_SHAPES = [(12, 8), (10, 8), (8,), (5, 8)]


def _param_groups(muon, adamw):
    groups = [dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01 * i)
              for i, p in enumerate(adamw)]
    groups += [dict(kind="muon", params=g, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.1)
               for g in muon]
    return groups


def _make_params():
    gen = torch.Generator().manual_seed(0)
    muon = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes] for shapes in MUON_SHAPES]
    adamw = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ADAMW_SHAPES]
    return muon, adamw


def _grad(p: torch.Tensor, rank: int, step: int, index: int) -> torch.Tensor:
    """Multiples of 2^-10 below 1/4: every sum over ranks is exact in fp32 in any order."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * index + rank)
    return torch.randint(-256, 257, p.shape, generator=gen).float() / 1024


def _optimizer_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from rdn.optim import MuonAdamW
    from rdn.optim.dist import DistMuonAdamW

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        muon, adamw = _make_params()
        opt = DistMuonAdamW(_param_groups(muon, adamw), shard_min_numel=48)
        ref_muon, ref_adamw = _make_params()
        ref = MuonAdamW(_param_groups(ref_muon, ref_adamw))
        params = [p for g in muon for p in g] + adamw
        ref_params = [p for g in ref_muon for p in g] + ref_adamw
        for step in range(3):  # state (momentum, moments, step counts) carries across steps
            for i, (p, q) in enumerate(zip(params, ref_params)):
                p.grad = _grad(p, rank, step, i)
                q.grad = sum(_grad(q, r, step, i) for r in range(world)) / world
            opt.step()
            ref.step()
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), (rank, world, tuple(p.shape), (p - q).abs().max().item())
        # each rank holds only its shard of the state
        chunk = -(-4 // world)
        assert opt.state[muon[0][0]]["momentum_buffer"].shape == (chunk, 8, 16)
        assert opt.state[adamw[0]]["exp_avg"].shape == (12 // world, 8)
        assert opt.state[adamw[1]]["exp_avg"].shape == ((5, 8) if world == 2 else (10, 8))
        # the state resumes only at the same world size
        sd = opt.state_dict()
        assert sd["dist_layout"]["world_size"] == world
        sd["dist_layout"] = dict(sd["dist_layout"], world_size=world + 1)
        with pytest.raises(ValueError, match="same world size"):
            opt.load_state_dict(sd)

        # global-norm clipping of the averaged gradient == clip_grad_norm_ on one process.
        # Not bitwise: the norm is summed per shard, then over ranks (~1e-7 relative), which
        # may flip one bf16 rounding inside Polar Express: <= lr * 2^-8 * |update| ~ 1e-4 a step.
        # A first step with small (unclipped) gradients makes the second, clipped, step
        # sensitive to the clip: a lone step of Muon or AdamW is invariant to gradient scale.
        def run(make_opt, clip):
            muon, adamw = _make_params()
            opt = make_opt(_param_groups(muon, adamw))
            params = [p for g in muon for p in g] + adamw
            for step, scale in ((0, 0.05), (1, 1.0)):
                for i, p in enumerate(params):
                    p.grad = scale * (_grad(p, rank, step, i) if make_opt is not MuonAdamW else
                                      sum(_grad(p, r, step, i) for r in range(world)) / world)
                if clip and make_opt is MuonAdamW:
                    assert (torch.nn.utils.clip_grad_norm_(params, 0.5) > 0.5) == (step == 1)
                opt.step()
            return params

        clipped = run(lambda g: DistMuonAdamW(g, shard_min_numel=48, max_grad_norm=0.5), True)
        ref_clipped, ref_unclipped = run(MuonAdamW, True), run(MuonAdamW, False)
        for p, q, u in zip(clipped, ref_clipped, ref_unclipped):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
        assert max((q - u).abs().max().item() for q, u in zip(ref_clipped, ref_unclipped)) > 1e-3
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_step_equals_single_process_step(world):
    """Tolerance: none (bitwise). The gradients are exact binary fractions, so the
    reduce-scatter's summation order cannot round; the division by W is the same
    correctly rounded op in both paths; everything after it is per-element (AdamW) or
    per-matrix (Polar Express, NorMuon, cautious decay) maths on identical inputs."""
    # fork: each rank starts from this process's imports (torch, this module) instead of
    # importing them again (seconds per rank); the ranks use only their own gloo group.
    torch.multiprocessing.start_processes(_optimizer_worker, args=(world, _free_port()), nprocs=world,
                                          start_method="fork")


def test_communication_bytes_follow_the_ring_formula():
    from rdn.optim.dist import communication_bytes

    muon, adamw = _make_params()
    got = communication_bytes(_param_groups(muon, adamw), 3, shard_min_numel=48)
    # muon: stacks padded to 6, 3, 6 matrices; each is reduce-scattered and all-gathered
    muon_bytes = 2 * 4 * (6 * 128 + 3 * 128 + 6 * 128) * 2 / 3
    assert got["muon"] == int(2 * 4 * 6 * 128 * 2 / 3) + int(2 * 4 * 3 * 128 * 2 / 3) + int(2 * 4 * 6 * 128 * 2 / 3)
    assert abs(got["muon"] - muon_bytes) < 3
    assert got["adamw_sharded"] == int(2 * 96 * 4 * 2 / 3)
    assert communication_bytes(_param_groups(muon, adamw), 1)["total"] == 0


# --------------------------------------------------------------------------- the loader slice


def test_ranks_take_disjoint_batches_that_add_up_to_the_single_process_stream(tiny_artifacts):
    from rdn.data.loader import get_dataloader
    from rdn.tokenizer import Tokenizer

    data_dir, tok_dir = tiny_artifacts
    tok = Tokenizer.load(tok_dir)

    def batches(rank, world, n):
        it = get_dataloader(tok, data_dir, "val", 2, 64, prefetch=1, loop=False, rank=rank, world_size=world)
        out = [(x.clone(), state) for x, _, state in (next(it) for _ in range(n))]
        it.close()
        return out

    single = batches(0, 1, 6)
    ranks = [batches(r, 3, 2) for r in range(3)]
    for step in range(2):
        for r in range(3):
            assert torch.equal(ranks[r][step][0], single[3 * step + r][0])
            assert ranks[r][step][1] == single[3 * step + 2][1]  # one global state on every rank


# --------------------------------------------------------------------------- launching stages


def _params_file(root: Path, nproc: int, dist: dict | None = None, model: dict | None = None, **train) -> Path:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"].update(depth=2, head_dim=64, sequence_len=64, **(model or {}))
    p["coords"]["n_dim"] = 4
    for later in ("mid_train", "chat_sft"):
        p[later].update(seq_len=64, device_batch_size=2, total_batch_size=256)
    p["base_train"].update(dict(device_batch_size=2, seq_len=64, total_batch_size=256, num_iterations=6,
                                eval_every=3, eval_tokens=512, save_every=2, keep_last=10, sample_every=100,
                                prefetch=1, loader_buffer_docs=32), **train)
    p["run"]["device"] = "cpu"
    p["tracking"]["enabled"] = False
    p["dist"]["nproc_per_node"] = nproc
    p["dist"].update(dist or {})
    validate_params(p)
    path = root / f"params_{nproc}.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _project(tmp_path_factory, tiny_artifacts, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    data_dir, tok_dir = tiny_artifacts
    shutil.copytree(data_dir, root / "artifacts/data")
    shutil.copytree(tok_dir, root / "artifacts/tokenizer")
    return root


def _history(root: Path, column: str = "loss") -> dict[int, float]:
    with open(root / "metrics/base_train_history.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r[column]}


def _weights(root: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / f"artifacts/checkpoints/base/step_{step:06d}/model.safetensors"))


# Runs the real stage under torchrun, after wrapping the training loader so that rank
# $DIE_RANK dies (os._exit, like a SIGKILL) or raises when it asks for batch $DIE_AT.
HARNESS = textwrap.dedent("""
    import os, sys
    import rdn.train.pretrain as base

    real = base.get_dataloader
    rank, at, how = int(os.environ["RANK"]), int(os.environ["DIE_AT"]), os.environ["DIE_HOW"]

    def get_dataloader(*args, **kwargs):
        inner = real(*args, **kwargs)
        if kwargs.get("loop", True) is False or rank != int(os.environ["DIE_RANK"]):
            return inner

        class Dying:
            served = 0

            def __next__(self):
                Dying.served += 1
                if Dying.served == at:
                    if how == "exit":
                        os._exit(9)
                    raise RuntimeError(f"rank {rank} exploded on purpose at batch {at}")
                return next(inner)

            def close(self):
                inner.close()
        return Dying()

    base.get_dataloader = get_dataloader
    from stages.base_train import main
    sys.exit(main(sys.argv[1:]))
""")


def _torchrun_harness(root: Path, params: Path, how: str, at: int, timeout: float = 240):
    script = root / "harness.py"
    script.write_text(HARNESS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor_interval=0.2", str(script), "--params", str(params)]
    return _run(cmd, root, timeout=timeout, DIE_AT=str(at), DIE_HOW=how, DIE_RANK="1")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_artifacts) -> Path:
    """An uninterrupted 2-rank base_train, launched the way DVC does (the stage re-executes
    itself under torchrun because dist.nproc_per_node is 2)."""
    root = _project(tmp_path_factory, tiny_artifacts, "two_ranks")
    proc = _run([sys.executable, "-m", "stages.base_train", "--params", str(_params_file(root, 2))], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_two_ranks_match_one_process_with_gradient_accumulation(two_rank_run, tmp_path_factory, tiny_artifacts):
    """Tolerance: none (bitwise). The two ranks take exactly the one process's two
    accumulation micro-batches (same forward shapes, same kernels). One process sums
    grad(l0/2) + grad(l1/2); the ranks sum grad(l0) + grad(l1) and halve. Scaling by 2^-k
    commutes with every rounding in backward (short of subnormals) and a sum of two terms
    does not depend on order, so both give identical bits; the step loss is all-reduced
    the same way. (At 3 ranks the sum of three terms could differ in the last bit.)
    Same kernels also means the same intra-op thread count: the ranks run with one thread
    each (_env), so the one process does too; with more threads matmul reductions are
    split and summed in another order (losses differ from step 2 on a 2-core machine)."""
    from rdn.train.pretrain import run_base_train
    from tests.test_train import RecordingRun

    root = _project(tmp_path_factory, tiny_artifacts, "one_rank")
    with torch_threads(1):
        summary = run_base_train(validate_params(yaml.safe_load(_params_file(root, 1).read_text())), root,
                                 RecordingRun())
    one, two = _history(root), _history(two_rank_run)
    assert sorted(one) == list(range(1, 7))
    assert one == two
    # validation: the ranks' float64 sums of nats and bytes are added in another order
    assert sorted(_history(root, "val_bpb")) == [0, 3, 6]
    assert _history(two_rank_run, "val_bpb") == pytest.approx(_history(root, "val_bpb"), rel=1e-12)
    two_summary = json.loads((two_rank_run / "metrics/base_train.json").read_text())
    assert two_summary["final_val_bpb_closing"] == pytest.approx(summary["final_val_bpb_closing"], rel=1e-12)
    assert (two_summary["final_val_bpb_depth2"] is None) == (summary["final_val_bpb_depth2"] is None)
    # train/grad_norm: the norm of the same averaged gradient, taken after the reduction on 2 ranks
    # (fp32 norms of shards summed over ranks vs the one process's fp32 norm: tests/test_grad_norm.py)
    assert sorted(_history(two_rank_run, "grad_norm")) == list(range(1, 7))
    assert _history(two_rank_run, "grad_norm") == pytest.approx(_history(root, "grad_norm"), rel=1e-4)
    a, b = _weights(root, 6), _weights(two_rank_run, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only rank 0 wrote metrics and meta; every rank wrote its optimizer shard
    ckpt = two_rank_run / "artifacts/checkpoints/base/step_000006"
    assert sorted(f.name for f in ckpt.glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]
    assert yaml.safe_load((ckpt / "meta.json").read_text())["world_size"] == 2
    assert not list((two_rank_run / "artifacts/checkpoints/base").glob(".*"))  # no staged shards left


def test_model_variants_on_two_ranks_match_one_process(tmp_path_factory, tiny_artifacts):
    """MoE (routing-bias counts summed over ranks, 3-D expert weights in sharded Muon), mHC,
    MTP and ternary layers all at once: 2 gloo ranks give the one process's losses and
    weights, bitwise for the reasons given above (same micro-batches, one thread each)."""
    from rdn.train.pretrain import run_base_train
    from tests.test_train import RecordingRun
    from tests.test_variants import VARIANT_PARAMS

    variants = VARIANT_PARAMS["all"]
    two = _project(tmp_path_factory, tiny_artifacts, "variants_two")
    proc = _run([sys.executable, "-m", "stages.base_train", "--params",
                 str(_params_file(two, 2, model=variants, num_iterations=4, eval_every=4))], two)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = _project(tmp_path_factory, tiny_artifacts, "variants_one")
    params = validate_params(yaml.safe_load(_params_file(one, 1, model=variants, num_iterations=4,
                                                         eval_every=4).read_text()))
    with torch_threads(1):
        run_base_train(params, one, RecordingRun())
    assert sorted(_history(one)) == [1, 2, 3, 4]
    assert _history(one) == _history(two)
    a, b = _weights(one, 4), _weights(two, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("expert_bias") for k in a) and any(torch.any(a[k] != 0) for k in a if "expert_bias" in k)


def test_killed_two_rank_run_resumes_exactly(two_rank_run, tmp_path_factory, tiny_artifacts):
    root = _project(tmp_path_factory, tiny_artifacts, "killed")
    params = _params_file(root, 2)
    # rank 1 dies fetching step 5's batch (accumulation 1 at 2 ranks), after checkpoint 4
    proc = _torchrun_harness(root, params, "exit", 5)
    assert proc.returncode != 0
    steps = sorted(p.name for p in (root / "artifacts/checkpoints/base").glob("step_*"))
    assert steps == ["step_000002", "step_000004"], steps
    proc = _run([sys.executable, "-m", "stages.base_train", "--params", str(params)], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _history(root) == _history(two_rank_run)  # bitwise: same ranks, same reduction order
    a, b = _weights(root, 6), _weights(two_rank_run, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_at_another_world_size_is_refused(two_rank_run, tmp_path_factory):
    from rdn.train.pretrain import run_base_train
    from rdn.checkpoint import CheckpointError
    from tests.test_train import RecordingRun

    root = tmp_path_factory.mktemp("other_world")
    shutil.copytree(two_rank_run / "artifacts", root / "artifacts")
    params = validate_params(yaml.safe_load(_params_file(root, 1).read_text()))
    with pytest.raises(CheckpointError, match="written by 2 ranks and this run has 1"):
        run_base_train(params, root, RecordingRun())


def test_a_failing_rank_stops_the_job_promptly_with_its_error(tmp_path_factory, tiny_artifacts):
    root = _project(tmp_path_factory, tiny_artifacts, "failing")
    start = time.monotonic()
    proc = _torchrun_harness(root, _params_file(root, 2), "raise", 3, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "rank 1 exploded on purpose at batch 3" in output
    assert took < 90, took  # rank 0 was blocked in a collective; torchrun stopped it


def test_torchrun_command_from_params():
    from rdn.dist import torchrun_argv

    one = torchrun_argv(4, 1, None, "rdn", "stages.base_train", ["--params", "p.yaml"])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1", "--standalone",
                       "-m", "stages.base_train", "--params", "p.yaml"]
    many = torchrun_argv(8, 2, "node0:29500", "job7", "stages.chat_sft", [])
    assert "--rdzv_backend=c10d" in many and "--rdzv_endpoint=node0:29500" in many and "--rdzv_id=job7" in many


def test_multi_node_needs_a_rendezvous_endpoint():
    from rdn.config import ParamsError

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["dist"].update(nnodes=2)
    with pytest.raises(ParamsError, match=r"dist.rdzv_endpoint: required when nnodes > 1"):
        validate_params(p)
    p["dist"].update(node_launcher="local")  # node 0 serves the rendezvous itself
    assert validate_params(p).dist.nnodes == 2
    p["dist"].update(nproc_per_node=3)  # 4096 tokens do not split into 6 ranks' micro-batches
    with pytest.raises(ParamsError, match=r"base_train.total_batch_size: must be divisible by device_batch_size "
                                          r"\* seq_len \* ranks \(dist: 3 x 2\)"):
        validate_params(p)
    p["dist"].update(nproc_per_node=1)
    p["dist"].update(node_launcher="k8s")
    with pytest.raises(ParamsError, match=r"dist.k8s_image: required when node_launcher is k8s"):
        validate_params(p)


# --------------------------------------------------------------------------- node 0 starts the other nodes

def test_two_nodes_started_by_node_zero_match_two_ranks_on_one_node(two_rank_run, tmp_path_factory, tiny_artifacts):
    """dist.nnodes=2 x nproc_per_node=1 with node_launcher local: the stage (as DVC runs it)
    becomes node 0, starts node 1 as a separate torchrun agent on this machine, and they meet
    at a static TCP rendezvous. The same world size as the 1 node x 2 processes run, the same
    rank order (node 0 holds rank 0): bitwise the same losses and weights."""
    root = _project(tmp_path_factory, tiny_artifacts, "two_nodes")
    params = _params_file(root, 1, dist={"nnodes": 2, "node_launcher": "local"})
    proc = _run([sys.executable, "-m", "stages.base_train", "--params", str(params)], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "started nodes 1..1 on this machine" in proc.stderr
    assert _history(root) == _history(two_rank_run)
    a, b = _weights(root, 6), _weights(two_rank_run, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = root / "artifacts/checkpoints/base/step_000006"
    assert sorted(f.name for f in ckpt.glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]
    assert yaml.safe_load((ckpt / "meta.json").read_text())["world_size"] == 2


def test_a_failed_node_stops_node_zero_and_fails_the_stage():
    """Node 0 is blocked in its first collective when a peer dies; the launcher notices the
    dead node and stops node 0 instead of waiting for the collective timeout."""
    from rdn.pipeline.launch import Nodes

    nodes = Nodes()
    nodes.procs.append(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    nodes.procs[0].wait()
    assert nodes.failed() == "node 1 exited with 3"
    assert nodes.wait(timeout=5) == "node 1 exited with 3"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    nodes.procs = [sleeper]
    assert nodes.failed() is None
    start = time.monotonic()
    nodes.stop()
    assert sleeper.returncode is not None and time.monotonic() - start < 10


def _worker_job(nnodes: int = 3, **env: str) -> dict:
    from rdn.pipeline.launch import k8s_worker_job

    return k8s_worker_job((REPO / "infra/k8s/train-multinode.yaml").read_text(), job="rdn-base-train-1", stage="base_train",
                          nnodes=nnodes, nproc_per_node=8, image="registry.example/rdn:cuda", host="10.0.0.7",
                          port=29500, params_path="/workspace/rdn/params.yaml", env=env)


def test_k8s_worker_job_is_the_shipped_template_for_the_other_nodes():
    job = _worker_job(RDN_MLFLOW_PARENT_RUN_ID="abc", RDN_PROJECT_ROOT="/workspace/rdn")
    assert job["kind"] == "Job" and job["metadata"]["name"] == "rdn-base-train-1"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    [container] = spec["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/rdn:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "${" not in yaml.safe_dump(job)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RDN_MLFLOW_PARENT_RUN_ID"] == "abc" and env["RDN_PROJECT_ROOT"] == "/workspace/rdn"
    assert container["command"] == ["sh", "-c"]
    # the pod with completion index i is node i + 1: run its shell line with python -> echo
    line = container["args"][0].replace("exec python ", "exec echo ", 1)
    out = subprocess.run(["sh", "-c", line], env={"JOB_COMPLETION_INDEX": "1", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=3", "--node_rank=2",
                   "--rdzv_backend=static", "--master_addr=10.0.0.7", "--master_port=29500", "-m",
                   "stages.base_train", "--params", "/workspace/rdn/params.yaml"]


def test_k8s_template_errors_name_the_problem():
    from rdn.pipeline.launch import LaunchError, k8s_worker_job, render_template

    with pytest.raises(LaunchError, match=r"t.yaml: no value for \$\{FOO\}"):
        render_template("a: ${FOO}\nb: ${JOB}", {"JOB": "x"}, "t.yaml")
    with pytest.raises(LaunchError, match="exactly one kind: Job"):
        k8s_worker_job("kind: Service\n", job="j", stage="base_train", nnodes=2, nproc_per_node=1, image="i",
                       host="h", port=1, params_path="p", env={})


def test_k8s_launcher_applies_then_deletes_the_job(tmp_path, monkeypatch):
    """No cluster here: a stand-in ``kubectl`` on PATH records its calls. Checks what node 0
    sends (a JSON Job from the shipped template) and that the Job is deleted afterwards."""
    from rdn.config import DistConfig
    from rdn.pipeline.launch import start_nodes

    calls = tmp_path / "calls.jsonl"
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        data = sys.stdin.read() if "-f" in sys.argv else ""
        with open({str(calls)!r}, "a") as f:
            f.write(json.dumps({{"argv": sys.argv[1:], "stdin": data}}) + "\\n")
        """))
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{kubectl.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    cfg = DistConfig(nproc_per_node=8, nnodes=2, node_launcher="k8s", k8s_image="img:1", k8s_namespace="ml")
    nodes = start_nodes(cfg, "chat_sft", ["--params", "/w/params.yaml"], "10.1.2.3", 29500, REPO)
    nodes.stop()
    apply, delete = [json.loads(line) for line in calls.read_text().splitlines()]
    assert apply["argv"] == ["apply", "-n", "ml", "-f", "-"]
    job = json.loads(apply["stdin"])
    name = job["metadata"]["name"]
    assert name.startswith("rdn-chat-sft-") and job["spec"]["completions"] == 1
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in job["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert "--master_addr=10.1.2.3" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert delete["argv"][:5] == ["delete", "job", name, "-n", "ml"]
