"""`batchllm bench`: one engine per configuration over the same workload; the JSON report holds a
row per configuration with what each did."""

import json

from batchllm.cli import main


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
    assert report["kv_blocks"] > 0
