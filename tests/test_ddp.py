"""Scale-out with accelerate: the shipped configs, and a real 2-process DDP run on CPU (gloo)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import REPO, env

from fine_tune_llm.config import make_config
from fine_tune_llm.train import checkpoints

CONFIGS = REPO / "configs" / "accelerate"


def test_accelerate_configs_load_and_say_what_they_are():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(CONFIGS / f"{name}.yaml")) for name in
             ("single_gpu", "multi_gpu_ddp", "fsdp_qlora")}
    assert (kinds["single_gpu"].distributed_type, kinds["single_gpu"].num_processes) == ("NO", 1)
    assert kinds["multi_gpu_ddp"].distributed_type == "MULTI_GPU"
    fsdp = kinds["fsdp_qlora"]
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is False and fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"]
    # Precision is the training config's (--dtype); a second source of truth here would only disagree.
    assert {k.mixed_precision for k in kinds.values()} == {"no"}


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    from fine_tune_llm.model.loading import quantization_config

    cfg = make_config("tiny", dtype="bfloat16")  # explicit: auto is float32 on CPUs without native bf16
    assert quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with fsdp_qlora.yaml sets
    q = quantization_config(cfg)
    assert q.bnb_4bit_quant_storage == q.bnb_4bit_compute_dtype == torch.bfloat16
    # fp16 runs keep a block's float tensors in fp32 under FSDP (one dtype per flat parameter; model/loading.py)
    assert quantization_config(make_config("tiny", dtype="float16")).bnb_4bit_quant_storage == torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: rank 1 alone sees a bad loss and a Ctrl-C."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from fine_tune_llm.train.trainers import StopOnSigint, all_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    args = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    finite = all_ranks(rank == 0, args)  # rank 1's loss is NaN
    stop = StopOnSigint()
    stop.requested = rank == 1  # the signal reached rank 1 only
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.callback().on_step_end(args, None, control)
    Path(out, f"{rank}.json").write_text(json.dumps([finite, control.should_save, control.should_training_stop]))
    dist.destroy_process_group()


def test_ranks_agree_on_divergence_and_on_ctrl_c(tmp_path):
    """Else one rank would stop and the other wait forever in its next all-reduce."""
    torch.multiprocessing.spawn(_agree, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [[False, True, True]] * 2


@pytest.mark.slow
def test_two_process_ddp_on_cpu_shards_the_data_and_only_rank_0_writes(tmp_path):
    run_dir, metrics, imgs = tmp_path / "run", tmp_path / "metrics", tmp_path / "imgs"
    # 64 rows -> 50 train rows; 2 ranks x 4 rows x 6 steps = 48 rows: one epoch, so no row may repeat.
    cmd = [str(Path(REPO, ".venv", "bin", "accelerate")) if Path(REPO, ".venv", "bin", "accelerate").exists()
           else "accelerate", "launch", "--config_file", str(CONFIGS / "multi_gpu_ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "fine_tune_llm", "train", "--preset", "tiny",
           "--data-samples", "64", "--max-length", "96", "--batch-size", "4", "--max-steps", "6", "--save-steps", "3",
           "--logging-steps", "1", "--eval-steps", "100", "--output-dir", str(run_dir), "--metrics-dir", str(metrics),
           "--imgs-dir", str(imgs)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False, env=env(
        CUDA_VISIBLE_DEVICES="", FINE_TUNE_LLM_TRACE_ROWS="1", FINE_TUNE_LLM_TRACE_WRITES="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained 6 steps") == 1  # one report, from rank 0

    traces = [json.loads((run_dir / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(t["rank"], t["world_size"], t["backend"]) for t in traces] == [(0, 2, "gloo"), (1, 2, "gloo")]
    rows = [[r for s in t["steps"] for r in s["rows"]] for t in traces]
    assert [len(r) for r in rows] == [24, 24] and -1 not in rows[0] + rows[1]
    assert not set(rows[0]) & set(rows[1]) and len(set(rows[0] + rows[1])) == 48
    assert [s["step"] for s in traces[0]["steps"]] == [s["step"] for s in traces[1]["steps"]] == list(range(1, 7))

    def ours(paths):  # files and folders under the run, metrics and plot directories
        roots = tuple(str(p) for p in (run_dir, metrics, imgs))
        return {p for p in paths if p.startswith(roots)}

    by_rank1 = {str(Path(p).relative_to(tmp_path)) for p in ours(traces[1]["written"])}
    assert by_rank1 == {"run/trace", "run/checkpoint-3", "run/checkpoint-6"}  # its trace; mkdir for rng_state_1
    by_rank0 = {str(Path(p).relative_to(tmp_path)) for p in ours(traces[0]["written"])}
    assert {"run/config.yaml", "run/adapter", "run/trainer_state.json",
            "metrics/train_loss_run.csv", "imgs/loss_run.png"} <= by_rank0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and f".{traces[0]['pid']}." in events[0].name  # TensorBoard: rank 0's process only
    steps = [int(line.split(",")[1]) for line in (metrics / "train_loss_run.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 7))
    for step in (3, 6):  # every rank's RNG state is in, and vouched for by, the marker
        folder = run_dir / f"checkpoint-{step}"
        assert checkpoints.is_complete(folder)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(json.loads((folder / checkpoints.MARKER)
                                                                        .read_text())["files"])
