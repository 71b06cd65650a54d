"""Launch scripts (syntax, shellcheck when installed, --dry-run output) and the memory planner on the
Qwen2.5-VL-3B shapes against hand arithmetic."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["tools/launch_tpu_pod.sh", "tools/launch_slurm.sh"]
GRPO = ["python", "-m", "vlaa_jax.main", "--config", "configs/grpo.py:vlaa_thinker_3b",
        "--workdir", "/shared/runs/grpo 3b"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _dry(script, *args):
    out = subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_tpu_pod_dry_run_prints_copy_install_and_run_on_all_workers():
    out = _dry("tools/launch_tpu_pod.sh", "--tpu", "vlaa-v5p-32", "--zone", "us-east5-a",
               "--project", "my-proj", "--dry-run", "--", *GRPO)
    lines = [l for l in out.splitlines() if l.startswith("+ ")]
    assert len(lines) == 5
    # The working tree is shipped (uncommitted edits too), said on stderr; --head ships the last commit.
    assert lines[0].startswith("+ git -C") and "ls-files -z --cached --others --exclude-standard | tar" in lines[0]
    assert all("--worker=all" in l and "--zone us-east5-a" in l and "--project my-proj" in l
               for l in lines[1:])
    # jax[tpu] pinned to setup.py's range; one interpreter name (python3) for pip
    assert "jax\\[tpu\\]\\>=0.10.2\\,\\<0.13" in lines[3] and "python3\\ -m\\ pip\\ install\\ -q\\ -e\\ ." in lines[3]
    assert lines[3].count("python3\\ -m\\ pip") == 2 and "python\\ -m" not in lines[3]
    head = subprocess.run(["bash", "tools/launch_tpu_pod.sh", "--tpu", "t", "--zone", "z", "--head", "--dry-run",
                           "--", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "archive" in head.stdout.splitlines()[0] and "HEAD" in head.stderr and "NOT shipped" in head.stderr
    assert "configs/grpo.py:vlaa_thinker_3b" in lines[4] and "grpo\\\\\\ 3b" in lines[4]
    assert len(_dry("tools/launch_tpu_pod.sh", "--tpu", "t", "--zone", "z", "--no-copy",
                    "--no-install", "--dry-run", "--", "true").splitlines()) == 1
    bad = subprocess.run(["bash", "tools/launch_tpu_pod.sh", "--dry-run", "--", "true"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--tpu and --zone are required" in bad.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_help_is_the_header(script):
    out = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--dry-run" in out and "set -euo" not in out and not out.startswith("#!")


def test_slurm_dry_run_prints_sbatch_script_that_runs(tmp_path):
    out = _dry("tools/launch_slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "h100",
               "--dry-run", "--", *GRPO)
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=8" in out
    assert "#SBATCH --partition=h100" in out and "VLAA_COORDINATOR_ADDRESS" in out
    assert out.rstrip().endswith("+ sbatch <the script above>")
    # the srun line hands every argument through intact and sets the process id
    srun = next(l for l in out.splitlines() if l.startswith("srun "))
    probe = _dry("tools/launch_slurm.sh", "--dry-run", "--", "python3", "-c",
                 "import os, sys; print(os.environ['VLAA_PROCESS_ID'], sys.argv[1:])", "a b", "it's")
    line = next(l for l in probe.splitlines() if l.startswith("srun "))
    (tmp_path / "line.sh").write_text(line.replace("srun --ntasks-per-node=1 ", "", 1))
    ran = subprocess.run(["bash", str(tmp_path / "line.sh")], env={**os.environ, "SLURM_PROCID": "3"},
                         capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "3 ['a b', \"it's\"]"
    assert "grpo\\ 3b" in srun


def _hand_count_3b() -> tuple[int, int]:
    """Qwen2.5-VL-3B parameters from its config.json numbers: (total, vision)."""
    d, f, v, layers, hq, hkv = 2048, 11008, 151936, 36, 16 * 128, 2 * 128
    attn = d * hq + hq + 2 * (d * hkv + hkv) + hq * d
    text = v * d + layers * (attn + 3 * d * f + 2 * d) + d            # tied lm_head
    D, F, depth, wide = 1280, 3420, 32, 1280 * 4
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 3 * D * F + 2 * F + D
    vision = 1176 * D + depth * block + D + (wide * wide + wide) + (wide * d + d)
    return text + vision, vision


def test_plan_memory_on_3b_shapes_matches_hand_arithmetic():
    from tools import plan_memory
    total, vision = _hand_count_3b()
    assert 3.7e9 < total < 3.8e9
    config = plan_memory.builtin_config("3b", dtype="bfloat16", param_dtype="float32")
    p = plan_memory.plan(config, (1, 8, 1), rules="fsdp", rows=8, seq_len=1024, patches=256,
                         reference_model=True, activations=False)
    assert p["params"] == total and p["vision_params"] == vision
    dev = p["bytes_per_device"]
    assert dev["params"] == pytest.approx(4 * total / 8, rel=2e-3)   # fp32, all but norms sharded 8x
    assert dev["grads"] == dev["params"]
    assert dev["optimizer"] == pytest.approx(2 * dev["params"], rel=1e-6)  # Adam mu + nu
    assert dev["reference_model"] == pytest.approx(dev["params"] / 2, rel=1e-6)   # bf16 copy
    # the largest attention: the text's [8 rows, 16 heads, 1024, 1024] split over the 8 data-parallel
    # devices; the vision tower attends per image (8 rows of 256 patches), not over all 8 * 256 at once
    from vlaa_jax import sharding as shd
    dp = shd.data_parallel_size(shd.make_mesh((1, 8, 1)), shd.resolve_rules("fsdp"))
    assert dev["attention_scores"] == max(4 * 8 * 16 * 1024 ** 2 // dp, 4 * 16 * 8 * 256 ** 2)
    assert plan_memory._vision_rows(config, 8, 1, 256) == (8, 256)
    tokens = 8 * 1024
    flops = p["flops_per_step"]["model_flops"]
    assert 6 * (total - vision) * tokens < flops < 1.3 * 6 * total * tokens
    # tensor parallelism splits the heads/MLP/vocab dims further; dp replicates everything
    tp = plan_memory.plan(config, (1, 2, 4), rows=8, seq_len=1024, activations=False)
    assert tp["bytes_per_device"]["params"] == pytest.approx(4 * total / 8, rel=2e-2)
    dp = plan_memory.plan(config, (8, 1, 1), rules="dp", rows=8, seq_len=1024, activations=False)
    assert dp["bytes_per_device"]["params"] == 4 * total


def test_plan_memory_components_from_trainer_config_and_activations():
    """The component plan of one update micro-batch (`plan_from_trainer_config`; the command line's
    --model / --hf_config path): activations scale with the rows."""
    from tools import plan_memory
    config = plan_memory.load_trainer_config(os.path.join(ROOT, "configs/sft.py:demo"))
    small = plan_memory.plan_from_trainer_config(config, (1, 4, 1))
    assert small["micro_batch"]["rows"] == 4 and small["micro_batch"]["seq_len"] == 256
    assert small["bytes_per_device"]["activations"] > 0
    big = plan_memory.plan_from_trainer_config(config, (1, 4, 1), rows=8)
    ratio = big["bytes_total"]["activations"] / small["bytes_total"]["activations"]
    assert 1.8 < ratio < 2.2   # activations scale with the rows of the micro-batch
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        plan_memory.main(["--config", os.path.join(ROOT, "configs/sft.py:demo"), "--mesh", "1,8,1"])
