"""Several processes: sharded generation and scoring merge into exactly the single-process artifacts.

The fast tests check the sharding itself in one process (``generate_text(shard=...)`` split and merged by
hand equals the unsharded call). The ``distributed`` tests start 2 CPU processes with gloo, through
``torch.distributed.run`` and through ``accelerate launch`` with configs/accelerate/cpu_2proc.yaml, and
compare whole run directories:

- stage 1 under DDP: trains (one optimizer step per objective where one process takes two), saves once, and
  the ranks stay in step (same LoRA weights after several steps);
- sample (sampling, seeded), refine (greedy reviews and rewrites, implicit rewards), filter (rewards under
  the policies and the soups) and the evaluation sweeps of the stage-1 methods (greedy MOD and soups, scored
  by relevance on rank 0 and by a reward model split over the ranks) give byte-identical artifacts to a
  single process's. The stage-1 policies are random
  LoRA adapters, so greedy decoding of the tiny model says something other than newlines.
"""
import contextlib
import fcntl
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from sipo_fast.distributed import Dist, batched, generate_text

PROMPTS = ["How do I fix a flat tyre?", "Tell me a joke", "hi", "What is the capital of France?",
           "Write a haiku about rain", "Is it safe to eat raw eggs?", "Name three prime numbers"]


def random_adapters(root: Path, tokenizer, names=("helpful", "harmless")) -> list[Path]:
    """LoRA adapters with random A and B (init_lora_weights=False) on the tiny llama: distinct, non-trivial
    policies whose greedy outputs vary from prompt to prompt."""
    from peft import LoraConfig, get_peft_model

    from sipo_fast.models import tiny

    paths = []
    for seed, name in enumerate(names, start=1):
        base, _ = tiny("llama", tokenizer=tokenizer)
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"],
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths


def tiny_cost_model(root: Path, tokenizer) -> Path:
    """A random beaver-style score model (``model.*`` backbone + ``score_head``) on the tiny llama shape: a
    reward-model scorer (``beaver_cost:<path>``, batches of 8 in input order) that evaluation splits by its
    own batches across the ranks."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id)
    backbone = LlamaModel(config).eval()
    head = torch.nn.Linear(config.hidden_size, 1)
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"score_head.weight": head.weight.data, "score_head.bias": head.bias.data})
    root.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def lora_decoder(tokenizer, tmp_path_factory):
    from peft import PeftModel

    from sipo_fast import MODDecoder
    from sipo_fast.models import tiny

    paths = random_adapters(tmp_path_factory.mktemp("adapters"), tokenizer)
    base, _ = tiny("llama", tokenizer=tokenizer)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    return MODDecoder(model.eval(), tokenizer, adapter_names=["a", "b"])


@pytest.mark.parametrize("sampling,world", [(False, 2), (False, 3), (True, 3)])
def test_shards_of_generate_text_merge_into_the_unsharded_result(lora_decoder, sampling, world):
    w = [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [1.0, 0.0], [0.3, 0.7], [0.6, 0.4]]
    kw = dict(weights=w, max_new_tokens=6, batch_size=2, progress=False)
    if sampling:
        kw.update(do_sample=True, temperature=1.0, seed=11)
    full = lora_decoder.generate_text(PROMPTS, **kw)
    assert len({o.text for o in full}) > 2, "the fixture should make greedy outputs differ between prompts"
    merged = [None] * len(PROMPTS)
    covered = []
    for rank in range(world):
        part = lora_decoder.generate_text(PROMPTS, shard=(rank, world), **kw)
        mine = [i for i, o in enumerate(part) if o is not None]
        covered += mine
        for i in mine:
            merged[i] = part[i]
    assert sorted(covered) == list(range(len(PROMPTS)))  # every row decoded by exactly one rank
    assert [o.token_ids for o in merged] == [o.token_ids for o in full]
    assert [o.logprobs for o in merged] == [o.logprobs for o in full]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_merge_into_the_unsharded_result_on_cuda(tokenizer, tmp_path, dtype):
    """On a GPU (paged KV cache, Triton/flash kernels) a rank's batch decodes exactly as in one process."""
    from peft import PeftModel

    from sipo_fast import MODDecoder
    from sipo_fast.models import tiny

    paths = random_adapters(tmp_path, tokenizer)
    base, _ = tiny("llama", tokenizer=tokenizer)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    dec = MODDecoder(model.cuda().eval(), tokenizer, adapter_names=["a", "b"], compute_dtype=dtype)
    kw = dict(weights=[0.3, 0.7], max_new_tokens=8, batch_size=3, progress=False)
    full = dec.generate_text(PROMPTS, **kw)
    merged = [o for r in range(2) for o in dec.generate_text(PROMPTS, shard=(r, 2), **kw)]
    by_row = {i: o for i, o in enumerate(merged[:len(PROMPTS)]) if o is not None}
    by_row.update({i: o for i, o in enumerate(merged[len(PROMPTS):]) if o is not None})
    assert sorted(by_row) == list(range(len(PROMPTS)))
    assert [by_row[i].token_ids for i in range(len(PROMPTS))] == [o.token_ids for o in full]


def test_shard_argument_is_checked(lora_decoder):
    with pytest.raises(ValueError, match="shard must be"):
        lora_decoder.generate_text(PROMPTS[:2], weights=[0.5, 0.5], max_new_tokens=2, shard=(2, 2), progress=False)


def test_one_process_helpers_are_the_plain_calls(lora_decoder):
    one = Dist()
    assert not one.enabled and one.is_main and one.mine(5) == [0, 1, 2, 3, 4]
    assert Dist(rank=1, world=3).mine(8) == [1, 4, 7]
    assert one.on_main(lambda: 7) == 7 and one.broadcast("x") == "x" and one.all_gather(3) == [3]
    assert batched(7, 3, lambda a, b: (a, b), dist=one) == [(0, 3), (3, 6), (6, 7)]
    kw = dict(weights=[0.5, 0.5], max_new_tokens=4, batch_size=2, progress=False)
    assert [o.text for o in generate_text(lora_decoder, PROMPTS, dist=one, **kw)] == \
        [o.text for o in lora_decoder.generate_text(PROMPTS, **kw)]


def test_a_launched_process_tears_its_process_group_down_at_exit(tmp_path, monkeypatch):
    """Issue 17: left to interpreter teardown, the gloo process group could abort a rank that had finished
    (SIGABRT). ``current()`` under a launcher registers :func:`_destroy_process_group` to run at exit; it
    destroys a live group (one rank, gloo, file store) and does nothing once none is left."""
    import accelerate

    from sipo_fast import distributed

    class State:  # accelerate's PartialState as seen by rank 1 of 2 on CPU (no process group needed here)
        def __init__(self, cpu):
            self.process_index, self.num_processes, self.local_process_index, self.device = 1, 2, 1, None

    registered = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # _from_env sets it; restored (unset) afterwards
    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    assert distributed._from_env() == Dist(rank=1, world=2, local_rank=1)
    assert registered == [distributed._destroy_process_group]
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    distributed._destroy_process_group()
    assert not torch.distributed.is_initialized()
    distributed._destroy_process_group()  # nothing left: a no-op


# ------------------------------------------------------------------------------------------ two processes


_PORT_LOCKS = Path(tempfile.gettempdir()) / "sipo_fast_test_ports"


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (bind to port 0, outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


@contextlib.contextmanager
def _launch_port(rng=None):
    """A port for the launcher's rendezvous store, reserved until the launch has ended.

    The old way (bind port 0, close, pass the number on) picked from the kernel's ephemeral range, so between
    the close and the launcher's bind the kernel could give the same number to any other socket: a gloo
    listener or outgoing connection of a concurrent job, another test's bind(0). Here the port lies below
    that range (the kernel never assigns it by itself), away from the launchers' defaults (29400, 29500),
    and a lock file held for the whole launch keeps every other test process on this machine off it. A port
    already bound by an unrelated program is skipped; one taken later fails the launch at its bind, loudly.
    ``rng`` (tests): where the candidate ports come from (``randrange``).
    """
    rng, high = rng or random.Random(), _ephemeral_low()
    _PORT_LOCKS.mkdir(exist_ok=True)
    for _ in range(200):
        port = rng.randrange(10000, high)
        if 29000 <= port < 30000:
            continue
        with open(_PORT_LOCKS / f"{port}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another test's launch holds it
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use by something else
            yield port
            return
    raise RuntimeError(f"no free port below {high} after 200 tries")


def _env() -> dict:
    env = dict(os.environ)
    # Same thread count in every process of both runs (torchrun would set 1 for its workers anyway).
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               # A rank killed by a signal (SIGABRT, SIGSEGV) prints every thread's Python stack.
               PYTHONFAULTHANDLER="1",
               # gloo listens and connects on the loopback device whatever the host name resolves to.
               GLOO_SOCKET_IFNAME="lo")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


ACCELERATE_CPU = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"


def _launcher(kind: str, processes: int, port: int, log_dir: Path) -> list[str]:
    """The launcher's command up to the program: ``torch.distributed.run``, or ``accelerate launch`` with the
    shipped config (2 processes). Every rank's stdout/stderr also go to files under ``log_dir``."""
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--log-dir", str(log_dir), "--tee", "3"]
    assert kind == "accelerate" and processes == 2, (kind, processes)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
            "--main_process_port", str(port), "--log_dir", str(log_dir), "--tee", "3"]


def _launch(program: list[str], *, processes: int, log_dir: Path, launcher: str = "torchrun", timeout: int = 420,
            env=None, check: bool = True) -> subprocess.CompletedProcess:
    """``python <program>`` (``-m module args`` or ``script args``) in one process, or under the launcher with
    ``processes`` ranks on a port reserved until it has ended (:func:`_launch_port`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (_launch_port() if processes > 1 else contextlib.nullcontext()) as port:
        cmd = [*_launcher(launcher, processes, port, log_dir)] if processes > 1 else [sys.executable]
        cmd += program
        res = subprocess.run(cmd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, _failure(cmd, res, log_dir)
    return res


def _failure(cmd: list[str], res: subprocess.CompletedProcess, log_dir: Path) -> str:
    """The command, its exit code and the launcher's stderr tail, then the tail of each rank's own stderr
    (the launcher's summary alone says only which rank died, and by which signal)."""
    parts = [f"{' '.join(cmd)}\nexited {res.returncode}; stdout (tail):\n{res.stdout[-1500:]}\n"
             f"stderr (tail):\n{res.stderr[-3000:]}"]
    for log in sorted(log_dir.rglob("stderr.log")):
        parts.append(f"----- local rank {log.parent.name} ({log}):\n{log.read_text(errors='replace')[-5000:]}")
    return "\n".join(parts)


def _cli(args: list[str], *, processes: int, logs: Path, launcher: str = "torchrun", **kwargs):
    """``sipo-fast <args>`` in one process or under torch.distributed.run / accelerate launch; the ranks' logs go
    to a fresh folder under ``logs``."""
    logs.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=logs))
    return _launch(["-m", "sipo_fast.cli", *args], processes=processes, log_dir=log_dir, launcher=launcher, **kwargs)


class _Ports:
    """A stand-in for ``random.Random`` that proposes the given ports in order."""

    def __init__(self, *ports: int):
        self.ports = iter(ports)

    def randrange(self, low: int, high: int) -> int:
        return next(self.ports)


def test_launch_ports_lie_outside_the_kernels_range_and_are_reserved_while_held():
    """The kernel picks bind(0) ports from ip_local_port_range, so a launch port lies below it and off the
    launchers' defaults; while one launch holds a port, a second one proposed the same port (and then a
    launcher default, and a port some program has bound) moves on to the next free one."""
    low = _ephemeral_low()
    with _launch_port() as spare, _launch_port() as busy:
        pass  # two free ports below the range, released again
    for port in (spare, busy):
        assert 10000 <= port < low and not 29000 <= port < 30000, port
    with socket.socket() as other, _launch_port() as held:
        other.bind(("127.0.0.1", busy))  # an unrelated program holds `busy`
        with _launch_port(rng=_Ports(held, 29500, busy, spare)) as second:
            assert second == spare
        with socket.socket() as s:
            s.bind(("127.0.0.1", held))  # reserved by lock only: free for the launcher to bind


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_killed_by_a_signal_shows_its_own_stderr_in_the_failure(tmp_path):
    """A rank that aborts (SIGABRT, as in issue 17) fails the launch, and the failure message carries that
    rank's own stderr (its last words and the faulthandler stack), not only the launcher's summary."""
    script = tmp_path / "abort.py"
    script.write_text("import os, sys\n"
                      "if os.environ['RANK'] == '0':\n"
                      "    print('rank 0 last words', file=sys.stderr, flush=True)\n"
                      "    os.abort()\n")
    with pytest.raises(AssertionError) as failed:
        _launch([str(script)], processes=2, log_dir=tmp_path / "logs")
    message = str(failed.value)
    assert "exited 1" in message and "----- local rank 0" in message
    rank0 = message.split("----- local rank 0", 1)[1]
    assert "rank 0 last words" in rank0 and "Fatal Python error: Aborted" in rank0


def _files(stage_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(stage_dir).as_posix(): p.read_bytes() for p in sorted(stage_dir.rglob("*"))
            if p.is_file() and p.relative_to(stage_dir).parts[0] != "logs"}


@pytest.mark.distributed
@pytest.mark.slow
def test_align_trains_data_parallel_on_two_processes(tmp_path):
    out = tmp_path / "ddp"
    _cli(["align", "--preset", "smoke", "--output-dir", str(out), "--no-progress"], processes=2,
         logs=tmp_path / "logs")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"align"}
    assert json.loads((out / "align" / "logs" / "timing.json").read_text())["processes"] == 2
    for obj in ("helpful", "harmless"):
        policy = out / "align" / "policies" / obj
        assert (policy / "adapter_model.safetensors").exists() and not list(policy.glob(".*"))
        steps = [r for r in json.loads((policy / "train_metrics.json").read_text()) if "loss" in r]
        # 12 training pairs at 6 per device: one process takes 2 optimizer steps, two processes take 1.
        assert len(steps) == 1, steps
    # One process writes: no stray temporary or scratch directories left by the other rank.
    assert sorted(p.name for p in out.iterdir() if p.name not in (".work", ".lock")) == ["align", "config.yaml",
                                                                                        "logs", "manifest.json"]
    assert not any((out / ".work").iterdir())


_SYNC_SCRIPT = """
import json, sys
from pathlib import Path
from sipo_fast.pipeline import preset
from sipo_fast.pipeline.context import Context
from sipo_fast.distributed import current
from sipo_fast.pipeline.policies import preference_pairs, train, training_args
from sipo_fast.pipeline.rundir.directory import RunDir
dist, out = current(), Path(sys.argv[1])
cfg = preset("smoke").override(["align.learning_rate=1e-2", "align.epochs=2", "align.batch_size=2"])
ctx = Context(cfg, RunDir(out), progress=False)
args = training_args(ctx, cfg.align, out / "scratch", evaluate=False, loss_type=["sigmoid"], objective_names=["helpful"])
model, history = train(ctx, ctx.load_base(), preference_pairs(ctx.split["train"], "helpful"), args=args)
lora = {n: p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_" in n}
steps = sum(1 for row in history if "loss" in row)
(out / f"rank{dist.rank}.json").write_text(json.dumps({"world": dist.world, "steps": steps, "lora": lora}))
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_training_keeps_the_ranks_in_step(tmp_path):
    """Each rank trains on its half of the pairs; DDP averages the gradients, so after several steps at a
    large learning rate the two ranks still hold the same LoRA weights (unsynchronised ranks would not).

    Issue 17: under load rank 0 sometimes died with SIGABRT after both ranks had written their results; its
    stderr (now in the failure message) read ``terminate called without an active exception`` with no Python
    frame left: a C++ object dying in interpreter finalisation, most likely the process group, which nothing
    destroyed. Now ``current()`` destroys it at exit (``distributed._destroy_process_group``). Checked on the
    2-core machine, back to back, no retries, while two ``python3 -c "while True: pass"`` loops and other jobs ran:

        for i in $(seq 30); do .venv/bin/python -m pytest -q -p no:cacheprovider -m distributed \\
            tests/test_distributed.py -k keeps_the_ranks_in_step || echo FAIL $i; done

    before the teardown fix 1 failure in 50 (that SIGABRT; load 5.8-15.4), after it 0 in 50: 30 at load 6.7-11.3
    alongside a run of the whole distributed file and of ``-m "not slow"``, then 20 (seq 20) beside one busy loop
    on an otherwise quiet machine, load 1.3-3.6 (2026-12-04).
    """
    script = tmp_path / "sync.py"
    script.write_text(_SYNC_SCRIPT)
    _launch([str(script), str(tmp_path)], processes=2, log_dir=tmp_path / "logs")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 6  # 12 pairs, 2 per device on 2 ranks: 3 steps per epoch, 2 epochs
    assert r0["lora"] and r0["lora"] == r1["lora"]
    assert any(v != 0.0 for k, v in r0["lora"].items() if "lora_B" in k)  # B starts at zero: it trained


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_write_the_single_process_artifacts(tmp_path, tokenizer):
    policies = random_adapters(tmp_path / "policies", tokenizer)
    cost = tiny_cost_model(tmp_path / "cost", tokenizer)
    overrides = [f"align.policies=[{policies[0]},{policies[1]}]", "data.max_rows=32", "data.max_conflict_prompts=7",
                 # sampled candidates (seeded per batch), several decoding and scoring batches per rank
                 "sample.do_sample=true", "sample.batch_size=2", "refine.batch_size=3", "filter.batch_size=5",
                 "eval.batch_size=3", "eval.num_prompts=5", "eval.baselines=[mod,soups]",
                 # one scorer that rank 0 runs (relevance), one split over the ranks (a reward model)
                 f"eval.scorers=[relevance,beaver_cost:{cost}]"]
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"p{n}"
        _cli(["run", "--preset", "smoke", "--output-dir", str(runs[n]), "--no-progress", *overrides], processes=n,
             logs=tmp_path / "logs", launcher="accelerate")
    one, two = runs[1], runs[2]
    m1, m2 = (json.loads((r / "manifest.json").read_text())["stages"] for r in (one, two))
    for stage in ("align", "sample", "refine", "filter"):
        assert _files(one / stage) == _files(two / stage), stage
        assert m1[stage]["artifact"] == m2[stage]["artifact"], stage
        assert m1[stage]["fingerprint"] == m2[stage]["fingerprint"], stage
    assert json.loads((two / "sample" / "logs" / "timing.json").read_text())["processes"] == 2
    cands = [json.loads(line) for line in (one / "refine" / "candidates.jsonl").read_text().splitlines()]
    assert len({c["candidate"] for c in cands}) > 3 and len({c["rewrite"] for c in cands}) > 1  # not trivial
    # Fine-tuning ran data-parallel (not compared: DDP sums gradients in another order); the evaluation sweeps
    # of the methods built on stage 1 alone are the single-process ones (the run directory's name aside).
    assert set(m2) == {"align", "sample", "refine", "filter", "finetune", "eval"}
    for method in ("mod", "soups"):
        a, b = (json.loads((r / "eval" / "sweeps" / f"{method}.json").read_text()) for r in (one, two))
        assert a["meta"].pop("run_dir") != b["meta"].pop("run_dir")
        assert a == b, method
        assert len({t for row in a["responses"] for t in row}) > 2
        assert a["objectives"] == ["relevance", "beaver_cost"]
        assert len({round(x[1], 6) for row in a["scores"] for x in row}) > 8  # > one batch of distinct costs


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_two_process_stage_resumes_to_the_single_process_artifact(tmp_path, tokenizer):
    """Parts are whole (rank 0 writes a batch's candidates once every rank's share is gathered), so a
    two-process sample stage killed after its first part resumes, here on two processes again, and ends with
    the artifact of an uninterrupted single process."""
    policies = random_adapters(tmp_path / "policies", tokenizer)
    common = ["--preset", "smoke", "--no-progress", f"align.policies=[{policies[0]},{policies[1]}]",
              "data.max_rows=32", "data.max_conflict_prompts=7", "sample.batch_size=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _cli(["align", "--output-dir", str(one), *common], processes=1, logs=tmp_path / "logs")
    shutil.copytree(one, two)
    _cli(["sample", "--output-dir", str(one), *common], processes=1, logs=tmp_path / "logs")
    crashed = _cli(["sample", "--output-dir", str(two), *common], processes=2, logs=tmp_path / "logs",
                   check=False, env={"SIPO_FAST_CRASH_AFTER": "sample:1"})
    assert crashed.returncode != 0
    assert [p.name for p in (two / ".work" / "sample" / "parts").iterdir()] == ["b0.jsonl"]
    assert "sample" not in json.loads((two / "manifest.json").read_text())["stages"]
    resumed = _cli(["sample", "--output-dir", str(two), *common], processes=2, logs=tmp_path / "logs")
    reused = [line for line in resumed.stderr.splitlines() if "saved by an interrupted run" in line]
    assert len(reused) == 1 and "parts/b0.jsonl" in reused[0], resumed.stderr[-3000:]
    assert _files(one / "sample") == _files(two / "sample")


def test_a_launched_rank_ends_after_its_exit_handlers_with_its_code(tmp_path):
    """end_process: under a launch (world > 1) the atexit handlers run (they flush trackers and tear the process
    group down), then the process ends with the given code, skipping interpreter finalisation; with one process
    it does nothing."""
    code = textwrap.dedent(f"""
        import atexit, sys
        from pathlib import Path
        from sipo_fast.distributed import Dist, end_process, set_current
        atexit.register(lambda: Path({str(tmp_path / 'flushed')!r}).write_text("yes"))
        end_process(0)                      # one process: a no-op
        print("still here", flush=True)
        set_current(Dist(rank=1, world=2))
        end_process(3)
        print("not reached", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == ["still", "here"]
    assert (tmp_path / "flushed").read_text() == "yes"
