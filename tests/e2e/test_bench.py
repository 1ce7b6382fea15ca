"""`batchllm bench`: one engine per configuration over the same workload; the JSON report holds a
row per configuration with what each did. benchmarks/user_path.py (`run` against `bench`) on a tiny
model on the CPU."""

import json
import re
from pathlib import Path

import pytest

from batchllm.cli import main
from tests.helpers import benchmark_module, keys_attended


def test_bench_runs_each_configuration_on_the_same_workload(tiny_model_factory, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", tiny_model_factory("llama"), "--workload", "shared", "--shared", "48",
                 "--distinct", "8", "--degree", "4", "--requests", "12", "--output", "6",
                 "--configs", "sharing,nosharing", "--json-out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    sharing, nosharing = report["results"]
    assert [sharing["config"], nosharing["config"]] == ["sharing", "nosharing"]
    for row in (sharing, nosharing):
        assert row["num_requests"] == 12 and row["output_tokens"] == 12 * 6  # ignore_eos: exactly max_tokens
    # 3 groups of 4 share a 48-token prefix: sharing prefills each prefix once, no sharing 4 times
    assert nosharing["prefill_tokens_computed"] - sharing["prefill_tokens_computed"] == 3 * 3 * 48
    # keys attended (each computed token: its position + 1), positions 0 .. 48 + 8 + 6 - 2: with sharing the
    # prefix's 0 .. 47 once per group
    assert nosharing["attended_keys"] == 12 * keys_attended(0, 61)
    assert sharing["attended_keys"] == 3 * keys_attended(0, 48) + 12 * keys_attended(48, 61)
    assert report["kv_blocks"] > 0


def test_bench_on_the_cpu_sizes_a_left_out_workload_for_it_and_shows_progress(tiny_model_factory, tmp_path, capsys):
    """With no workload size given, bench on the CPU ran the GPU's 1,024 requests of 2,000 + 200 tokens (hours),
    printing nothing until a configuration ended: it now runs CPU sizes, says so naming the flags, and names
    each configuration's size on stderr as it starts, with a progress bar during the measured run."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", tiny_model_factory("llama"), "--device", "cpu", "--configs", "sharing",
                 "--warmup-requests", "1", "--json-out", str(out)]) == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["workload"] == "shared256-distinct32-degree16-n64" and row["output_tokens"] == 64 * 16
    err = capsys.readouterr().err
    assert ("on the CPU, a CPU-sized workload: --requests 64 --shared 256 --distinct 32 --output 16 (on a GPU: "
            "--requests 1024 --shared 2000 --distinct 200 --output 100)") in err
    assert ("configuration 'sharing' (1 of 1): shared256-distinct32-degree16-n64: 64 requests, 18,432 prompt "
            "tokens, 1,024 output tokens") in err
    assert "64/64 req" in err  # the measured run's bar
    assert "tokens: 100% " in err and "Processed prompts" not in err, "it counts tokens, not prompts"


def test_bench_output_is_tokens_and_a_file_name_there_points_to_json_out(capsys):
    """bench's --output is the output tokens per request; `bench --output results.json` (run's -o/--output is a
    file) failed with argparse's bare "invalid int value", and `bench -o results.json` named no way out."""
    for words, said in ((["--output", "results.json"], "argument --output: 'results.json' is not a number of tokens: "
                         "bench's --output is the output tokens per request (an integer); bench writes its results "
                         "as JSON with --json-out FILE"),
                        (["-o", "results.json"], "-o: bench writes its results as JSON with --json-out FILE")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", *words])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err, err
    from batchllm.cli import build_parser

    assert build_parser().parse_args(["bench", "--output", "7"]).output == 7


def test_bench_workload_sizes_a_user_gives_are_kept_and_gpu_defaults_are_the_papers():
    import argparse

    from batchllm.bench import fill_workload_sizes

    given = argparse.Namespace(requests=8, shared=None, distinct=None, output=None, prompt_len=None,
                               min_output=None, max_output=None)
    assert fill_workload_sizes(given, "cpu") == {"--shared": 256, "--distinct": 32, "--output": 16,
                                                 "--prompt-len": 256, "--min-output": 16, "--max-output": 64}
    assert given.requests == 8 and given.shared == 256
    gpu = argparse.Namespace(requests=None, shared=None, distinct=None, output=None, prompt_len=None,
                             min_output=None, max_output=None)
    assert fill_workload_sizes(gpu, "cuda") == {}
    assert vars(gpu) == dict(requests=1024, shared=2000, distinct=200, output=100, prompt_len=1024,
                             min_output=100, max_output=1000)


def test_user_path_runs_bench_first_and_run_on_the_written_requests(tiny_model_factory, tmp_path, monkeypatch):
    """benchmarks/user_path.py with its commands in this process: bench first by default (it warms
    the kernel caches), then `batchllm run` on the JSONL the script wrote, which holds the bench's
    workload (every line ran, each result exactly its max_tokens long: ignore_eos); --order swaps them."""
    user_path = benchmark_module("user_path")
    calls, results = [], []

    def cli(*args):
        calls.append(args[0])
        assert main(list(args)) == 0
        if args[0] == "run":
            lines = [Path(args[args.index(flag) + 1]).read_text().splitlines() for flag in ("-i", "-o")]
            results.append(([json.loads(line)["max_tokens"] for line in lines[0]],
                            [len(json.loads(line)["token_ids"]) for line in lines[1]]))
        return {"bench": 2.5, "run": 1.5}[args[0]]  # its process's seconds

    monkeypatch.setattr(user_path, "cli", cli)
    flags = ["--model", tiny_model_factory("llama"), "--workload", "shared", "--shared", "16", "--distinct", "4",
             "--degree", "2", "--requests", "4", "--output", "3", "--warmup-requests", "1"]
    summary = user_path.main([*flags, "--json-out", str(tmp_path / "summary.json"), "--", "--device", "cpu"])
    assert calls == ["bench", "run"]
    [(max_tokens, lengths)] = results
    assert max_tokens == lengths == [3] * 4
    assert summary["requests"] == 4 and summary["order"] == "bench,run" and summary["run_process_s"] == 1.5
    assert summary["engine_flags"] == ["--device", "cpu"]
    assert summary["run_engines"] == summary["bench_engines"] == 1  # the CPU: run keeps one engine
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    user_path.main([*flags, "--order", "run,bench", "--", "--device", "cpu"])
    assert calls[2:] == ["run", "bench"]


def test_triton_compile_count_sums_the_variants_of_batchllms_kernels(tmp_path, monkeypatch):
    """The bench's count of Triton compiles in a timed run: every compiled variant of every kernel in
    a batchllm module, over all devices (nothing compiles on the CPU, so the caches are filled here)."""
    import importlib.util
    import sys

    pytest.importorskip("triton")
    from batchllm.bench import triton_kernels_compiled

    source = tmp_path / "probe.py"
    source.write_text("import triton\n\n@triton.jit\ndef probe_kernel(x):\n    pass\n")
    spec = importlib.util.spec_from_file_location("batchllm._compile_probe", source)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    before = triton_kernels_compiled()
    monkeypatch.setitem(sys.modules, "batchllm._compile_probe", probe)
    probe.probe_kernel.device_caches = {0: ({"v1": 1, "v2": 2}, None, None, None, None), 1: ({"v1": 1},)}
    assert triton_kernels_compiled() == before + 3
    monkeypatch.setitem(sys.modules, "other._compile_probe", probe)  # outside batchllm: not counted twice
    assert triton_kernels_compiled() == before + 3


def test_bench_profile_counts_the_linear_flops_of_the_profiled_requests(tiny_model_factory, tmp_path):
    """`--profile-out` (on the CPU: op times) writes the time per kernel category and the linear layers'
    FLOPs over the profiled requests' tokens (`bench.linear_flops`): every sampled token is an output."""
    import re

    from batchllm.bench import linear_flops
    from batchllm.models.spec import read_model_spec

    model, out = tiny_model_factory("llama"), tmp_path / "profile.txt"
    code = main(["bench", "--model", model, "--workload", "shared", "--shared", "48", "--distinct", "8",
                 "--degree", "4", "--requests", "12", "--output", "6", "--configs", "sharing",
                 "--profile-out", str(out), "--profile-requests", "8"])
    assert code == 0
    text = out.read_text()
    assert "matmul" in text and "top kernels" in text
    computed, sampled, tflop = re.search(r"linear layers over (\d+) computed and (\d+) sampled tokens: (\S+) TFLOP",
                                         text).groups()
    assert int(sampled) == 8 * 6
    assert int(computed) >= 8 * (8 + 5)  # each request's own 8 prompt tokens and 5 decoded, at least
    assert float(tflop) == pytest.approx(linear_flops(read_model_spec(Path(model)), int(computed), 48) / 1e12,
                                         rel=1e-5)
    total = float(re.search(r"CPU op time (\S+) s", text).group(1))
    kinds = {k: (float(t), rest) for k, t, rest in re.findall(r"in (decode|prefill) steps: (\S+) s: (.*)", text)}
    assert set(kinds) == {"decode", "prefill"}  # 5 decode-only steps after the prompts
    assert all("matmul" in rest for _, rest in kinds.values())  # each step kind's range holds its own ops
    assert 0 < sum(t for t, _ in kinds.values()) <= total + 0.0015  # (each printed to the millisecond)


def test_attended_keys_do_not_depend_on_how_prefill_is_chunked(tiny_model_factory, tmp_path):
    """16-token steps split every prompt into chunks (and mix them with decodes): the keys the run's tokens
    attend are the same positions' as in whole-prompt steps."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", tiny_model_factory("llama"), "--workload", "shared", "--shared", "48",
                 "--distinct", "8", "--degree", "4", "--requests", "12", "--output", "6", "--configs", "sharing",
                 "--max-num-batched-tokens", "16", "--json-out", str(out)])
    assert code == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["mean_tokens_per_step"] <= 16 and row["num_steps"] > 12
    assert row["attended_keys"] == 3 * keys_attended(0, 48) + 12 * keys_attended(48, 61)


def test_run_workload_reports_the_runs_compute_limit_at_a_given_peak(tiny_model_factory):
    """With a matmul peak (measured on CUDA; given here), a run reports its compute limit: its linear and
    attention FLOPs at that peak, as requests/s, and the share of it its wall time reached."""
    from batchllm import LLM
    from batchllm.bench import attention_flops, linear_flops, run_workload, shared_prefix_workload

    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True)
    workload = shared_prefix_workload(48, 8, 4, 8, 5, llm.model_spec.vocab_size)
    stats = run_workload(llm, workload, matmul_peak_tflops=0.5)
    computed = stats["prefill_tokens_computed"] + stats["decode_tokens"]
    flops = linear_flops(llm.model_spec, computed, 8 * 5) + attention_flops(llm.model_spec, stats["attended_keys"])
    assert stats["attended_keys"] == 2 * keys_attended(0, 48) + 8 * keys_attended(48, 48 + 8 + 5 - 1)
    assert stats["compute_limit_requests_per_s"] == pytest.approx(8 / (flops / 0.5e12))
    assert stats["compute_limit_share"] == pytest.approx(flops / 0.5e12 / stats["wall_s"])  # (wall_s: the run's)


def test_bench_takes_a_given_matmul_peak_for_mfu_and_the_compute_limit(tiny_model_factory, tmp_path, capsys):
    """`--peak-tflops` replaces the measured peak (none on CPU): the JSON records it, every row reports MFU
    and its compute limit at it, and the result line prints the limit's share."""
    from batchllm.bench import attention_flops, linear_flops
    from batchllm.models.spec import read_model_spec

    model, out = tiny_model_factory("llama"), tmp_path / "bench.json"
    code = main(["bench", "--model", model, "--workload", "shared", "--shared", "48", "--distinct", "8",
                 "--degree", "4", "--requests", "8", "--output", "5", "--configs", "sharing,nosharing",
                 "--peak-tflops", "0.25", "--json-out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["matmul_peak_tflops"] == 0.25
    spec = read_model_spec(Path(model))
    for row in result["results"]:
        computed = row["prefill_tokens_computed"] + row["decode_tokens"]
        flops = linear_flops(spec, computed, 8 * 5) + attention_flops(spec, row["attended_keys"])
        assert row["compute_limit_requests_per_s"] == pytest.approx(8 / (flops / 0.25e12))
        assert row["mfu"] == pytest.approx(row["model_tflops_per_s"] / 0.25)
    text = capsys.readouterr().out
    assert "bf16 matmul peak (given): 0.25 TFLOP/s" in text
    assert text.count("limit ") == 2


def test_bench_runs_a_file_of_token_prompts_as_written(tiny_model_factory, tmp_path):
    """`--workload file`: each line's prompt as given, its max_tokens (else --output) exactly (ignore_eos);
    fields bench does not read (an id, sampling settings) are allowed, as in a file `batchllm run` reads."""
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"id": "a", "prompt_token_ids": [5, 6, 7, 8], "max_tokens": 2, "temperature": 0.7},
             {"prompt_token_ids": [5, 6, 7, 9, 10]},  # --output's 3
             {"prompt_token_ids": [11], "max_tokens": 1}]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # a blank line is skipped
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", tiny_model_factory("llama"), "--workload", "file", "--prompts-file", str(prompts),
                 "--output", "3", "--configs", "sharing", "--warmup-requests", "0", "--json-out", str(out)]) == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["num_requests"] == 3 and row["output_tokens"] == 2 + 3 + 1
    assert row["prompt_tokens"] == 4 + 5 + 1


def refused(capsys, *argv) -> str:
    """What `batchllm ARGV` says on stderr as it refuses to start, with exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        main(list(argv))
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "text"}', "expected an object with 'prompt_token_ids'"),
    ('{"prompt_token_ids": []}', "must be a non-empty list of integers"),
    ('{"prompt_token_ids": [1, true]}', "must be a non-empty list of integers"),
    ('{"prompt_token_ids": [1, 100000]}', "outside the vocabulary [0, "),
    ('{"prompt_token_ids": [1], "max_tokens": 0}', "'max_tokens' must be a positive integer, got 0"),
    ('{"prompt_token_ids": [1]', "line 2: "),  # not JSON
])
def test_bench_file_workload_names_the_bad_line_before_loading_a_model(tiny_model_factory, tmp_path, line, problem,
                                                                       capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_token_ids": [1, 2]}\n' + line + "\n")
    err = refused(capsys, "bench", "--model", tiny_model_factory("llama"), "--workload", "file", "--prompts-file",
                  str(prompts), "--device", "not-a-device")  # exits before an engine is built: the device is unread
    assert re.search(r"prompts\.jsonl, line 2: ", err) and problem in err, err


def test_a_prompts_file_opening_with_a_byte_order_mark_is_read(tmp_path):
    """bench --prompts-file refused a file an editor saved with a UTF-8 BOM ("line 1: Expecting value"), which
    `run` reads."""
    from batchllm.bench import prompt_file_workload

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt_token_ids": [1, 2], "max_tokens": 3}\n{"prompt_token_ids": [4]}\n')
    workload = prompt_file_workload(str(path), output=5, vocab=10)
    assert workload.prompts == [[1, 2], [4]] and workload.max_tokens == [3, 5]


def test_a_data_parallel_configuration_reports_its_device_in_the_json(tiny_model_factory, tmp_path):
    """Where every configuration ran in engine processes (pergpu2, dp2), the JSON had no device, dtype or model: they
    are the ranks' (each names its device in --stats' ranks too)."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", tiny_model_factory("llama"), "--workload", "shared", "--shared", "16",
                 "--distinct", "4", "--degree", "2", "--requests", "4", "--output", "2", "--device", "cpu",
                 "--configs", "pergpu2", "--warmup-requests", "0", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "float32") and report["model"]
    assert [r["device"] for r in report["results"][0]["ranks"]] == ["cpu", "cpu"]


def test_a_shared_or_distinct_part_of_0_tokens_is_left_out():
    """--shared 0 (no shared prefix) and --distinct 0 (identical members) still gave each prompt a 1-token part: a
    --shared 0 run shared one token of every group's prompts. The paper's prompts are unchanged."""
    from batchllm.bench import shared_prefix_workload

    unshared = shared_prefix_workload(0, 5, 4, 8, 3, 5000).prompts
    assert [len(p) for p in unshared] == [5] * 8 and len({p[0] for p in unshared}) == 4  # (the members' first tokens)
    identical = shared_prefix_workload(6, 0, 4, 8, 3, 5000).prompts
    assert [len(p) for p in identical] == [6] * 8 and len({tuple(p) for p in identical}) == 2
    assert [len(p) for p in shared_prefix_workload(6, 5, 4, 8, 3, 5000).prompts] == [11] * 8


def test_a_vocabulary_of_1000_tokens_or_fewer_gets_prompts_from_its_upper_half():
    """A model of 512 tokens crashed bench (randrange(1000, 512)); larger vocabularies keep their prompts (from 1000
    up, clear of the special tokens)."""
    from batchllm.bench import decode_heavy_workload, shared_prefix_workload

    small = shared_prefix_workload(8, 4, 2, 4, 3, 512).prompts
    assert all(0 <= t < 512 for p in small for t in p) and min(t for p in small for t in p[1:8]) >= 256
    assert all(0 <= t < 512 for p in shared_prefix_workload(1, 1, 1, 600, 3, 512).prompts for t in p)  # 600 groups
    assert all(0 <= t < 300 for p in decode_heavy_workload(4, 300).prompts for t in p)
    assert min(t for p in shared_prefix_workload(8, 4, 2, 4, 3, 1024).prompts for t in p[1:8]) >= 1000


@pytest.mark.parametrize("options, problem", [
    (["--degree", "0"], "--degree must be at least 1, got 0"),  # (a ZeroDivisionError after the model loaded)
    (["--requests", "0"], "--requests must be at least 1, got 0"),  # (it measured "0.00 req/s")
    (["--output", "0"], "--output must be at least 1, got 0"),
    (["--shared", "-1"], "--shared must be at least 0, got -1"),
    (["--workload", "nosharing", "--prompt-len", "0"], "--prompt-len must be at least 1, got 0"),
    (["--workload", "decodeheavy", "--min-output", "10", "--max-output", "2"],
     "--min-output (10) must not exceed --max-output (2)"),
    (["--shared", "0", "--distinct", "0"], "--shared + --distinct must be at least 1 (a prompt of no tokens), got 0"),
])
def test_bench_names_a_bad_workload_option_before_loading_a_model(tiny_model_factory, options, problem, capsys):
    err = refused(capsys, "bench", "--model", tiny_model_factory("llama"), *options, "--device", "not-a-device")
    assert f"batchllm bench: {problem}" in err, err


@pytest.mark.parametrize("options, problem", [
    (["--configs", ","], r"batchllm bench: --configs names no configuration; choose from \['sharing'"),  # (exit 0)
    (["--no-prefix-sharing"], r"batchllm bench: --no-prefix-sharing: the configuration\(s\) \['sharing'\] turn "
                              r"prefix sharing on, as each configuration sets it; measure without it with --configs "
                              r"nosharing"),  # (ignored: the sharing row shared)
    (["--json-out", "/proc/nope/x.json"], r"batchllm bench: cannot write --json-out '/proc/nope/x.json'"),
    (["--cpu-profile-out", "/proc/nope/c.txt"], r"batchllm bench: cannot write --cpu-profile-out"),  # (after measuring)
])
def test_bench_refuses_configurations_and_output_paths_before_building_an_engine(tiny_model_factory, options,
                                                                                  problem, capsys):
    err = refused(capsys, "bench", "--model", tiny_model_factory("llama"), *options, "--device", "not-a-device")
    assert re.search(problem, err), err


@pytest.mark.parametrize("option, value", [("--peak-tflops", "-5"), ("--peak-tflops", "0"),
                                           ("--profile-requests", "0"), ("--profile-requests", "-1")])
def test_bench_takes_only_positive_peaks_and_profile_sizes(capsys, option, value):
    """--peak-tflops -5 printed a negative MFU and compute limit, 0 meant "not given"; --profile-requests -1
    profiled all requests but the last (a Python slice), 0 nothing."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", option, value])
    assert exit_.value.code == 2 and f"argument {option}: invalid positive" in capsys.readouterr().err


def test_bench_leaves_options_its_workload_does_not_read_unchecked():
    """--max-output 50 with the shared workload (which reads neither output bound) was refused for the unused
    --min-output 100."""
    import argparse

    from batchllm.bench import workload_option_problem

    base = dict(workload="shared", prompts_file=None, requests=8, degree=4, shared=16, distinct=4, output=4,
                prompt_len=0, min_output=100, max_output=50, warmup_requests=0)
    assert workload_option_problem(argparse.Namespace(**base)) is None
    assert "--min-output (100)" in workload_option_problem(argparse.Namespace(**{**base, "workload": "decodeheavy"}))


def test_bench_file_workload_needs_a_file(tiny_model_factory, tmp_path, capsys):
    """Each refusal exits 2, as run's and argparse's do (a SystemExit of its message exited 1: "lines failed")."""
    model = tiny_model_factory("llama")
    assert "--workload file needs --prompts-file" in refused(capsys, "bench", "--model", model, "--workload", "file")
    assert "No such file" in refused(capsys, "bench", "--model", model, "--workload", "file", "--prompts-file",
                                     str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty.jsonl holds no requests" in refused(capsys, "bench", "--model", model, "--workload", "file",
                                                      "--prompts-file", str(tmp_path / "empty.jsonl"))
    # --prompts-file alone means the file workload; with a synthetic one it was ignored (that workload ran)
    assert "empty.jsonl holds no requests" in refused(capsys, "bench", "--model", model, "--prompts-file",
                                                      str(tmp_path / "empty.jsonl"))
    assert "--prompts-file is read by --workload file, not --workload shared" in refused(
        capsys, "bench", "--model", model, "--workload", "shared", "--prompts-file", str(tmp_path / "empty.jsonl"))
    assert "--sorted orders --workload shared, not --workload decodeheavy" in refused(
        capsys, "bench", "--model", model, "--workload", "decodeheavy", "--sorted")  # (was ignored)


def test_user_path_chat_runs_an_openai_batch_file_and_bench_the_same_tokens(tiny_model_factory, tmp_path,
                                                                            monkeypatch):
    """--chat: `run` reads an OpenAI Batch file of chat requests (template, tokenizer, response bodies), and
    `bench` a file of the same requests as token prompts: every answer has --output tokens in both, and
    each request's prompt is the same number of tokens (the usage `run` reports, the lengths bench read)."""
    user_path = benchmark_module("user_path")
    seen = {}

    def cli(*args):
        assert main(list(args)) == 0
        if args[0] == "run":
            seen["run"] = [json.loads(line) for line in Path(args[args.index("-o") + 1]).read_text().splitlines()]
        else:
            path = args[args.index("--prompts-file") + 1]
            seen["bench"] = [json.loads(line) for line in Path(path).read_text().splitlines()]

    monkeypatch.setattr(user_path, "cli", cli)
    summary = user_path.main(["--model", tiny_model_factory("llama"), "--chat", "5", "--output", "3",
                              "--warmup-requests", "1", "--", "--device", "cpu"])
    assert summary["chat"] and summary["detokenized"] and summary["requests"] == 5
    run = {line["custom_id"]: line["response"]["body"] for line in seen["run"]}
    assert sorted(run) == [f"r{i}" for i in range(5)]
    for i, line in enumerate(seen["bench"]):
        usage = run[f"r{i}"]["usage"]
        assert usage["completion_tokens"] == line["max_tokens"] == 3  # ignore_eos in both
        assert usage["prompt_tokens"] == len(line["prompt_token_ids"])
        assert run[f"r{i}"]["object"] == "chat.completion"


def test_a_configuration_that_fails_keeps_those_measured_before_it(tiny_model_factory, tmp_path, capsys):
    """--json-out was written once all configurations had run: one failing late lost every number before it."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", tiny_model_factory("llama"), "--workload", "shared", "--shared", "16",
                 "--distinct", "4", "--degree", "2", "--requests", "4", "--output", "2",
                 "--configs", "sharing,tp8", "--json-out", str(out)])
    assert code == 2 and "could not start" in capsys.readouterr().err
    assert [row["config"] for row in json.loads(out.read_text())["results"]] == ["sharing"]


@pytest.mark.parametrize("options,problem", [
    (["--kv-cache-memory-gib", "0.00002"],
     r"configuration 'sharing': the workload does not fit: a request of 60 prompt tokens \(--shared \+ --distinct\) "
     r"and 6 output tokens \(--output\) does not fit the KV cache, which holds \d+ tokens; give the cache more "
     r"memory \(--kv-cache-memory-gib, --gpu-memory-utilization\) or shorten the requests\n"),
    (["--num-kv-blocks", "2"],
     r"configuration 'sharing': the workload does not fit: a request of 60 prompt tokens \(--shared \+ --distinct\) "
     r"and 6 output tokens \(--output\) does not fit the KV cache, which holds \d+ tokens; raise num_kv_blocks "
     r"\(--num-kv-blocks, now 2\), which fixes the cache's size over --kv-cache-memory-gib and "
     r"--gpu-memory-utilization or shorten the requests\n"),
    (["--max-model-len", "40"],
     r"configuration 'sharing': the workload does not fit: a prompt of 60 tokens \(--shared \+ --distinct\) leaves "
     r"no room to generate in the context \(max_model_len 40\); raise --max-model-len or shorten the prompts\n"),
    (["--max-model-len", "64"],  # (it ran, each request cut at the context, and measured as the workload announced)
     r"configuration 'sharing': the workload does not fit: a request of 60 prompt tokens \(--shared \+ --distinct\) "
     r"and 6 output tokens \(--output\) does not fit the context \(max_model_len 64\): bench measures every request "
     r"to its max_tokens; raise --max-model-len or shorten the requests\n"),
])
def test_a_workload_that_does_not_fit_is_a_named_user_error(tiny_model_factory, capsys, options, problem):
    """A workload the engine could not hold (a request past the KV cache or the context) was 'unexpected failure:
    ValueError: prompt 0: ...' with exit status 3 and '--debug shows the traceback' (bench has no --debug). It is
    exit status 2 naming the configuration, what does not fit and which options change it (num_kv_blocks where it
    fixes the cache's size: the memory options then change nothing)."""
    code = main(["bench", "--model", tiny_model_factory("llama"), "--workload", "shared", "--shared", "48",
                 "--distinct", "12", "--degree", "2", "--requests", "2", "--output", "6", "--warmup-requests", "1",
                 "--configs", "sharing", *options])
    err = capsys.readouterr().err
    assert code == 2 and "--debug" not in err and "unexpected" not in err, err
    assert re.search("^batchllm bench: " + problem, err, re.M), err


def test_an_unexpected_bench_failure_suggests_only_what_bench_takes(tiny_model_factory, capsys, monkeypatch):
    """'(--debug shows the traceback)' was said to bench, which has no --debug (argparse refuses it)."""
    from batchllm import bench

    def broken(*args, **kwargs):
        raise KeyError("a failure of ours")

    monkeypatch.setattr(bench, "run_workload", broken)
    monkeypatch.delenv("BATCHLLM_LOG_LEVEL", raising=False)
    code = main(["bench", "--model", tiny_model_factory("llama"), "--shared", "16", "--distinct", "4", "--degree",
                 "2", "--requests", "2", "--output", "2", "--configs", "sharing"])
    err = capsys.readouterr().err
    assert code == 3 and err.endswith("batchllm: error: unexpected failure: KeyError: 'a failure of ours' "
                                      "(BATCHLLM_LOG_LEVEL=DEBUG shows the traceback)\n"), err


def test_a_measured_run_shows_the_progress_bar_on_the_cpu_only():
    """On a GPU the bar's updates would fall inside the timed run and its GPU-idle measurement, which every GPU
    number was taken without; on the CPU it shows unless --no-progress."""
    import argparse

    from batchllm.bench import _shows_progress

    assert _shows_progress(argparse.Namespace(device="cpu", no_progress=False))
    assert not _shows_progress(argparse.Namespace(device="cpu", no_progress=True))
    assert not _shows_progress(argparse.Namespace(device="cuda", no_progress=False))
