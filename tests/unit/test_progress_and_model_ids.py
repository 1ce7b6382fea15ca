"""Issue 19: the progress bar moves with the work (tokens), and Hugging Face model ids resolve from
the local cache only, never downloading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


class _Recorder:
    """Stands in for TokenProgress: keeps every update the loop sends."""

    instances: list[_Recorder] = []

    def __init__(self, desc, enabled, *args, **kwargs):
        self.enabled = True
        self.counts_completions = False
        self.updates: list[dict] = []
        _Recorder.instances.append(self)

    def update(self, *, force=False, **counters):
        self.updates.append(counters)

    def close(self):
        pass


def test_progress_counts_prefill_before_any_request_finishes_and_ends_at_the_plan(monkeypatch, tiny_model_factory):
    import batchllm.llm
    from batchllm import LLM, SamplingParams
    from batchllm.prefix import plan_prefix_sharing

    monkeypatch.setattr(batchllm.llm, "TokenProgress", _Recorder)
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_num_batched_tokens=32,
              max_model_len=512)
    shared = list(range(10, 90))
    prompts = [shared + [100 + i, 200 + i] for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=i % 2 == 0) for i in range(6)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    updates = _Recorder.instances[-1].updates
    plan = plan_prefix_sharing(prompts)
    budget = sum(sp.max_tokens for sp in params)
    first = updates[0]
    assert first["requests_done"] == 0 and first["input_tokens"] > 0, "the bar moves during the prefill"
    assert first["planned_tokens"] == plan.prefill_tokens + budget
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    last = updates[-1]
    assert last["requests_done"] == last["requests_total"] == 6
    assert last["output_tokens"] == generated and last["input_tokens"] == plan.prefill_tokens
    assert last["input_tokens"] + last["output_tokens"] == last["planned_tokens"], \
        "early stops gave their unused budget back: the bar ends at 100%"
    done = [u["input_tokens"] + u["output_tokens"] for u in updates]
    assert done == sorted(done) and len(set(done)) > 3, "it advances step by step"


def test_token_progress_shows_rates_and_requests(monkeypatch):
    import batchllm.progress
    from batchllm.progress import TokenProgress

    monkeypatch.setattr(batchllm.progress, "draws_in_place", lambda stream: True)  # (a terminal's bar)
    progress = TokenProgress("tokens", enabled=True, min_interval_s=0.0)
    progress.update(input_tokens=300, output_tokens=20, planned_tokens=1000, requests_done=1, requests_total=8)
    assert (progress.bar.n, progress.bar.total) == (320, 1000)
    assert "1/8 req" in progress.bar.postfix and "in " in progress.bar.postfix and "out " in progress.bar.postfix
    progress.update(input_tokens=900, output_tokens=200, planned_tokens=1000, requests_done=8, requests_total=8)
    assert progress.bar.total == 1100, "recomputation beyond the plan raises the total instead of overflowing"
    progress.close()


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_on_a_stderr_that_is_no_terminal_is_a_plain_line_every_few_seconds(monkeypatch, capsys):
    """tqdm redrew the whole bar after a \\r every 0.2 s into a redirected stderr: 19.7 KB from a 35 s run, tens of MB
    in a long Slurm job's log. There (a file, a pipe: capsys' stderr here) each update LOG_INTERVAL_S after the last
    line writes one line with the bar's counters, and the end writes the last one; a terminal keeps the bar."""
    import batchllm.progress
    from batchllm.progress import TokenProgress

    interval = getattr(batchllm.progress, "LOG_INTERVAL_S", 5.0)
    assert 2 <= interval <= 30
    clock = _Clock()
    monkeypatch.setattr(batchllm.progress.time, "perf_counter", clock)
    progress = TokenProgress("tokens", enabled=True)
    counters = dict(planned_tokens=4000, requests_total=8)
    for step in range(1, 81):  # 80 updates, 0.25 s apart: 20 s
        clock.now += 0.25
        progress.update(input_tokens=25 * step, output_tokens=12 * step, requests_done=step // 20, **counters)
    progress.update(input_tokens=2000, output_tokens=1000, requests_done=8, force=True, **counters)
    progress.update(input_tokens=2000, output_tokens=1000, requests_done=8, force=True, **counters)
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 20 / interval + 1, lines  # one per interval, then the end once
    assert lines[0].startswith("tokens: ") and "/8 req, in " in lines[0] and " tok/s, out " in lines[0]
    assert lines[-1] == "tokens: 75% 3.00k/4.00k tok, 8/8 req, in 100 tok/s, out 50 tok/s [00:20<00:06]"

    class Terminal:
        def isatty(self):
            return True

    assert progress.bar is None
    assert batchllm.progress.draws_in_place(Terminal()) and not batchllm.progress.draws_in_place(object())
    monkeypatch.setattr(batchllm.progress, "draws_in_place", lambda stream: True)
    bar = TokenProgress("tokens", enabled=True)
    assert bar.bar is not None, "a terminal keeps tqdm's bar"
    bar.close()
    capsys.readouterr()
    off = TokenProgress("tokens", enabled=False)
    off.update(input_tokens=1, output_tokens=0, force=True, requests_done=0, **counters)
    off.close()
    assert capsys.readouterr().err == "", "--no-progress (use_tqdm=False) writes nothing"


def test_use_tqdm_may_be_the_bar_maker(default_llm):
    """vLLM's use_tqdm takes a callable that makes the bar (`functools.partial(tqdm, leave=False)`); it was
    taken as True and the default bar drawn. As vLLM's, that bar counts completions: a prompt of n = 3 is three
    (it counted prompts, ending at 2 of 2 where vLLM's ends at 4 of 4)."""
    from tqdm import tqdm

    from batchllm import SamplingParams

    made, totals = [], []

    def make_bar(**kwargs):
        totals.append(kwargs["total"])
        made.append(tqdm(**kwargs, leave=False))
        return made[-1]

    params = [SamplingParams(temperature=0, max_tokens=2), SamplingParams(n=3, seed=1, max_tokens=2)]
    outputs = default_llm.generate(["Hi", "Hello"], params, use_tqdm=make_bar)
    assert [len(o.outputs) for o in outputs] == [1, 3] and len(made) == 1
    assert totals == [4], "made with the call's completion count as its total, as vLLM makes it (it was 0, then 2)"
    assert made[0].n == made[0].total == 4, (
        "the bar the callable made is the one that moved, to its end, counting completions as vLLM's does (it "
        "counted tokens under vLLM's label 'Processed prompts', then prompts)")
    assert made[0].desc == "Processed prompts" and "est. speed input" in made[0].postfix


def test_a_data_parallel_bar_counts_prefill_computed_as_one_engines_does(monkeypatch):
    """The parent of data-parallel engines sees finished prompts only. Its bar counted each prompt's whole length
    as input, where one engine's counts the prefill computed (the tokens read from a shared prefix are not):
    the same job showed 2.23k tokens under -dp 2 and 1.49k on one engine. It now takes a prompt's cached tokens
    off both the input and the plan; a vLLM bar maker's bar counts completions."""
    import types

    import batchllm.progress
    from batchllm.parallel.data_parallel import _JobProgress

    monkeypatch.setattr(batchllm.progress, "draws_in_place", lambda stream: True)

    def output(prompt_len, cached, outputs):
        return types.SimpleNamespace(prompt_token_ids=list(range(prompt_len)), num_cached_tokens=cached,
                                     outputs=[types.SimpleNamespace(token_ids=[1] * k) for k in outputs])

    finished = [output(100, 0, [10]), output(100, 90, [20, 20]), output(100, None, [5])]  # (None: not counted)
    progress = _JobProgress("tokens", True, budgets=[10, 40, 10], prompt_tokens=300, completions=4)
    for index, out in enumerate(finished):
        progress.finished(index, out)
    progress.close()  # (its last update: the others may come closer together than the bar redraws)
    bar = progress.bar.bar
    assert (bar.n, bar.total) == ((100 + 10 + 100) + (10 + 40 + 5), 360 - 90 - 5), (
        "prefill computed + output, of the plan less what was read from the cache and the budget given back (the "
        "bar showed the prompts' 300 tokens as input)")
    assert "3/3 req" in bar.postfix
    made = []
    progress = _JobProgress("Processed prompts", lambda **kw: made.append(tqdm_bar(**kw)) or made[-1],
                            budgets=[10, 40, 10], prompt_tokens=300, completions=4)
    for index, out in enumerate(finished):
        progress.finished(index, out)
    progress.close()
    assert (made[0].n, made[0].total) == (4, 4), "a vLLM bar counts completions"


def tqdm_bar(**kwargs):
    from tqdm import tqdm

    return tqdm(**kwargs, leave=False)


def _hf_cache_with(cache, repo_id: str, model_dir) -> str:
    """Lay `model_dir` out as the Hugging Face cache does: models--org--name/snapshots/<hash>/ + refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, f), snapshot / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(snapshot)


def test_a_model_id_resolves_from_the_local_cache_and_a_missing_one_says_how_to_get_it(
        tmp_path, monkeypatch, tiny_model_factory):
    import huggingface_hub.constants

    from batchllm import LLM, SamplingParams
    from batchllm.inputs import local_model_dir
    from batchllm.models.spec import ModelLoadError

    cache = tmp_path / "hub"
    snapshot = _hf_cache_with(cache, "tiny-org/tiny-llama", tiny_model_factory("llama"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and nothing may try the network
    assert str(local_model_dir("tiny-org/tiny-llama")) == snapshot
    llm = LLM("tiny-org/tiny-llama", device="cpu", dtype="float32")
    assert str(llm.model_dir) == snapshot
    assert llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2),
                        use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ModelLoadError, match="hf download tiny-org/absent") as missing:
        local_model_dir("tiny-org/absent")
    assert ("not in the Hugging Face cache" in str(missing.value)
            or "nor in the Hugging Face cache" in str(missing.value))
    assert str(local_model_dir(tmp_path / "no" / "such" / "dir")).endswith("no/such/dir"), \
        "a path is left for read_model_spec to name"


def test_cli_plan_with_a_cached_model_id_and_a_missing_one(tmp_path, tiny_model_factory):
    cache = tmp_path / "hub"
    _hf_cache_with(cache, "tiny-org/tiny-llama", tiny_model_factory("llama"))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Hello there"}) + "\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "batchllm.cli", "plan", "-i", str(src), "--model"]
    r = subprocess.run(cmd + ["tiny-org/tiny-llama"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "requests             1" in r.stdout, r.stderr
    r = subprocess.run(cmd + ["tiny-org/absent"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "hf download tiny-org/absent" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_download_dir_is_refused_with_how_to_use_the_models_it_holds(tmp_path, monkeypatch, tiny_model_factory,
                                                                     capsys):
    """`--download-dir /data/models` was refused with "nothing is downloaded ..." and no way to the models a vLLM
    user keeps there (vLLM downloads into it as the Hugging Face cache lays models out). The refusal says how:
    HF_HUB_CACHE pointed at it, or the model's directory there; and that works."""
    import huggingface_hub.constants

    from batchllm.cli import main
    from batchllm.inputs import local_model_dir

    with pytest.raises(SystemExit) as exit_:
        main(["run", "-i", "in.jsonl", "-o", "o.jsonl", "--download-dir", "/data/models"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --download-dir: '/data/models' is not supported: nothing is downloaded" in err
    assert "HF_HUB_CACHE=/data/models for --download-dir /data/models" in err
    assert "or give the model as its directory there" in err
    with pytest.raises(TypeError, match="HF_HUB_CACHE=/data/models"):
        from batchllm.options import engine_config

        engine_config(download_dir="/data/models")
    downloads = tmp_path / "models"  # as vLLM's --download-dir holds a model it downloaded
    snapshot = _hf_cache_with(downloads, "tiny-org/tiny-llama", tiny_model_factory("llama"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(downloads))  # HF_HUB_CACHE=DIR
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert str(local_model_dir("tiny-org/tiny-llama")) == snapshot == str(local_model_dir(snapshot))


def test_request_ids_count_up_over_the_llms_life_as_vllms(default_llm):
    """vLLM numbers requests "0", "1", ... in input order across calls; ours read "call-index" ("0-0"), which
    scripts sorting by int(request_id) could not parse."""
    from batchllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1)
    first = [int(o.request_id) for o in default_llm.generate(["a", "b", "c"], params, use_tqdm=False)]
    chat = default_llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False)[0]
    assert first == list(range(first[0], first[0] + 3)) and int(chat.request_id) == first[-1] + 1


def test_the_converted_default_model_is_readable_as_the_umask_allows(tmp_path):
    """safetensors wrote model.safetensors owner-only (0600): a shared cache's other users could not load it."""
    from batchllm.models.default_model import files_as_the_umask_says

    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    config.write_text("{}")
    old = os.umask(0o022)
    try:
        files_as_the_umask_says(tmp_path)
    finally:
        os.umask(old)
    assert (weights.stat().st_mode & 0o777, config.stat().st_mode & 0o777) == (0o644, 0o644)
