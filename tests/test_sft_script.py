"""The SFT default run end to end: it finishes, the loss falls, and the exported Hugging Face
folder loads with transformers and gives the same logits as our sharded loader."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_metrics, torchrun


@pytest.mark.slow
def test_default_sft_run_learns_and_exports(sft_tiny):
    logged = read_metrics(sft_tiny)
    first, last = logged[0]["train/loss_per_token"], logged[-1]["train/loss_per_token"]
    assert last < 0.5 * first, (first, last)
    assert all(0 <= m["perf/padding_fraction"] < 1e-9 for m in logged)  # packed rows: no padding at all
    model = AutoModelForCausalLM.from_pretrained(sft_tiny, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(sft_tiny)
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    assert (sft_tiny / "generation_config.json").exists() and not list(sft_tiny.glob("*.bin"))


@pytest.mark.slow
def test_help_lists_original_flags():
    out = torchrun("train/sft.py", ["--help"], nproc=1).stdout
    for flag in ("--model_name_or_path", "--dataset_mixer_list", "--reduce_loss", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--use_flash_attn", "--with_tracking", "--cpu_offload"):
        assert flag in out, flag


def test_two_nodes_without_a_shared_cache(tmp_path):
    """Two torchrun agents on localhost stand in for two nodes, each with its own TULU_CACHE (a node-local
    disk): rank 0's tokenized cache is invisible on node 1, which tokenizes its own copy; both train."""
    import socket
    import subprocess

    from conftest import REPO, TORCHRUN, script_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in (0, 1):
        env = dict(script_env(), TULU_CACHE=str(tmp_path / f"cache{node}"))
        cmd = TORCHRUN + ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "train/sft.py"),
                          "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--max_seq_length", "128"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    assert "not visible on this node" in outs[1] and "not visible on this node" not in outs[0]
    for node in (0, 1):
        assert len(list((tmp_path / f"cache{node}" / "tokenized").iterdir())) == 1
    assert len(read_metrics(tmp_path / "out")) >= 1
